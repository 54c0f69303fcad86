"""Rule parse_reports: the mentions and labels tables of the cohort's reports."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from ctprep.labelling import parse_cohort

parse_cohort(
    snakemake.input.cohort,
    snakemake.output.mentions,
    snakemake.output.labels,
    batch_size=snakemake.params.batch_size,
)
