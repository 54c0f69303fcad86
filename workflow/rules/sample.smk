rule cascade:
    input:
        tokenizer=rules.train_tokenizer.output.weights,
        generator=rules.train_generator.output.weights,
        superres=rules.train_superres.output.weights,
        manifests=get_train_manifests,
        text=get_text,
    output:
        spec=f"{R}/models/cascade.json",
    log:
        f"{R}/logs/cascade.log",
    benchmark:
        f"{R}/benchmarks/cascade.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        code=script_digest("cascade.py"),
        preset=PRESET,
        models=CASCADE_SETTINGS,
        prompts=config["prompts"],
    script:
        "../scripts/cascade.py"


# config.yaml's sampling settings beside the cascade, for `ctgen sample` by hand: a file of their own, so that an
# edit of the default guidance scale does not rewrite cascade.json and sample the guidance sweep again
rule cascade_sampling:
    output:
        json=f"{R}/models/cascade_sampling.json",
    log:
        f"{R}/logs/cascade_sampling.log",
    benchmark:
        f"{R}/benchmarks/cascade_sampling.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        code=script_digest("cascade_sampling.py"),
        # with the super-resolution batch, tracked here (untracked elsewhere): no job reads this file, and the
        # batch a user lowered after an out-of-memory error is the one `ctgen sample` by hand should take
        sampling=canonical(
            {
                **SAMPLER,
                "per_prompt": SAMPLING["per_prompt"],
                "batch_size": config["sampling"]["batch_size"],
            }
        ),
    script:
        "../scripts/cascade_sampling.py"


rule sample_prompts:
    input:
        prompts=rules.prompts.output.table,
        cohort=rules.cohort.output.table,
    output:
        csv=f"{R}/samples/prompts.csv",
    log:
        f"{R}/logs/sample_prompts.log",
    benchmark:
        f"{R}/benchmarks/sample_prompts.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        code=script_digest("sample_prompts.py"),
        column=config["models"]["prompt"],
        sampling={k: config["sampling"][k] for k in ("split", "volumes", "max_prompts")},
    script:
        "../scripts/sample_prompts.py"


rule sample:
    input:
        spec=rules.cascade.output.spec,
        prompts=rules.sample_prompts.output.csv,
    output:
        manifest=f"{R}/samples/volumes/samples.csv",
    log:
        f"{R}/logs/sample.log",
    benchmark:
        f"{R}/benchmarks/sample.tsv"
    conda:
        "../../envs/train.yaml"
    threads: config["sampling"]["resources"]["threads"]
    resources:
        mem_mb=config["sampling"]["resources"]["mem_mb"],
        runtime=grows_with_attempt(config["sampling"]["resources"]["runtime"], 2),
        gpu=config["sampling"]["resources"]["gpu"],
    params:
        models=lambda wc, input: os.path.dirname(input.spec),
        out=lambda wc, output: os.path.dirname(output.manifest),
        s=SAMPLING,
        sr_batch=SR_BATCH,
        sr_steps=SR_STEPS_FLAG,
        dicom=lambda wc, output: (
            f"--dicom {os.path.dirname(output.manifest)}/dicom"
            if config["sampling"]["dicom"]
            else ""
        ),
    shell:
        "ctgen sample --models {params.models} --prompts {input.prompts} --out-dir {params.out}"
        " --seed {params.s[seed]} --per-prompt {params.s[per_prompt]} --steps {params.s[steps]}"
        " --guidance-scale {params.s[guidance_scale]} --temperature {params.s[temperature]}"
        " --batch-size {params.sr_batch} {params.sr_steps} {params.dicom} --truncate-prompt > {log} 2>&1"


rule tstr_prompts:
    input:
        prompts=rules.prompts.output.table,
        cohort=rules.cohort.output.table,
    output:
        csv=f"{R}/samples/tstr/prompts.csv",
    log:
        f"{R}/logs/tstr_prompts.log",
    benchmark:
        f"{R}/benchmarks/tstr_prompts.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        code=script_digest("sample_prompts.py"),
        column=config["models"]["prompt"],
        sampling={
            "split": config["models"]["train_splits"][0],
            "volumes": [],
            "max_prompts": config["evaluation"]["tstr_reports"],
        },
    script:
        "../scripts/sample_prompts.py"


rule sample_tstr:
    input:
        spec=rules.cascade.output.spec,
        prompts=rules.tstr_prompts.output.csv,
    output:
        manifest=f"{R}/samples/tstr/volumes/samples.csv",
    log:
        f"{R}/logs/sample_tstr.log",
    benchmark:
        f"{R}/benchmarks/sample_tstr.tsv"
    conda:
        "../../envs/train.yaml"
    threads: config["sampling"]["resources"]["threads"]
    resources:
        mem_mb=config["sampling"]["resources"]["mem_mb"],
        runtime=grows_with_attempt(config["sampling"]["resources"]["runtime"], 2),
        gpu=config["sampling"]["resources"]["gpu"],
    params:
        models=lambda wc, input: os.path.dirname(input.spec),
        out=lambda wc, output: os.path.dirname(output.manifest),
        s=SAMPLER,
        sr_batch=SR_BATCH,
        sr_steps=SR_STEPS_FLAG,
    shell:
        "ctgen sample --models {params.models} --prompts {input.prompts} --out-dir {params.out}"
        " --seed {params.s[seed]} --per-prompt 1 --steps {params.s[steps]}"
        " --guidance-scale {params.s[guidance_scale]} --temperature {params.s[temperature]}"
        " --batch-size {params.sr_batch} {params.sr_steps} --truncate-prompt > {log} 2>&1"
