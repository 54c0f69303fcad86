"""Rule metric_tables: every metric table of the report (HTML, CSV), its caption, and the front page's figure."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from ctgen.jobs.tables import write_intro, write_tables

outputs = {name: str(path) for name, path in snakemake.output.items()}
write_tables(snakemake.input.metrics, snakemake.input.skipped, snakemake.input.sweep, outputs)
write_intro(snakemake.input.faithfulness, outputs["faithfulness_caption"], outputs["intro"])
