"""Rule tstr_shards: one TSTR training set as shards, the synthetic volumes or the real ones of the same reports."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from pathlib import Path

from ctgen.jobs.tstr import tstr_real_shards, tstr_synthetic_shards

make = tstr_synthetic_shards if snakemake.wildcards.source == "synthetic" else tstr_real_shards
make(
    snakemake.input.table,
    list(snakemake.input.manifests),
    Path(snakemake.output.manifest).parent,
    snakemake.params.shard_size,
)
