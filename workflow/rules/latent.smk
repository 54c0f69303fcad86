rule train_autoencoder:
    input:
        config=expand(rules.train_config.output.config, model="autoencoder"),
        manifests=weighed(get_train_manifests),
        pretrained=get_maisi_checkpoint,
    output:
        weights=f"{R}/models/autoencoder/model.safetensors",
        config=f"{R}/models/autoencoder/config.json",
    log:
        f"{R}/logs/train_autoencoder.log",
    benchmark:
        f"{R}/benchmarks/train_autoencoder.tsv"
    conda:
        "../../envs/train.yaml"
    threads: RES["autoencoder"]["threads"]
    resources:
        mem_mb=grows_with_attempt(RES["autoencoder"]["mem_mb"], 1.5),
        runtime=grows_with_attempt(RES["autoencoder"]["runtime"], 2),
        gpu=job_gpus(RES["autoencoder"]),
        nodes=RES["autoencoder"]["nodes"],
    params:
        shards=shard_content("autoencoder"),
        run=run_settings("autoencoder"),
        out=lambda wc, output: os.path.dirname(output.weights),
        ckpt=untracked(lambda wc: f"{CHECKPOINTS}/autoencoder"),
        launch=get_launcher,
        workers=get_data_workers,
    shell:
        "{params.launch} train autoencoder --config {input.config} --manifests {input.manifests}"
        " --out {params.out} --checkpoints {params.ckpt}"
        " --data-workers {params.workers} --run-settings {params.run} > {log} 2>&1"


rule encode_latents:
    input:
        weights=rules.train_autoencoder.output.weights,
        shards=rules.shards.output.shards,
    output:
        latents=directory(f"{R}/latents/{{split}}/c{{chunk}}"),
    log:
        f"{R}/logs/encode_latents/{{split}}-{{chunk}}.log",
    benchmark:
        f"{R}/benchmarks/encode_latents/{{split}}-{{chunk}}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: RES["autoencoder"]["threads"]  # the autoencoder's job, on its resources
    resources:
        mem_mb=grows_with_attempt(RES["autoencoder"]["mem_mb"], 1.5),  # the model's job's memory, more on a retry
        runtime=grows_with_attempt(120, 2),
        gpu=0,  # the Slurm profile gives it one
    params:
        autoencoder=lambda wc, input: os.path.dirname(input.weights),
        manifest=get_chunk_manifest,
        window=PRESET["clip"],
        encode=encode_flags(),
    shell:
        "ctgen encode-latents --autoencoder {params.autoencoder} --manifest {params.manifest}"
        " --out {output.latents} --hu-window {params.window[0]} {params.window[1]} {params.encode} > {log} 2>&1"


rule latents_manifest:
    input:
        chunks=expand(
            rules.encode_latents.output.latents, chunk=CHUNKS, allow_missing=True
        ),
    output:
        manifest=f"{R}/latents/{{split}}/manifest.json",
    log:
        f"{R}/logs/encode_latents/{{split}}-manifest.log",
    benchmark:
        f"{R}/benchmarks/encode_latents/{{split}}-manifest.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=script_digest("derived_manifest.py"),
        kind="latents",
    script:
        "../scripts/derived_manifest.py"


rule embed_sections:
    input:
        cohort=rules.cohort.output.table,
        prompts=rules.prompts.output.table,
        encoder=get_report_encoder,
        pretrained=get_section_encoder_files,
    output:
        cache=f"{R}/text/sections/{{encoder}}.safetensors",
    log:
        f"{R}/logs/embed_sections/{{encoder}}.log",
    benchmark:
        f"{R}/benchmarks/embed_sections/{{encoder}}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 2
    resources:
        # the packed states of every distinct text, held once (CT-RATE's sections: ~7 GB): more on a retry
        mem_mb=grows_with_attempt(8000, 2),
        runtime=grows_with_attempt(60, 2),
        gpu=0,
    params:
        encoder=get_section_encoder_config,
    shell:
        "ctgen embed-sections --cohort {input.cohort} --prompts {input.prompts}"
        " --encoder '{params.encoder}' --out {output.cache} > {log} 2>&1"


