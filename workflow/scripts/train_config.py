"""Rule train_config: one model's training config as a file (so an edit reruns exactly that model)."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from ctgen.jobs.config import write_config

write_config(snakemake.params.cfg, snakemake.output.config)  # run-only fields: ctgen train --run-settings
