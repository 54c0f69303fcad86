rule prep:
    input:
        # its rows decide (params.rows), not its date; under --until/--omit-from its date (cohort.smk says why)
        cohort=(
            rules.cohort.output.table
            if DAG_FILTERED
            else ancient(rules.cohort.output.table)
        ),
    output:
        volumes=directory(f"{R}/prep/{{chunk}}"),
        table=f"{R}/prep/{{chunk}}.parquet",
        rejects=f"{R}/rejects/prep/{{chunk}}.parquet",
    log:
        f"{R}/logs/prep/{{chunk}}.log",
    benchmark:
        f"{R}/benchmarks/prep/{{chunk}}.tsv"
    conda:
        "../../envs/prep.yaml"
    threads: 2
    resources:
        mem_mb=3000,
        runtime=grows_with_attempt(240, 2),
    params:
        code=script_digest("prep.py"),
        preset=PRESET,
        dataset=config["dataset"],
        strict=config["prep"]["strict"],
        rows=get_prep_rows,
    script:
        "../scripts/prep.py"