rule train_latent_flow:
    input:
        config=expand(rules.train_config.output.config, model="latent_flow"),
        latents=get_train_latents,
        text=get_section_text,
    output:
        weights=f"{R}/models/latent_flow/model.safetensors",
        config=f"{R}/models/latent_flow/config.json",
    log:
        f"{R}/logs/train_latent_flow.log",
    benchmark:
        f"{R}/benchmarks/train_latent_flow.tsv"
    conda:
        "../../envs/train.yaml"
    threads: RES["latent_flow"]["threads"]
    resources:
        mem_mb=grows_with_attempt(RES["latent_flow"]["mem_mb"], 1.5),
        runtime=grows_with_attempt(RES["latent_flow"]["runtime"], 2),
        gpu=job_gpus(RES["latent_flow"]),
        nodes=RES["latent_flow"]["nodes"],
    params:
        run=run_settings("latent_flow"),
        out=lambda wc, output: os.path.dirname(output.weights),
        ckpt=untracked(lambda wc: f"{CHECKPOINTS}/latent_flow"),
        launch=get_launcher,
        workers=get_data_workers,
        text_flag=FLOW_TEXT_FLAG,
    shell:
        "{params.launch} train latent_flow --config {input.config} --latents {input.latents}"
        " {params.text_flag} {input.text} --out {params.out} --checkpoints {params.ckpt}"
        " --data-workers {params.workers} --run-settings {params.run} > {log} 2>&1"


# the text-reliance probe, a job of its own: its held-out latents are the evaluation split's, so a change of
# evaluation.split probes again and never retrains the network (the same batches, seed and device as training's)
rule probe_latent_flow:
    input:
        config=expand(rules.train_config.output.config, model="latent_flow"),
        weights=rules.train_latent_flow.output.weights,
        latents=get_train_latents,
        probe=get_probe_latents,
        text=get_section_text,
    output:
        json=f"{R}/models/latent_flow/text_reliance.json",
    log:
        f"{R}/logs/probe_latent_flow.log",
    benchmark:
        f"{R}/benchmarks/probe_latent_flow.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=grows_with_attempt(RES["latent_flow"]["mem_mb"], 1.5),
        runtime=grows_with_attempt(30, 2),
        gpu=min(RES["latent_flow"]["gpu"], 1),  # one process
    params:
        run=run_settings("latent_flow"),
        network=lambda wc, input: os.path.dirname(input.weights),
        text_flag=FLOW_TEXT_FLAG,
        probe=lambda wc, input: f"--probe-latents {input.probe}" if input.probe else "",
    shell:
        "ctgen probe-latent-flow --config {input.config} --network {params.network} --latents {input.latents}"
        " {params.probe} {params.text_flag} {input.text} --out {output.json}"
        " --run-settings {params.run} > {log} 2>&1"


rule latent_flow_spec:
    input:
        autoencoder=rules.train_autoencoder.output.weights,
        flow=rules.train_latent_flow.output.weights,
        latents=get_train_latents,
        manifests=get_train_manifests,
        text=get_section_text,
    output:
        spec=f"{R}/models/latent_flow.json",
    log:
        f"{R}/logs/latent_flow_spec.log",
    benchmark:
        f"{R}/benchmarks/latent_flow_spec.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        code=script_digest("latent_flow_spec.py"),
        preset=PRESET,
        models=FLOW_SETTINGS,
        # the steps resolved as the sampling job takes them (`ctgen sample` by hand reads this spec)
        sampling=canonical({**config["sampling"]["latent_flow"], "steps": FLOW_STEPS}),
        prompts=config["prompts"],
        encoders=FLOW_TEXT_ENCODERS,
    script:
        "../scripts/latent_flow_spec.py"


rule sample_latent_flow:
    input:
        spec=rules.latent_flow_spec.output.spec,
        prompts=rules.sample_prompts.output.csv,
    output:
        manifest=f"{R}/samples/latent_flow/samples.csv",
    log:
        f"{R}/logs/sample_latent_flow.log",
    benchmark:
        f"{R}/benchmarks/sample_latent_flow.tsv"
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
        s={
            k: config["sampling"][k]
            for k in ("seed", "per_prompt", "latent_flow", "dicom")
        },
        dicom=lambda wc, output: (
            f"--dicom {os.path.dirname(output.manifest)}/dicom"
            if config["sampling"]["dicom"]
            else ""
        ),
        steps=f"--steps {FLOW_STEPS}" if FLOW_STEPS else "",
    shell:
        "ctgen sample --family latent_flow --models {params.models} --prompts {input.prompts}"
        " --out-dir {params.out} --seed {params.s[seed]} --per-prompt {params.s[per_prompt]} {params.steps}"
        " --guidance-scale {params.s[latent_flow][guidance_scale]} {params.dicom} > {log} 2>&1"
