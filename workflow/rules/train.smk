rule text_tokenizer:
    input:
        prompts=rules.prompts.output.table,
    output:
        tokenizer=f"{R}/text/tokenizer.json",
    log:
        f"{R}/logs/text_tokenizer.log",
    benchmark:
        f"{R}/benchmarks/text_tokenizer.tsv"
    priority: LONGEST_CHAIN
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        column=get_tokenizer_columns,
        vocab_size=config["models"]["text_encoder"]["vocab_size"],
        splits=MODELS["train_splits"],
    shell:
        "ctgen fit-text-tokenizer --prompts {input.prompts} --column {params.column}"
        " --vocab-size {params.vocab_size} --splits {params.splits} --out {output.tokenizer} > {log} 2>&1"


rule embed_prompts:
    input:
        prompts=rules.prompts.output.table,
        encoder=get_report_encoder,
        pretrained=get_encoder_files,
    output:
        cache=f"{R}/text/prompts.safetensors",
    log:
        f"{R}/logs/embed_prompts.log",
    benchmark:
        f"{R}/benchmarks/embed_prompts.tsv"
    priority: LONGEST_CHAIN
    conda:
        "../../envs/train.yaml"
    threads: 2
    resources:
        # the packed states of every distinct text, held once (CT-RATE's sections: ~7 GB): more on a retry
        mem_mb=grows_with_attempt(8000, 2),
        runtime=grows_with_attempt(60, 2),
        gpu=0,
    params:
        column=config["models"]["prompt"],
        encoder=get_encoder_config,
    shell:
        "ctgen embed-prompts --prompts {input.prompts} --column {params.column}"
        " --encoder '{params.encoder}' --out {output.cache} > {log} 2>&1"


rule train_config:
    output:
        config=f"{R}/models/{{model}}.yaml",
    log:
        f"{R}/logs/train_config/{{model}}.log",
    benchmark:
        f"{R}/benchmarks/train_config/{{model}}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        code=script_digest("train_config.py"),
        cfg=get_train_config,
        bookkeeping=untracked(get_train_bookkeeping),
        sample_defaults=untracked(get_sample_defaults),
    script:
        "../scripts/train_config.py"


rule train_report_encoder:
    input:
        config=expand(rules.train_config.output.config, model="report_encoder"),
        prompts=rules.prompts.output.table,
        labels=rules.parse_reports.output.labels,
        cohort=rules.cohort.output.table,
        tokenizer=rules.text_tokenizer.output.tokenizer,
    output:
        weights=f"{R}/models/report_encoder/model.safetensors",
        config=f"{R}/models/report_encoder/config.json",
    log:
        f"{R}/logs/train_report_encoder.log",
    benchmark:
        f"{R}/benchmarks/train_report_encoder.tsv"
    priority: LONGEST_CHAIN
    conda:
        "../../envs/train.yaml"
    threads: RES["report_encoder"]["threads"]
    resources:
        mem_mb=grows_with_attempt(RES["report_encoder"]["mem_mb"], 1.5),
        runtime=grows_with_attempt(RES["report_encoder"]["runtime"], 2),
        gpu=job_gpus(RES["report_encoder"]),
        nodes=RES["report_encoder"]["nodes"],
    params:
        run=run_settings("report_encoder"),
        out=lambda wc, output: os.path.dirname(output.weights),
        ckpt=untracked(lambda wc: f"{CHECKPOINTS}/report_encoder"),
        launch=get_launcher,
    shell:
        "{params.launch} train report_encoder --config {input.config} --prompts {input.prompts}"
        " --labels {input.labels} --cohort {input.cohort} --text-tokenizer {input.tokenizer}"
        " --out {params.out} --checkpoints {params.ckpt} --run-settings {params.run} > {log} 2>&1"


rule train_tokenizer:
    input:
        config=expand(rules.train_config.output.config, model="tokenizer"),
        manifests=weighed(get_train_manifests),
    output:
        weights=f"{R}/models/tokenizer/model.safetensors",
        config=f"{R}/models/tokenizer/config.json",
    log:
        f"{R}/logs/train_tokenizer.log",
    benchmark:
        f"{R}/benchmarks/train_tokenizer.tsv"
    priority: LONGEST_CHAIN
    conda:
        "../../envs/train.yaml"
    threads: RES["tokenizer"]["threads"]
    resources:
        mem_mb=grows_with_attempt(RES["tokenizer"]["mem_mb"], 1.5),
        runtime=grows_with_attempt(RES["tokenizer"]["runtime"], 2),
        gpu=job_gpus(RES["tokenizer"]),
        nodes=RES["tokenizer"]["nodes"],
    params:
        shards=shard_content("tokenizer"),
        run=run_settings("tokenizer"),
        out=lambda wc, output: os.path.dirname(output.weights),
        ckpt=untracked(lambda wc: f"{CHECKPOINTS}/tokenizer"),
        launch=get_launcher,
        workers=get_data_workers,
    shell:
        "{params.launch} train tokenizer --config {input.config} --manifests {input.manifests}"
        " --out {params.out} --checkpoints {params.ckpt}"
        " --data-workers {params.workers} --run-settings {params.run} > {log} 2>&1"


