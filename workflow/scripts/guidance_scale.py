"""Rule guidance_scale: the cascade sampled at one guidance scale, through the feature networks (guidance_sweep scores it)."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from pathlib import Path

from ctgen.jobs.guidance import guidance_scale

guidance_scale(
    Path(snakemake.input.spec).parent,
    snakemake.input.prompts,
    float(snakemake.wildcards.scale),
    {**snakemake.params.sampling, "batch_size": snakemake.params.sr_batch},
    list(snakemake.input.reference),
    snakemake.params.evaluation,
    repeats=snakemake.params.repeats,
).save(snakemake.output.json, snakemake.output.per_volume, snakemake.output.features)
