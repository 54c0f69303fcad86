from ctgen.jobs.figure_list import (
    FIGURES,
    TABLES,
)  # name -> report category: the one list of the figures and tables


rule figures:
    input:
        unpack(get_family_runs),
        unpack(get_trained_weights),
        valid=expand(
            rules.shard_manifest.output.manifest, split=config["sampling"]["split"]
        ),
        families=rules.compare_families.output.json,
        sweep=rules.guidance_sweep.output.csv if CASCADE else [],
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
        runtime=grows_with_attempt(15, 2),
    params:
        code=script_digest("figures.py"),
        figures=config["figures"],
        families=GENERATORS,
    script:
        "../scripts/figures.py"


rule metric_tables:
    input:
        unpack(get_family_runs),
        families=rules.compare_families.output.json,
        sweep=rules.guidance_sweep.output.csv if CASCADE else [],
        text_reliance=rules.probe_latent_flow.output.json if LATENT else [],
        faithfulness=rules.figures.output.faithfulness,
    output:
        **{
            f"{name}_{kind}": report(
                f"{R}/tables/{name}_table.{kind}",
                caption=f"../report/table_{name}.rst",
                category=category,
                labels={"table": name.replace("_", " "), "format": kind},
            )
            for name, (category, _) in TABLES.items()
            for kind in ("html", "csv")
        },
        **{f"{name}_caption": f"{R}/report/{name}.rst" for name in TABLES},
        intro=f"{R}/report/intro.rst",
    log:
        f"{R}/logs/metric_tables.log",
    benchmark:
        f"{R}/benchmarks/metric_tables.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=script_digest("metric_tables.py"),
        families=GENERATORS,
    script:
        "../scripts/metric_tables.py"
