"""Rule rejects: every rejected input of every stage in one table."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from ctprep.rejects import merge

merge(list(snakemake.input), snakemake.output.csv, snakemake.output.parquet)
