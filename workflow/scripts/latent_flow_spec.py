"""Rule latent_flow_spec: latent_flow.json beside the trained models (grid, text side, latents, sampling, hashes)."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from ctgen.jobs.sample import write_latent_spec

write_latent_spec(
    snakemake.output.spec.rsplit("/", 1)[0],
    snakemake.params.preset,
    snakemake.params.models,
    snakemake.params.sampling,
    list(snakemake.input.latents),
    list(snakemake.input.manifests),
    snakemake.input.text,
    prompts=snakemake.params.prompts,
    encoders=snakemake.params.encoders,
)
