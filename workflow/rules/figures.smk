FIGURE_CATEGORY = {  # figure -> its category in the report (snakemake --report)
    "samples": "Samples",
    "training_curves": "Training",
    "metrics_summary": "Metrics",
    "faithfulness": "Metrics",
    "tstr": "Metrics",
    "per_volume": "Metrics",
    "hu_histograms": "HU checks",
    "guidance_sweep": "Guidance sweep",
}


rule figures:
    input:
        samples=rules.sample.output.manifest,
        valid=expand(
            rules.shard_manifest.output.manifest, split=config["sampling"]["split"]
        ),
        tokenizer=rules.train_tokenizer.output.weights,
        generator=rules.train_generator.output.weights,
        superres=rules.train_superres.output.weights,
        clip=rules.train_clip.output.weights,
        classifier=rules.train_classifier.output.weights,
        metrics=f"{R}/evaluation/metrics.json",
        per_volume=f"{R}/evaluation/per_volume.csv",
        histograms=f"{R}/evaluation/hu_histograms.json",
        sweep=f"{R}/evaluation/guidance_sweep.csv",
    output:
        **{
            name: report(
                f"{R}/figures/{name}.png",
                caption=f"../report/{name}.rst",
                category=category,
                labels={"figure": name.replace("_", " ")},
            )
            for name, category in FIGURE_CATEGORY.items()
        },
    log:
        f"{R}/logs/figures.log",
    benchmark:
        f"{R}/benchmarks/figures.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=15,
    params:
        figures=config["figures"],
    script:
        "../scripts/figures.py"
