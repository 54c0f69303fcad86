"""Rule train_config: one model's training config as a file (so an edit reruns exactly that model)."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from ctgen.jobs.config import write_config

cfg = dict(snakemake.params.cfg)
# run-only fields (logging, checkpoint frequency): in the file for a run by hand, untracked; the workflow's
# training jobs take the current ones from ctgen train --run-settings
cfg["train"] = {**cfg["train"], **snakemake.params.bookkeeping}
# the model's sampling defaults (SAMPLE_ONLY): in the file as well, untracked (the sampling jobs pass the current ones)
if "model" in cfg:
    cfg["model"] = {**cfg["model"], **snakemake.params.sample_defaults}
write_config(cfg, snakemake.output.config)
