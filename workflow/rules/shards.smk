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


# Each split's manifest is a checkpoint: after it has run, the trainings that read the volumes and labels alone
# (the tokenizer, the autoencoder, the classifier, SliceNet) weigh the digest of what they read of the shards
# (shard_content in common.smk), so that shards written again with other prompts or reports retrain the models that
# read text, not these. Under --until or --omit-from it is a plain rule and they take the manifests by date
# (cohort.smk says why).
SHARD_MANIFEST = dict(
    input=dict(
        chunks=expand(rules.shards.output.shards, chunk=CHUNKS, allow_missing=True)
    ),
    output=dict(manifest=f"{R}/shards/{{split}}/manifest.json"),
    log=f"{R}/logs/shards/{{split}}-manifest.log",
    benchmark=f"{R}/benchmarks/shards/{{split}}-manifest.tsv",
    resources=dict(mem_mb=1000, runtime=30),
    params=dict(code=script_digest("shard_manifest.py")),
)

if DAG_FILTERED:

    rule shard_manifest:
        input:
            **SHARD_MANIFEST["input"],
        output:
            **SHARD_MANIFEST["output"],
        log:
            SHARD_MANIFEST["log"],
        benchmark:
            SHARD_MANIFEST["benchmark"]
        conda:
            "../../envs/prep.yaml"
        threads: 1
        resources:
            **SHARD_MANIFEST["resources"],
        params:
            **SHARD_MANIFEST["params"],
        script:
            "../scripts/shard_manifest.py"

else:

    checkpoint shard_manifest:
        input:
            **SHARD_MANIFEST["input"],
        output:
            **SHARD_MANIFEST["output"],
        log:
            SHARD_MANIFEST["log"],
        benchmark:
            SHARD_MANIFEST["benchmark"]
        conda:
            "../../envs/prep.yaml"
        threads: 1
        resources:
            **SHARD_MANIFEST["resources"],
        params:
            **SHARD_MANIFEST["params"],
        script:
            "../scripts/shard_manifest.py"
