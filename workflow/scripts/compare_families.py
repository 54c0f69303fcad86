"""Rule compare_families: the generator families' paired differences on the same reports and seeds."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from ctgen.jobs.compare import compare_families
from ctgen.jobs.eval_config import EvalConfig

cfg = EvalConfig.from_dict(snakemake.params.settings)
evaluations = {f: (snakemake.input[f"metrics_{f}"], snakemake.input[f"per_volume_{f}"]) for f in snakemake.params.families}
compare_families(evaluations, snakemake.output.json, snakemake.output.csv, n_boot=cfg.bootstrap, seed=cfg.seed)
