"""Rule cascade: cascade.json beside the trained models (grid, text side, sampling defaults, hashes)."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from ctgen.pipelines.text_to_ct import write_cascade

write_cascade(
    snakemake.output.spec.rsplit("/", 1)[0],
    snakemake.params.preset,
    snakemake.params.models,
    snakemake.params.sampling,
    text_tokenizer=snakemake.input.text,
    prompt_templates=snakemake.params.templates,
)
