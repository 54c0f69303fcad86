"""Rule prep: preprocess one chunk of the cohort to HU volumes on the preset's grid, each encoded once (lossless)."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from ctprep.chunks import prep_chunk

prep_chunk(
    snakemake.input.cohort,
    int(snakemake.wildcards.chunk),
    snakemake.params.preset,
    snakemake.params.dataset,
    snakemake.output.volumes,
    snakemake.output.table,
    snakemake.output.rejects,
    strict=snakemake.params.strict,
)
