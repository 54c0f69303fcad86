"""Rule figures: every PNG of the report, drawn by ctgen.jobs.figures from the run's outputs."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from pathlib import Path

from ctgen.jobs.figures import MODELS, FigureConfig, make_figures

inputs = {name: str(path) for name, path in snakemake.input.items()}
# training curves: metrics.csv beside each model's weights (not a declared output: it is appended
# across resumed runs, and Snakemake deletes a failed job's outputs)
for model in MODELS:
    inputs[model] = str(Path(inputs[model]).with_name("metrics.csv"))
outputs = {name: str(path) for name, path in snakemake.output.items()}
make_figures(inputs, outputs, FigureConfig.from_dict(snakemake.params.figures))
