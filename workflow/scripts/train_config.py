"""Rule train_config: one model's training config as a file (so an edit reruns exactly that model)."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from ctgen.jobs.config import write_config

cfg = dict(snakemake.params.cfg)
cfg["train"] = {**cfg["train"], **snakemake.params.bookkeeping}  # logging, checkpoint frequency: untracked
write_config(cfg, snakemake.output.config)
