"""Rules tokens_manifest, latents_manifest: one manifest over a split's derived shard chunks."""
from pathlib import Path

from ctprep.logs import log_to

log_to(snakemake.log[0])
from ctgen.data.derived import merge_derived

kind = snakemake.params.get("kind", "tokens")
merge_derived(
    [p for d in snakemake.input.chunks for p in Path(d).glob(f"*.{kind}.manifest.json")],
    snakemake.output.manifest,
)
