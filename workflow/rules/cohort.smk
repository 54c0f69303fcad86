if DEMO:

    rule demo_cohort:
        output:
            root=directory(config["dataset"]["root"]),
        params:
            demo=config["demo"],
        log:
            f"{R}/logs/demo_cohort.log",
        benchmark:
            f"{R}/benchmarks/demo_cohort.tsv"
        threads: 1
        resources:
            mem_mb=2000,
            runtime=30,
        conda:
            "../../envs/prep.yaml"
        script:
            "../scripts/demo_cohort.py"


rule cohort:
    input:
        root=get_dataset_root,
    output:
        table=f"{R}/cohort/cohort.parquet",
        rejects=f"{R}/rejects/cohort.parquet",
    params:
        splits=config["dataset"]["splits"],
        n_chunks=config["prep"]["n_chunks"],
        strict=config["prep"]["strict"],
    log:
        f"{R}/logs/cohort.log",
    benchmark:
        f"{R}/benchmarks/cohort.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../../envs/prep.yaml"
    script:
        "../scripts/cohort.py"
