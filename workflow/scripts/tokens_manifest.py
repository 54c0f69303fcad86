"""Rule tokens_manifest: one manifest over a split's token shard chunks."""
from pathlib import Path

from ctprep.logs import log_to

log_to(snakemake.log[0])
from ctgen.data.derived import merge_derived

merge_derived(
    [p for d in snakemake.input.chunks for p in Path(d).glob("*.tokens.manifest.json")],
    snakemake.output.manifest,
)
