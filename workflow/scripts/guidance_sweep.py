"""Rule guidance_sweep: guidance scale against CLIP score and axial FID."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from ctgen.jobs.evaluate import guidance_sweep

guidance_sweep(
    snakemake.input.spec.rsplit("/", 1)[0],
    snakemake.input.prompts,
    snakemake.params.scales,
    snakemake.params.sampling,
    snakemake.input.clip.rsplit("/", 1)[0],
    snakemake.input.classifier.rsplit("/", 1)[0],
    list(snakemake.input.reference),
    snakemake.params.text,
    snakemake.output.csv,
    snakemake.params.window,
    slices_per_volume=snakemake.params.evaluation["slices_per_volume"],
)
