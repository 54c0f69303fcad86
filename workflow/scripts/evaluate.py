"""Rule evaluate: every metric of the sampling run against the real evaluation volumes."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
import yaml

from ctgen.jobs.evaluate import evaluate_run

evaluate_run(
    snakemake.input.samples,
    list(snakemake.input.reference),
    snakemake.input.clip.rsplit("/", 1)[0],
    snakemake.input.classifier.rsplit("/", 1)[0],
    snakemake.params.text,
    snakemake.output.metrics.rsplit("/", 1)[0],
    snakemake.params.evaluation,
    snakemake.params.window,
    classifier_cfg=yaml.safe_load(open(snakemake.input.classifier_config[0])),  # expand(): a list of one
    checkpoint_root=snakemake.params.ckpt,
)
