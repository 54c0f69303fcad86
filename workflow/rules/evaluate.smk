rule evaluate:
    input:
        samples=rules.sample.output.manifest,
        reference=get_eval_manifests,
        clip=rules.train_clip.output.weights,
        classifier=rules.train_classifier.output.weights,
        classifier_config=expand(rules.train_config.output.config, model="classifier"),
        text=get_text,
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
        reference=get_eval_manifests,
        clip=rules.train_clip.output.weights,
        classifier=rules.train_classifier.output.weights,
        text=get_text,
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
