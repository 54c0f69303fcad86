"""Rule cascade: cascade.json beside the trained models (grid, text side, hashes)."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from ctgen.jobs.sample import write_cascade_spec

write_cascade_spec(
    snakemake.output.spec.rsplit("/", 1)[0],
    snakemake.params.preset,
    snakemake.params.models,
    list(snakemake.input.manifests),
    text_tokenizer=snakemake.input.text,
    prompts=snakemake.params.prompts,
)
