rule train_clip:
    input:
        config=f"{R}/models/clip.yaml",
        manifests=TRAIN_MANIFESTS,
        text=TEXT_INPUT,
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
        mem_mb=RES["clip"]["mem_mb"],
        runtime=RES["clip"]["runtime"],
        gpu=RES["clip"]["gpu"],
        nodes=RES["clip"].get("nodes", 1),
    params:
        out=lambda wc, output: os.path.dirname(output.weights),
        ckpt=f"{CHECKPOINTS}/clip",
        launch=get_launcher,
        text_flag=TEXT_FLAG,
    shell:
        "{params.launch} train clip --config {input.config} --manifests {input.manifests}"
        " {params.text_flag} {input.text} --out {params.out} --checkpoints {params.ckpt} > {log} 2>&1"


rule train_classifier:
    input:
        config=f"{R}/models/classifier.yaml",
        manifests=TRAIN_MANIFESTS,
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
        mem_mb=RES["classifier"]["mem_mb"],
        runtime=RES["classifier"]["runtime"],
        gpu=RES["classifier"]["gpu"],
        nodes=RES["classifier"].get("nodes", 1),
    params:
        out=lambda wc, output: os.path.dirname(output.weights),
        ckpt=f"{CHECKPOINTS}/classifier",
        launch=get_launcher,
    shell:
        "{params.launch} train classifier --config {input.config} --manifests {input.manifests}"
        " --out {params.out} --checkpoints {params.ckpt} > {log} 2>&1"


rule evaluate:
    input:
        samples=rules.sample.output.manifest,
        reference=EVAL_MANIFESTS,
        clip=rules.train_clip.output.weights,
        classifier=rules.train_classifier.output.weights,
        classifier_config=f"{R}/models/classifier.yaml",
        text=TEXT_INPUT,
    output:
        metrics=f"{R}/evaluation/metrics.json",
        per_volume=f"{R}/evaluation/per_volume.csv",
        histograms=f"{R}/evaluation/hu_histograms.json",
    log:
        f"{R}/logs/evaluate.log",
    benchmark:
        f"{R}/benchmarks/evaluate.tsv"
    conda:
        "../../envs/train.yaml"
    threads: config["evaluation"]["resources"]["threads"]
    resources:
        mem_mb=config["evaluation"]["resources"]["mem_mb"],
        runtime=config["evaluation"]["resources"]["runtime"],
        gpu=config["evaluation"]["resources"]["gpu"],
    params:
        evaluation=config["evaluation"],
        text=get_eval_text,
        window=PRESET["clip"],
        ckpt=f"{CHECKPOINTS}/tstr",
    script:
        "../scripts/evaluate.py"


rule guidance_sweep:
    input:
        spec=rules.cascade.output.spec,
        prompts=rules.sample_prompts.output.csv,
        reference=EVAL_MANIFESTS,
        clip=rules.train_clip.output.weights,
        classifier=rules.train_classifier.output.weights,
        text=TEXT_INPUT,
    output:
        csv=f"{R}/evaluation/guidance_sweep.csv",
    log:
        f"{R}/logs/guidance_sweep.log",
    benchmark:
        f"{R}/benchmarks/guidance_sweep.tsv"
    conda:
        "../../envs/train.yaml"
    threads: config["evaluation"]["resources"]["threads"]
    resources:
        mem_mb=config["evaluation"]["resources"]["mem_mb"],
        runtime=config["evaluation"]["resources"]["runtime"],
        gpu=config["evaluation"]["resources"]["gpu"],
    params:
        scales=config["evaluation"]["guidance_scales"],
        sampling=config["sampling"],
        evaluation=config["evaluation"],
        text=get_eval_text,
        window=PRESET["clip"],
    script:
        "../scripts/guidance_sweep.py"
