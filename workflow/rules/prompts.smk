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
        # the prompt the models train on: a volume whose metadata cannot fill it is rejected here, not met in the
        # middle of a training. Untracked: tracked, an edit of models.prompt would rewrite every shard and retrain
        # the models that read no prompt; after such an edit, training names the volumes and `-R prompts`
        required=untracked(lambda wc: [config["models"]["prompt"]]),
    script:
        "../scripts/prompts.py"