rule encode_tokens:
    input:
        weights=rules.train_tokenizer.output.weights,
        shards=rules.shards.output.shards,
    output:
        tokens=directory(f"{R}/tokens/{{split}}/c{{chunk}}"),
    log:
        f"{R}/logs/encode_tokens/{{split}}-{{chunk}}.log",
    benchmark:
        f"{R}/benchmarks/encode_tokens/{{split}}-{{chunk}}.tsv"
    priority: LONGEST_CHAIN
    conda:
        "../../envs/train.yaml"
    threads: RES["tokenizer"]["threads"]  # the tokenizer's job, on its resources
    resources:
        mem_mb=grows_with_attempt(RES["tokenizer"]["mem_mb"], 1.5),  # the model's job's memory, more on a retry
        runtime=grows_with_attempt(120, 2),
        gpu=0,  # the Slurm profile gives it one
    params:
        tokenizer=lambda wc, input: os.path.dirname(input.weights),
        manifest=get_chunk_manifest,
        scale=config["models"]["lowres_scale"],
        window=PRESET["clip"],
    shell:
        "ctgen encode-tokens --tokenizer {params.tokenizer} --manifest {params.manifest}"
        " --out {output.tokens} --lowres-scale {params.scale}"
        " --hu-window {params.window[0]} {params.window[1]} > {log} 2>&1"


rule tokens_manifest:
    input:
        chunks=expand(
            rules.encode_tokens.output.tokens, chunk=CHUNKS, allow_missing=True
        ),
    output:
        manifest=f"{R}/tokens/{{split}}/manifest.json",
    log:
        f"{R}/logs/encode_tokens/{{split}}-manifest.log",
    benchmark:
        f"{R}/benchmarks/encode_tokens/{{split}}-manifest.tsv"
    priority: LONGEST_CHAIN
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=script_digest("derived_manifest.py"),
        kind="tokens",
    script:
        "../scripts/derived_manifest.py"


# the tokenizer's reconstructions, super-resolution's low-res inputs where models.superres_lowres is
# "reconstruction" (as GenerateCT): token shards with recon.npy, in a set of their own, so that switching the
# setting retrains super-resolution alone, not the generator (its token shards stay as they are)
rule encode_recon:
    input:
        weights=rules.train_tokenizer.output.weights,
        shards=rules.shards.output.shards,
    output:
        recon=directory(f"{R}/recon/{{split}}/c{{chunk}}"),
    log:
        f"{R}/logs/encode_recon/{{split}}-{{chunk}}.log",
    benchmark:
        f"{R}/benchmarks/encode_recon/{{split}}-{{chunk}}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: RES["tokenizer"]["threads"]  # the tokenizer's job, on its resources
    resources:
        mem_mb=grows_with_attempt(RES["tokenizer"]["mem_mb"], 1.5),  # the model's job's memory, more on a retry
        runtime=grows_with_attempt(120, 2),
        gpu=0,  # the Slurm profile gives it one
    params:
        tokenizer=lambda wc, input: os.path.dirname(input.weights),
        manifest=get_chunk_manifest,
        scale=config["models"]["lowres_scale"],
        window=PRESET["clip"],
    shell:
        "ctgen encode-tokens --tokenizer {params.tokenizer} --manifest {params.manifest}"
        " --out {output.recon} --lowres-scale {params.scale} --recon"
        " --hu-window {params.window[0]} {params.window[1]} > {log} 2>&1"


rule recon_manifest:
    input:
        chunks=expand(rules.encode_recon.output.recon, chunk=CHUNKS, allow_missing=True),
    output:
        manifest=f"{R}/recon/{{split}}/manifest.json",
    log:
        f"{R}/logs/encode_recon/{{split}}-manifest.log",
    benchmark:
        f"{R}/benchmarks/encode_recon/{{split}}-manifest.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=script_digest("derived_manifest.py"),
        kind="tokens",
    script:
        "../scripts/derived_manifest.py"


