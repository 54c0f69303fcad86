"""Rule cohort: join volumes, metadata, reports and labels into one table."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from ctprep.cohort import write_cohort

write_cohort(
    snakemake.input.root,
    snakemake.output.table,
    snakemake.output.rejects,
    splits=snakemake.params.splits,
    n_chunks=snakemake.params.n_chunks,
    strict=snakemake.params.strict,
    prefer=snakemake.params.prefer,
    out_summary=snakemake.output.summary,
)
