from ctgen.jobs.figure_list import (
    FIGURES,
)  # name -> report category: the one list of the figures


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
        metrics=rules.evaluate.output.metrics,
        per_volume=rules.evaluate.output.per_volume,
        histograms=rules.evaluate.output.histograms,
        sweep=rules.guidance_sweep.output.csv,
    output:
        **{
            name: report(
                f"{R}/figures/{name}.png",
                caption=f"../report/{name}.rst",
                category=category,
                labels={"figure": name.replace("_", " ")},
            )
            for name, category in FIGURES.items()
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