rule train_generator:
    input:
        config=expand(rules.train_config.output.config, model="generator"),
        tokens=get_train_tokens,
        text=get_text,
    output:
        weights=f"{R}/models/generator/model.safetensors",
        config=f"{R}/models/generator/config.json",
    log:
        f"{R}/logs/train_generator.log",
    benchmark:
        f"{R}/benchmarks/train_generator.tsv"
    priority: LONGEST_CHAIN
    conda:
        "../../envs/train.yaml"
    threads: RES["generator"]["threads"]
    resources:
        mem_mb=grows_with_attempt(RES["generator"]["mem_mb"], 1.5),
        runtime=grows_with_attempt(RES["generator"]["runtime"], 2),
        gpu=job_gpus(RES["generator"]),
        nodes=RES["generator"]["nodes"],
    params:
        run=run_settings("generator"),
        out=lambda wc, output: os.path.dirname(output.weights),
        ckpt=untracked(lambda wc: f"{CHECKPOINTS}/generator"),
        launch=get_launcher,
        workers=get_data_workers,
        text_flag=TEXT_FLAG,
    shell:
        "{params.launch} train generator --config {input.config} --tokens {input.tokens}"
        " {params.text_flag} {input.text} --out {params.out} --checkpoints {params.ckpt}"
        " --data-workers {params.workers} --run-settings {params.run} > {log} 2>&1"


rule train_superres:
    input:
        config=expand(rules.train_config.output.config, model="superres"),
        manifests=get_train_manifests,
        text=get_text,
        recon=get_superres_recon,
    output:
        weights=f"{R}/models/superres/model.safetensors",
        config=f"{R}/models/superres/config.json",
    log:
        f"{R}/logs/train_superres.log",
    benchmark:
        f"{R}/benchmarks/train_superres.tsv"
    conda:
        "../../envs/train.yaml"
    threads: RES["superres"]["threads"]
    resources:
        mem_mb=grows_with_attempt(RES["superres"]["mem_mb"], 1.5),
        runtime=grows_with_attempt(RES["superres"]["runtime"], 2),
        gpu=job_gpus(RES["superres"]),
        nodes=RES["superres"]["nodes"],
    params:
        run=run_settings("superres"),
        out=lambda wc, output: os.path.dirname(output.weights),
        ckpt=untracked(lambda wc: f"{CHECKPOINTS}/superres"),
        launch=get_launcher,
        workers=get_data_workers,
        text_flag=TEXT_FLAG,
        recon_flag=lambda wc, input: f"--recon {input.recon}" if input.recon else "",
    shell:
        "{params.launch} train superres --config {input.config} --manifests {input.manifests}"
        " {params.text_flag} {input.text} {params.recon_flag}"
        " --out {params.out} --checkpoints {params.ckpt}"
        " --data-workers {params.workers} --run-settings {params.run} > {log} 2>&1"


rule train_clip:
    input:
        config=expand(rules.train_config.output.config, model="clip"),
        manifests=get_train_manifests,
        text=get_text,
    output:
        weights=f"{R}/models/clip/model.safetensors",
        config=f"{R}/models/clip/config.json",
    log:
        f"{R}/logs/train_clip.log",
    benchmark:
        f"{R}/benchmarks/train_clip.tsv"
    conda:
        "../../envs/train.yaml"
    threads: RES["clip"]["threads"]
    resources:
        mem_mb=grows_with_attempt(RES["clip"]["mem_mb"], 1.5),
        runtime=grows_with_attempt(RES["clip"]["runtime"], 2),
        gpu=job_gpus(RES["clip"]),
        nodes=RES["clip"]["nodes"],
    params:
        run=run_settings("clip"),
        out=lambda wc, output: os.path.dirname(output.weights),
        ckpt=untracked(lambda wc: f"{CHECKPOINTS}/clip"),
        launch=get_launcher,
        workers=get_data_workers,
        text_flag=TEXT_FLAG,
    shell:
        "{params.launch} train clip --config {input.config} --manifests {input.manifests}"
        " {params.text_flag} {input.text} --out {params.out} --checkpoints {params.ckpt}"
        " --data-workers {params.workers} --run-settings {params.run} > {log} 2>&1"


rule train_classifier:
    input:
        config=expand(rules.train_config.output.config, model="classifier"),
        manifests=weighed(get_train_manifests),
    output:
        weights=f"{R}/models/classifier/model.safetensors",
        config=f"{R}/models/classifier/config.json",
    log:
        f"{R}/logs/train_classifier.log",
    benchmark:
        f"{R}/benchmarks/train_classifier.tsv"
    conda:
        "../../envs/train.yaml"
    threads: RES["classifier"]["threads"]
    resources:
        mem_mb=grows_with_attempt(RES["classifier"]["mem_mb"], 1.5),
        runtime=grows_with_attempt(RES["classifier"]["runtime"], 2),
        gpu=job_gpus(RES["classifier"]),
        nodes=RES["classifier"]["nodes"],
    params:
        shards=shard_content("classifier"),
        run=run_settings("classifier"),
        out=lambda wc, output: os.path.dirname(output.weights),
        ckpt=untracked(lambda wc: f"{CHECKPOINTS}/classifier"),
        launch=get_launcher,
        workers=get_data_workers,
    shell:
        "{params.launch} train classifier --config {input.config} --manifests {input.manifests}"
        " --out {params.out} --checkpoints {params.ckpt}"
        " --data-workers {params.workers} --run-settings {params.run} > {log} 2>&1"
