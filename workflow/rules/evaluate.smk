rule slicenet_config:
    output:
        config=f"{R}/models/slicenet.yaml",
    log:
        f"{R}/logs/train_config/slicenet.log",
    benchmark:
        f"{R}/benchmarks/train_config/slicenet.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        code=script_digest("train_config.py"),
        cfg=tracked(get_slicenet_config()),
        bookkeeping=untracked(lambda wc: bookkeeping(get_slicenet_config())),
        sample_defaults=untracked(lambda wc: sample_defaults(get_slicenet_config())),
    script:
        "../scripts/train_config.py"


rule train_slicenet:
    input:
        config=rules.slicenet_config.output.config,
        manifests=weighed(get_train_manifests),
    output:
        weights=f"{R}/models/slicenet/model.safetensors",
        config=f"{R}/models/slicenet/config.json",
    log:
        f"{R}/logs/train_slicenet.log",
    benchmark:
        f"{R}/benchmarks/train_slicenet.tsv"
    conda:
        "../../envs/train.yaml"
    threads: SLICENET_RES["threads"]
    resources:
        mem_mb=grows_with_attempt(SLICENET_RES["mem_mb"], 1.5),
        runtime=grows_with_attempt(SLICENET_RES["runtime"], 2),
        gpu=job_gpus(SLICENET_RES),
        nodes=SLICENET_RES.get("nodes", 1),
    params:
        shards=shard_content("slicenet"),
        run=run_settings("slicenet"),
        out=lambda wc, output: os.path.dirname(output.weights),
        ckpt=untracked(lambda wc: f"{CHECKPOINTS}/slicenet"),
        launch=get_launcher,
        workers=get_data_workers,
    shell:
        "{params.launch} train slicenet --config {input.config} --manifests {input.manifests}"
        " --out {params.out} --checkpoints {params.ckpt}"
        " --data-workers {params.workers} --run-settings {params.run} > {log} 2>&1"


# the synthetic set from the sampled volumes, the real one from the prompts: an edit of the cascade samples the
# synthetic set again and leaves the real one, and the classifier trained on it, as they are
rule tstr_shards:
    input:
        table=get_tstr_table,
        manifests=get_train_manifests,
    output:
        manifest=f"{R}/tstr/{{source}}/tstr-{{source}}.manifest.json",
    log:
        f"{R}/logs/tstr_shards/{{source}}.log",
    benchmark:
        f"{R}/benchmarks/tstr_shards/{{source}}.tsv"
    wildcard_constraints:
        source="synthetic|real",
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=grows_with_attempt(60, 2),
    params:
        code=script_digest("tstr_shards.py"),
        shard_size=config["shards"]["shard_size"],
    script:
        "../scripts/tstr_shards.py"


rule train_tstr:
    input:
        config=expand(rules.train_config.output.config, model="tstr"),
        manifests=rules.tstr_shards.output.manifest,
    output:
        weights=f"{R}/models/tstr_{{source}}/model.safetensors",
        config=f"{R}/models/tstr_{{source}}/config.json",
    log:
        f"{R}/logs/train_tstr/{{source}}.log",
    benchmark:
        f"{R}/benchmarks/train_tstr/{{source}}.tsv"
    wildcard_constraints:
        source="synthetic|real",
    conda:
        "../../envs/train.yaml"
    threads: RES["classifier"]["threads"]
    resources:
        mem_mb=grows_with_attempt(RES["classifier"]["mem_mb"], 1.5),
        runtime=grows_with_attempt(RES["classifier"]["runtime"], 2),
        gpu=job_gpus(RES["classifier"]),
        nodes=RES["classifier"]["nodes"],
    params:
        run=run_settings("tstr"),
        out=lambda wc, output: os.path.dirname(output.weights),
        ckpt=untracked(lambda wc: f"{CHECKPOINTS}/tstr_{wc.source}"),
        launch=get_launcher,
        workers=get_data_workers,
    shell:
        "{params.launch} train classifier --config {input.config} --manifests {input.manifests}"
        " --out {params.out} --checkpoints {params.ckpt}"
        " --data-workers {params.workers} --run-settings {params.run} > {log} 2>&1"


