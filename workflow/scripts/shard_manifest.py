"""Rule shard_manifest: one manifest per split over its chunks' shards."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from ctprep.chunks import merge_split_manifests

merge_split_manifests(snakemake.input.chunks, snakemake.output.manifest, snakemake.wildcards.split)
