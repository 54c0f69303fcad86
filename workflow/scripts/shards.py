"""Rule shards: pack one chunk of one split into webdataset tar shards (volume payloads copied as they are)."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from ctprep.chunks import shard_chunk

shard_chunk(
    snakemake.input.prep,
    snakemake.input.cohort,
    snakemake.input.prompts,
    split=snakemake.wildcards.split,
    chunk=int(snakemake.wildcards.chunk),
    out_dir=snakemake.output.shards,
    shard_size=snakemake.params.shards["shard_size"],
    prompt_key=snakemake.params.shards["prompt"],
)
