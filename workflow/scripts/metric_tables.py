"""Rule metric_tables: every metric table of the report (HTML, CSV), its caption, and the front page's figure."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from ctgen.jobs.tables import write_intro, write_tables

families = snakemake.params.families
outputs = {name: str(path) for name, path in snakemake.output.items()}
write_tables({f: snakemake.input[f"metrics_{f}"] for f in families},
             {f: snakemake.input[f"skipped_{f}"] for f in families},
             snakemake.input.get("sweep") or None, snakemake.input.families, outputs,
             text_reliance_json=snakemake.input.get("text_reliance") or None)
write_intro(snakemake.input.faithfulness, outputs["faithfulness_caption"], outputs["intro"])
