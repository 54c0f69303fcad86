"""Rule figures: every PNG of the report, drawn by ctgen.jobs.figures from the run's outputs."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from pathlib import Path

from ctgen.jobs.figures import MODELS, FigureConfig, make_figures

RUN = ("samples", "metrics", "per_volume", "histograms")
runs = {f: {k: str(snakemake.input[f"{k}_{f}"]) for k in RUN} for f in snakemake.params.families}
shared = {k: str(snakemake.input[k]) for k in ("valid", "families")}
if snakemake.input.get("sweep"):
    shared["sweep"] = str(snakemake.input.sweep)
# training curves: metrics.csv beside each model's weights (not a declared output: it is appended
# across resumed runs, and Snakemake deletes a failed job's outputs)
for model in MODELS:
    if snakemake.input.get(model):
        shared[model] = str(Path(snakemake.input[model]).with_name("metrics.csv"))
outputs = {name: str(path) for name, path in snakemake.output.items()}
make_figures(runs, shared, outputs, FigureConfig.from_dict(snakemake.params.figures))
