"""Rule tstr_shards: the synthetic TSTR training volumes and the real ones of the same reports, as shards."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from pathlib import Path

from ctgen.jobs.tstr import tstr_shards

tstr_shards(
    snakemake.input.samples,
    list(snakemake.input.manifests),
    Path(snakemake.output.synthetic).parent,
    Path(snakemake.output.real).parent,
    snakemake.params.shard_size,
)
