"""Rule guidance_sweep: the scales' scores in one table, each scale against the lowest with paired tests."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from ctgen.jobs.guidance import ScaleResult, combine_scales

results = [ScaleResult.load(j, p) for j, p in zip(snakemake.input.json, snakemake.input.per_volume)]
combine_scales(results, snakemake.output.csv, snakemake.params.settings)
