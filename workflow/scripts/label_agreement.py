"""Rule label_agreement: where the dataset's labels and the parsed labels disagree."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from ctprep.labelling import write_agreement

write_agreement(
    snakemake.input.labels,
    snakemake.input.mentions,
    snakemake.output.table,
    snakemake.output.markdown,
    snakemake.output.disagreements,
    snakemake.output.html,
)
