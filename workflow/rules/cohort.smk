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


rule cohort:
    input:
        root=get_dataset_root,
        tables=get_dataset_tables,
    output:
        table=f"{R}/cohort/cohort.parquet",
        rejects=f"{R}/rejects/cohort.parquet",
        summary=f"{R}/cohort/summary.json",
    log:
        f"{R}/logs/cohort.log",
    benchmark:
        f"{R}/benchmarks/cohort.tsv"
    conda:
        "../../envs/prep.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=grows_with_attempt(60, 2),
    params:
        code=script_digest("cohort.py"),
        splits=config["dataset"]["splits"],
        prefer=config["dataset"]["prefer"],
        n_chunks=config["prep"]["n_chunks"],
        strict=config["prep"]["strict"],
        volumes=get_volumes_digest,
    script:
        "../scripts/cohort.py"
