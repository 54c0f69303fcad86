rule prompts:
    input:
        cohort=rules.cohort.output.table,
        mentions=get_prompt_mentions,
    output:
        table=f"{R}/prompts/prompts.parquet",
        rejects=f"{R}/rejects/prompts.parquet",
    log:
        f"{R}/logs/prompts.log",
    benchmark:
        f"{R}/benchmarks/prompts.tsv"
    conda:
        "../../envs/prep.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        code=script_digest("prompts.py"),
        prompts=config["prompts"],
        strict=config["prep"]["strict"],
    script:
        "../scripts/prompts.py"