rule evaluate:
    input:
        samples=lambda wc: family_samples(wc.family),
        reference=get_eval_manifests,
        spec=lambda wc: family_spec(wc.family),
        clip=rules.train_clip.output.weights,
        classifier=rules.train_classifier.output.weights,
        slicenet=rules.train_slicenet.output.weights,
        tstr=get_tstr_weights,
        inception=get_inception_weights,
    output:
        metrics=f"{R}/evaluation/{{family}}/metrics.json",
        per_volume=f"{R}/evaluation/{{family}}/per_volume.csv",
        skipped=f"{R}/evaluation/{{family}}/skipped.csv",
        histograms=f"{R}/evaluation/{{family}}/hu_histograms.json",
    log:
        f"{R}/logs/evaluate/{{family}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{{family}}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: config["evaluation"]["resources"]["threads"]
    resources:
        mem_mb=config["evaluation"]["resources"]["mem_mb"],
        runtime=grows_with_attempt(config["evaluation"]["resources"]["runtime"], 2),
        gpu=config["evaluation"]["resources"]["gpu"],
    params:
        models=lambda wc, input: os.path.dirname(input.spec),
        out=lambda wc, output: os.path.dirname(output.metrics),
        scoring=EVAL_TRACKED,
        settings=untracked(get_eval_settings),
        tstr=lambda wc, input: (
            "--tstr " + " ".join(os.path.dirname(w) for w in input.tstr)
            if input.tstr
            else ""
        ),
    shell:
        "ctgen evaluate --generated {input.samples} --real {input.reference} --models {params.models}"
        " --spec {input.spec} --out {params.out} --settings {params.settings} {params.tstr} > {log} 2>&1"


rule compare_families:
    input:
        unpack(get_family_evaluations),
    output:
        json=f"{R}/evaluation/families.json",
        csv=f"{R}/evaluation/families.csv",
    log:
        f"{R}/logs/compare_families.log",
    benchmark:
        f"{R}/benchmarks/compare_families.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=script_digest("compare_families.py"),
        families=GENERATORS,
        settings={k: EVAL_SETTINGS.get(k) for k in ("bootstrap", "seed")},
    script:
        "../scripts/compare_families.py"


rule guidance_scale:
    input:
        spec=rules.cascade.output.spec,
        prompts=rules.sample_prompts.output.csv,
        reference=get_eval_manifests,
        clip=rules.train_clip.output.weights,
        classifier=rules.train_classifier.output.weights,
        slicenet=rules.train_slicenet.output.weights,
    output:
        json=f"{R}/evaluation/guidance/{{scale}}.json",
        per_volume=f"{R}/evaluation/guidance/{{scale}}.parquet",
        features=f"{R}/evaluation/guidance/{{scale}}.npz",
    log:
        f"{R}/logs/guidance/{{scale}}.log",
    benchmark:
        f"{R}/benchmarks/guidance/{{scale}}.tsv"
    priority: LONGEST_CHAIN  # the longest jobs after training: first, the others beside them
    conda:
        "../../envs/train.yaml"
    threads: config["evaluation"]["resources"]["threads"]
    resources:
        mem_mb=config["evaluation"]["resources"]["mem_mb"],
        runtime=grows_with_attempt(config["evaluation"]["resources"]["runtime"], 2),
        gpu=config["evaluation"]["resources"]["gpu"],
    params:
        code=script_digest("guidance_scale.py"),
        repeats=config["evaluation"]["guidance_repeats"],
        # the sampler but its default scale: each job samples at its own (cascade_sampling records the default)
        sampling=canonical({k: v for k, v in SAMPLER.items() if k != "guidance_scale"}),
        sr_batch=SR_BATCH,
        # what the sampled volumes' features depend on; the scores' settings are guidance_sweep's
        features={"slices_per_volume": EVAL_SETTINGS.get("slices_per_volume")},
        evaluation=untracked(lambda wc: EVAL_SETTINGS),
    script:
        "../scripts/guidance_scale.py"


rule guidance_sweep:
    input:
        json=expand(rules.guidance_scale.output.json, scale=GUIDANCE_SCALES),
        per_volume=expand(rules.guidance_scale.output.per_volume, scale=GUIDANCE_SCALES),
        features=expand(rules.guidance_scale.output.features, scale=GUIDANCE_SCALES),
    output:
        csv=f"{R}/evaluation/guidance_sweep.csv",
    log:
        f"{R}/logs/guidance_sweep.log",
    benchmark:
        f"{R}/benchmarks/guidance_sweep.tsv"
    conda:
        "../../envs/train.yaml"
    # it scores every scale (the 2D FID's bootstrap over all the sampled volumes' slice features): an evaluation job
    threads: config["evaluation"]["resources"]["threads"]
    resources:
        mem_mb=config["evaluation"]["resources"]["mem_mb"],
        runtime=grows_with_attempt(config["evaluation"]["resources"]["runtime"], 2),
        gpu=config["evaluation"]["resources"]["gpu"],
    params:
        code=script_digest("guidance_sweep.py"),
        settings=EVAL_TRACKED,
    script:
        "../scripts/guidance_sweep.py"
