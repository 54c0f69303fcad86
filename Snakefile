# ctgen: CT-RATE / DICOM chest CT -> HU volumes -> prompts -> shards -> models -> samples, metrics, figures.
# Run: snakemake --workflow-profile workflow/profiles/local   (see README.md)
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/cohort.smk"
include: "workflow/rules/dicom.smk"
include: "workflow/rules/prep.smk"
include: "workflow/rules/reports.smk"
include: "workflow/rules/prompts.smk"
include: "workflow/rules/shards.smk"
include: "workflow/rules/rejects.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/latent.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/figures.smk"


wildcard_constraints:
    split="|".join(SPLITS),
    chunk=r"\d+",
    model="|".join([*MODEL_PRESET, "tstr"]),
    family="|".join(GENERATOR_FAMILIES),
    scale="|".join(re.escape(s) for s in GUIDANCE_SCALES),
    encoder=r"\d+",


# bookkeeping that takes seconds runs in the Snakemake process itself, never queued on Slurm
localrules:
    all,
    train_config,
    shard_manifest,
    tokens_manifest,
    recon_manifest,
    latents_manifest,
    latent_flow_spec,
    rejects,
    cascade,
    cascade_sampling,
    sample_prompts,
    tstr_prompts,
    slicenet_config,
    metric_tables,
    compare_families,


rule all:
    default_target: True
    input:
        expand(rules.shard_manifest.output.manifest, split=SPLITS),
        rules.rejects.output.csv,
        rules.prompts.output.table,
        rules.label_agreement.output.markdown,
        rules.evaluate_labeller.output.table if LABELLER_EVAL else [],
        rules.dicom2nifti.output.metadata if DICOM else [],
        rules.sample.output.manifest if CASCADE else [],
        expand(rules.evaluate.output.metrics, family=GENERATORS),
        rules.compare_families.output.json,
        rules.guidance_sweep.output.csv if CASCADE else [],
        rules.figures.output,
        rules.metric_tables.output,
        rules.sample_latent_flow.output.manifest if LATENT else [],
        get_every_job(),
