"""Rule evaluate_labeller: the parser's labels scored against radiologists' labels."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from ctprep.labelling import write_labeller_eval

write_labeller_eval(snakemake.input.reports, snakemake.output.table, snakemake.output.summary, snakemake.output.html)
