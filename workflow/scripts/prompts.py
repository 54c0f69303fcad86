"""Rule prompts: one prompt per volume and template."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from ctprep.prompts import write_prompts

write_prompts(
    snakemake.input.cohort,
    snakemake.output.table,
    snakemake.output.rejects,
    templates=snakemake.params.prompts["templates"],
    max_chars=snakemake.params.prompts.get("max_chars", 0),
    structured=snakemake.params.prompts["structured"],
    mentions_path=snakemake.input.mentions or None,
    strict=snakemake.params.strict,
    required=snakemake.params.required,
)
