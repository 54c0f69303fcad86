"""The report's figures and tables: name -> report category (and a table's title), in the order they are made.

The one list of them: ``ctgen.jobs.figures`` draws one PNG per figure name, ``ctgen.jobs.tables``
writes one HTML and one CSV table per table name, and the workflow's ``figures`` and ``metric_tables``
rules declare each as a report output, captioned by ``workflow/report/<name>.rst`` (tables:
``table_<name>.rst``). It lives apart from both modules so that the workflow reads it without
importing matplotlib or torch. Snakemake's report sorts its categories by name: the numbers put the
faithfulness figure, the families' comparison and their tables first.
"""

FIGURES = {
    "faithfulness": "1. Faithfulness",
    "families": "1. Faithfulness",
    "tstr": "3. Metric plots",
    "alignment": "3. Metric plots",
    "hu_histograms": "3. Metric plots",
    "per_volume": "3. Metric plots",
    "guidance_sweep": "3. Metric plots",
    "samples": "4. Samples",
    "training_curves": "5. Training",
}

#: The labeller's tables (written by the report-parsing rules: the dataset's labels against the parsed ones, and the
#: parser against radiologists' labels where ``reports.eval_jsonl`` exists)
LABEL_TABLES = {"label_agreement": "6. Report labels", "labeller_eval": "6. Report labels"}

TABLES = {  # name -> (category, title)
    "faithfulness": ("1. Faithfulness", "Abnormality faithfulness: per-label AUROC, generated and real ceiling"),
    "families": ("1. Faithfulness", "The generator families on the same reports and seeds: paired differences"),
    "distribution": ("2. Metric tables", "Distribution: 2D/2.5D FID and 3D Fréchet distances"),
    "alignment": ("2. Metric tables", "Text alignment: CLIP score, retrieval among the evaluation reports, similarity"),
    "tstr": ("2. Metric tables", "Train on synthetic, test on real"),
    "hu": ("2. Metric tables", "HU: tissue medians and flags"),
    "guidance_sweep": ("2. Metric tables", "Guidance sweep"),
    "skipped": ("2. Metric tables", "Volumes left out of the scoring, and why"),
    "text_reliance": ("5. Training", "Does the latent flow network read the report? Its loss with the report, "
                                     "the null context and another report"),
}
