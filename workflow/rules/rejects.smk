rule rejects:
    input:
        [rules.cohort.output.rejects, rules.prompts.output.rejects]
        + expand(rules.prep.output.rejects, chunk=CHUNKS)
        + ([rules.dicom2nifti.output.rejects] if DICOM else []),
    output:
        csv=f"{R}/rejects.csv",
        parquet=f"{R}/rejects.parquet",
    log:
        f"{R}/logs/rejects.log",
    benchmark:
        f"{R}/benchmarks/rejects.tsv"
    conda:
        "../../envs/prep.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=script_digest("rejects.py"),
    script:
        "../scripts/rejects.py"
