"""Rule guidance_sweep: guidance scale against faithfulness, CLIP score, retrieval and axial FID, with CIs and paired tests."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from pathlib import Path

from ctgen.jobs.guidance import guidance_sweep

guidance_sweep(
    Path(snakemake.input.spec).parent,
    snakemake.input.prompts,
    snakemake.params.scales,
    snakemake.params.sampling,
    list(snakemake.input.reference),
    snakemake.output.csv,
    snakemake.params.evaluation,
    repeats=snakemake.params.repeats,
)
