"""Rule sample_prompts: the evaluation prompts, each with the real volume of its report."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from ctgen.jobs.sample import select_prompts

s = snakemake.params.sampling
select_prompts(
    snakemake.input.prompts,
    snakemake.params.column,
    s["split"],
    s["volumes"],
    s["max_prompts"],
    snakemake.output.csv,
    cohort_parquet=snakemake.input.cohort,
)
