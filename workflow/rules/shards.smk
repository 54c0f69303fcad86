rule shards:
    input:
        prep=rules.prep.output.table,
        volumes=rules.prep.output.volumes,
        cohort=rules.cohort.output.table,
        prompts=rules.prompts.output.table,
    output:
        shards=directory(f"{R}/shards/{{split}}/c{{chunk}}"),
    log:
        f"{R}/logs/shards/{{split}}-{{chunk}}.log",
    benchmark:
        f"{R}/benchmarks/shards/{{split}}-{{chunk}}.tsv"
    conda:
        "../../envs/prep.yaml"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=grows_with_attempt(120, 2),
    params:
        code=script_digest("shards.py"),
        shards=config["shards"],
    script:
        "../scripts/shards.py"


rule shard_manifest:
    input:
        chunks=expand(rules.shards.output.shards, chunk=CHUNKS, allow_missing=True),
    output:
        manifest=f"{R}/shards/{{split}}/manifest.json",
    log:
        f"{R}/logs/shards/{{split}}-manifest.log",
    benchmark:
        f"{R}/benchmarks/shards/{{split}}-manifest.tsv"
    conda:
        "../../envs/prep.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    params:
        code=script_digest("shard_manifest.py"),
    script:
        "../scripts/shard_manifest.py"
