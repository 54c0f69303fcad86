"""The report's figures: name -> category in the Snakemake report, in the order they are drawn.

The one list of them: ``ctgen.jobs.figures`` draws one PNG per name, and the workflow's ``figures``
rule declares each as a report output, captioned by ``workflow/report/<name>.rst``. It lives apart
from ``ctgen.jobs.figures`` so that the workflow reads it without importing matplotlib or torch.
"""

FIGURES = {
    "samples": "Samples",
    "training_curves": "Training",
    "metrics_summary": "Metrics",
    "faithfulness": "Metrics",
    "tstr": "Metrics",
    "hu_histograms": "HU checks",
    "per_volume": "Metrics",
    "guidance_sweep": "Guidance sweep",
}
