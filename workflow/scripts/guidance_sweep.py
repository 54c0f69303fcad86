"""Rule guidance_sweep: each scale scored, in one table, and each scale against the lowest with paired tests."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from ctgen.jobs.guidance import ScaleResult, combine_scales

results = [
    ScaleResult.load(j, p, f)
    for j, p, f in zip(snakemake.input.json, snakemake.input.per_volume, snakemake.input.features)
]
combine_scales(results, snakemake.output.csv, snakemake.params.settings)
