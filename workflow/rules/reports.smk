from ctgen.jobs.figure_list import (
    LABEL_TABLES,
)  # the report categories of the labeller's tables


rule parse_reports:
    input:
        cohort=rules.cohort.output.table,
    output:
        mentions=f"{R}/reports/mentions.parquet",
        labels=f"{R}/reports/labels.parquet",
    log:
        f"{R}/logs/parse_reports.log",
    benchmark:
        f"{R}/benchmarks/parse_reports.tsv"
    conda:
        "../../envs/prep.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        code=script_digest("parse_reports.py"),
        batch_size=untracked(lambda wc: config["reports"]["batch_size"]),
    script:
        "../scripts/parse_reports.py"


rule label_agreement:
    input:
        labels=rules.parse_reports.output.labels,
        mentions=rules.parse_reports.output.mentions,
    output:
        table=f"{R}/reports/label_agreement.tsv",
        markdown=f"{R}/reports/label_agreement.md",
        disagreements=f"{R}/reports/label_disagreements.csv",
        html=report(
            f"{R}/reports/label_agreement.html",
            caption="../report/label_agreement.rst",
            category=LABEL_TABLES["label_agreement"],
            labels={"table": "dataset labels vs parsed labels"},
        ),
    log:
        f"{R}/logs/label_agreement.log",
    benchmark:
        f"{R}/benchmarks/label_agreement.tsv"
    conda:
        "../../envs/prep.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=script_digest("label_agreement.py"),
    script:
        "../scripts/label_agreement.py"


rule evaluate_labeller:
    input:
        reports=config["reports"]["eval_jsonl"] or [],
    output:
        table=f"{R}/reports/labeller_eval.tsv",
        summary=f"{R}/reports/labeller_eval.json",
        html=report(
            f"{R}/reports/labeller_eval.html",
            caption="../report/labeller_eval.rst",
            category=LABEL_TABLES["labeller_eval"],
            labels={"table": "labeller vs radiologists"},
        ),
    log:
        f"{R}/logs/evaluate_labeller.log",
    benchmark:
        f"{R}/benchmarks/evaluate_labeller.tsv"
    conda:
        "../../envs/prep.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=script_digest("evaluate_labeller.py"),
    script:
        "../scripts/evaluate_labeller.py"
