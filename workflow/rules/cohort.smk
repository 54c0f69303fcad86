if DEMO:

    rule demo_cohort:
        output:
            root=directory(config["dataset"]["root"]),
        log:
            f"{R}/logs/demo_cohort.log",
        benchmark:
            f"{R}/benchmarks/demo_cohort.tsv"
        conda:
            "../../envs/prep.yaml"
        threads: 2  # volumes rendered side by side, the same bytes
        resources:
            mem_mb=2000,
            runtime=30,
        params:
            code=script_digest("demo_cohort.py"),
            demo=config["demo"],
        script:
            "../scripts/demo_cohort.py"


# The cohort is a checkpoint: after it has run, each prep chunk weighs the digest of its own rows (get_prep_rows), so
# a cohort rerun (volumes downloaded, a table corrected) prepares again only the chunks whose rows changed. Under
# --until or --omit-from it is a plain rule (a cohort rerun then prepares every chunk again): there Snakemake 9 loses
# the chunk jobs that follow a checkpoint and answers "Nothing to be done" (snakemake/snakemake#2824), and prep
# takes the cohort by its date (workflow/rules/prep.smk).
COHORT = dict(
    input=dict(root=get_dataset_root, tables=get_dataset_tables),
    output=dict(
        table=f"{R}/cohort/cohort.parquet",
        rejects=f"{R}/rejects/cohort.parquet",
        summary=f"{R}/cohort/summary.json",
    ),
    resources=dict(mem_mb=4000, runtime=grows_with_attempt(60, 2)),
    params=dict(
        code=script_digest("cohort.py"),
        splits=config["dataset"]["splits"],
        prefer=config["dataset"]["prefer"],
        n_chunks=config["prep"]["n_chunks"],
        strict=config["prep"]["strict"],
        volumes=get_volumes_digest,
    ),
)

if DAG_FILTERED:

    rule cohort:
        input:
            **COHORT["input"],
        output:
            **COHORT["output"],
        log:
            f"{R}/logs/cohort.log",
        benchmark:
            f"{R}/benchmarks/cohort.tsv"
        conda:
            "../../envs/prep.yaml"
        threads: 1
        resources:
            **COHORT["resources"],
        params:
            **COHORT["params"],
        script:
            "../scripts/cohort.py"

else:

    checkpoint cohort:
        input:
            **COHORT["input"],
        output:
            **COHORT["output"],
        log:
            f"{R}/logs/cohort.log",
        benchmark:
            f"{R}/benchmarks/cohort.tsv"
        conda:
            "../../envs/prep.yaml"
        threads: 1
        resources:
            **COHORT["resources"],
        params:
            **COHORT["params"],
        script:
            "../scripts/cohort.py"
