# Config validation, the values rules read and the input functions; logic lives in the packages.
import hashlib
import json
import os
import re
import shlex
import sys
from pathlib import Path

import jsonschema
from snakemake.cli import get_argument_parser
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from ctgen.jobs.config import SHARD_READS, flow_text_encoders
from ctgen.jobs.eval_config import in_canonical_order, scoring_settings
from ctgen.jobs.geometry import GeometryError, check_geometry
from ctgen.jobs.workflow_config import (
    Settings,
    canonical,
    check_local_files,
    check_splits,
    dag_filtered,
    local_files,
    number_hint,
)
from ctgen.training.loop import RUN_ONLY
from ctprep.cohort import chunk_digest
from ctprep.ctrate import dataset_tables, volumes_digest
from ctprep.intensity import check_window
from ctprep.prompts import template_fields
from ctprep.shards import content_digest, tree_digest

# a config error is one line naming the key (Snakemake's own message dumps the whole subschema)
try:
    validate(config, "../schemas/config.schema.yaml")
except WorkflowError as err:
    bad = err.__context__
    if not isinstance(bad, jsonschema.ValidationError):
        raise
    where = ".".join(map(str, bad.absolute_path)) or "(top level)"
    types = bad.validator_value if bad.validator == "type" else None
    sys.exit(f"config {where}: {bad.message}{number_hint(bad.instance, types)}")


for _key in list(config):
    config[_key] = canonical(config[_key])

R = config["results"]
SPLITS = config["dataset"]["splits"]
CHUNKS = [f"{i:03d}" for i in range(config["prep"]["n_chunks"])]


def check_preset(section, table):
    """One line naming the choices when `<section>.preset` is not a key of `table`."""
    name = config[section]["preset"]
    if name not in config[table]:
        sys.exit(
            f"config error: {section}.preset {name!r} is not among {table}: {sorted(config[table])}"
        )


def check_prompts():
    """`shards.prompt` and `models.prompt` name a prompt the prompts rule writes, and every template's fields
    are report fields (one line, before any job: a misspelt `{agee}` failed in the prompts job).
    """
    for name, template in config["prompts"]["templates"].items():
        try:
            template_fields(template)
        except ValueError as err:
            sys.exit(f"config error: prompts.templates.{name}: {err}")
    names = list(config["prompts"]["templates"])
    if config["prompts"]["structured"]["enabled"]:
        names.append("structured")
    for key, name in (
        ("shards.prompt", config["shards"]["prompt"]),
        ("models.prompt", config["models"]["prompt"]),
    ):
        if name not in names:
            hint = (
                " (prompts.structured.enabled is false)" if name == "structured" else ""
            )
            sys.exit(
                f"config error: {key} {name!r} is not a prompt the workflow writes{hint}: one of {names}"
            )


def check_ranges():
    """Each [low, high] of the config in order (one line, before any job): an inverted HU window clipped
    every voxel to its first bound (the window's rule is the prep code's own, check_window).
    """
    for name, preset in config["presets"].items():
        try:
            check_window(*preset["clip"])
        except ValueError as err:
            sys.exit(f"config error: presets.{name}.clip: {err}")
    for key in ("slices", "fov_mm", "z_spacing_mm"):
        lo, hi = config["demo"].get(key, (0, 0))
        if lo > hi:
            sys.exit(
                f"config error: demo.{key} [{lo}, {hi}]: the low bound must not be above the high one"
            )


check_ranges()
check_preset("prep", "presets")
check_preset("models", "model_presets")
check_prompts()
try:  # the prep grid and every model's sizes fit together
    check_geometry(config)
except GeometryError as err:
    sys.exit(f"config error: {err}")  # one line naming the keys and a fix, no traceback


for check in (check_local_files, check_splits):
    try:
        check(config)
    except ValueError as err:
        sys.exit(f"config error: {err}")  # one line naming the key, no traceback


def training_sections():
    """(config key, train section, resources or None) of every training the config sets: the preset's models
    (their resources: models.resources.<model>) and the slice network."""
    name = config["models"]["preset"]
    out = [
        (
            f"model_presets.{name}.{model}",
            section["train"],
            config["models"]["resources"].get(model),
        )
        for model, section in config["model_presets"][name].items()
        if isinstance(section, dict) and "train" in section
    ]
    slicenet = config["evaluation"].get("slicenet") or {}
    if "train" in slicenet:
        out.append(
            ("evaluation.slicenet", slicenet["train"], slicenet.get("resources"))
        )
    return out


def check_settings():
    """The training and scoring settings in range (the schema checks their types): a training preset's
    `max_steps: -1` or an unknown faithfulness label failed in the job, after the jobs before it ran.
    """
    from ctgen.jobs.eval_config import EvalConfig
    from ctgen.training.loop import TrainConfig

    name = config["models"]["preset"]
    for key, train, _ in training_sections():
        try:
            TrainConfig.from_dict(train)
        except ValueError as err:
            sys.exit(f"config error: {key}.train: {err}")
    try:
        EvalConfig.from_dict(scoring_settings(config["evaluation"]))
    except ValueError as err:
        sys.exit(f"config error: {err}")  # names its evaluation.<key>
    # the encode window reaches no job before encode_latents, which refused a bad one after the autoencoder trained
    autoencoder = config["model_presets"][name].get("autoencoder", {}).get("model", {})
    if autoencoder.get("encode_window") is not None:
        from ctgen.models.autoencoder import MaisiAutoencoder

        try:
            MaisiAutoencoder.config_from_dict(autoencoder)
        except ValueError as err:
            sys.exit(f"config error: model_presets.{name}.autoencoder.model: {err}")


check_settings()
PRESET = config["presets"][config["prep"]["preset"]]
DEMO = config.get("demo", {}).get("enabled", False)
# --until or --omit-from: the cohort is a plain rule then (workflow/rules/cohort.smk says why)
DAG_FILTERED = dag_filtered(sys.argv[1:], get_argument_parser)
DICOM = bool(config.get("dicom", {}).get("series_dir"))
EVAL_JSONL = config["reports"]["eval_jsonl"]
LABELLER_EVAL = bool(EVAL_JSONL and Path(EVAL_JSONL).is_file())


def get_dataset_root(wildcards):
    """The demo rule's output when the demo is on; a real CT-RATE copy needs no rule, and its date is not compared
    (ancient): any file added at the folder's top (a note, a download's partial file) changed it, and the cohort
    and every prep chunk after it reran. Its tables (get_dataset_tables) and its volumes by name and size
    (get_volumes_digest) decide instead."""
    return rules.demo_cohort.output.root if DEMO else ancient(config["dataset"]["root"])


def get_dataset_tables(wildcards):
    """A real copy's tables (reports, metadata, labels, no-chest lists): a corrected CSV reruns the cohort
    (the root folder's mtime does not change with them). The demo's lie inside its output folder.
    """
    if DEMO:
        return []
    return [str(p) for p in dataset_tables(config["dataset"]["root"], SPLITS)]


def get_volumes_digest(wildcards):
    """A real copy's volume files by name and size: volumes downloaded since (or removed) rerun the cohort."""
    return "" if DEMO else volumes_digest(config["dataset"]["root"], SPLITS)


def get_prep_rows(wildcards):
    """A digest of the cohort rows a prep chunk reads (ctprep.cohort.prep_rows): its cohort input is ancient, so
    a cohort rerun prepares again the chunks whose volumes or metadata changed, not all of them. The cohort is a
    checkpoint: the prep jobs are made again, and this read again, once it has run ("" before a first cohort).
    """
    table = rules.cohort.output.table
    return chunk_digest(table, int(wildcards.chunk)) if os.path.exists(table) else ""


def get_prompt_mentions(wildcards):
    """The parsed mentions when the structured prompt is on (it is built from them)."""
    return (
        rules.parse_reports.output.mentions
        if config["prompts"]["structured"]["enabled"]
        else []
    )


# --- models -------------------------------------------------------------------------------
MODELS = config["models"]
RES = MODELS["resources"]
# What the spec jobs read of `models` (Snakemake reruns a job whose params changed: only the keys a job reads)
CASCADE_SETTINGS = canonical(
    {k: MODELS[k] for k in ("text_encoder", "lowres_scale", "prompt")}
)
FLOW_SETTINGS = canonical({"text_encoder": MODELS["text_encoder"]})


# Snakemake's `code` trigger reruns each script job whose script file is newer than its outputs. A fresh clone of
# the same commit, a branch checkout or a touch dates every script anew (a clone's dry run over finished results
# planned all 60 jobs of the tiny demo), so the profiles leave `code` out of their rerun triggers, and each script
# job tracks its script's content instead (`code=script_digest(...)`): an edit of a script reruns its jobs.
# A shell command is no longer compared either; what it runs is package code (ctgen, ctprep), which no trigger
# compares: the results record it (git hash, source sha256), and `snakemake -R NAME` reruns what a change affects.
SCRIPTS = Path(workflow.basedir) / "workflow" / "scripts"


def script_digest(name):
    """sha256 (16 hex) of `workflow/scripts/<name>`: a params value that changes with the script's content only."""
    return hashlib.sha256((SCRIPTS / name).read_bytes()).hexdigest()[:16]


def untracked(value):
    """A params function for a value that decides where or how fast a job works, not what it writes (a
    checkpoint folder, a batch size of a parser): its edit reruns nothing. Snakemake leaves params functions
    that take `output` out of its params trigger; `value(wildcards)` gives the value."""
    return lambda wildcards, output: value(wildcards)


def job_gpus(res):
    """A job's GPUs as Slurm counts them (sbatch --gpus: the whole job's), from a resources entry's GPUs per node."""
    return res["gpu"] * res.get("nodes", 1)


def check_gpus():
    """A training job's GPUs and processes come from its resources, which a profile's (or the command line's)
    set-resources replace: where they differ from models.resources.<model>.gpu > 1, the job would train on
    fewer GPUs than the config asks, silently. One line instead."""
    given = getattr(workflow.resource_settings, "overwrite_resources", None) or {}
    for model, res in RES.items():
        want = job_gpus(res)  # the job's total, as sbatch --gpus takes it
        got = (given.get(f"train_{model}") or {}).get("gpu")
        got = getattr(got, "value", got)  # Snakemake's Resource, or a plain value
        if want > 1 and got is not None and int(got) != want:
            nodes = res.get("nodes", 1)
            per = f" ({res['gpu']} per node x {nodes} nodes)" if nodes > 1 else ""
            sys.exit(
                f"config error: models.resources.{model}.gpu asks for {want} GPUs{per}, but set-resources gives "
                f"train_{model} gpu={got} (the profile or --set-resources), which the job would run with: set it to {want}"
            )
    # the loop divides grad_accum over the job's processes and refused an uneven split only when the job started,
    # after its queueing and the jobs before it
    from ctgen.training.launch import check_grad_accum, processes

    for key, train, res in training_sections():
        if res is None:
            continue
        gpu, nodes = res.get("gpu", 0), res.get("nodes", 1)
        how = f" (gpu {gpu} per node x {nodes} nodes)"
        try:
            check_grad_accum(train.get("grad_accum", 1), processes(gpu, nodes), how)
        except ValueError as err:
            sys.exit(f"config error: {key}.train.{err}")


check_gpus()
# the cascade's sampling settings: without the latent flow family's (an edit of those reruns only that family) and
# without the super-resolution batch, which changes no volume beyond rounding (a user lowers it after an
# out-of-memory error: it re-sampled every cascade volume and the guidance sweep); it reaches the jobs untracked
# model fields that set how a trained model samples by default, not what it trains: out of the training params (an
# edit re-samples and retrains nothing; the training config file still carries them, untracked), and the sampling
# jobs take the preset's current value where the sampling section leaves theirs null
SAMPLE_ONLY = ("sample_steps",)
# the autoencoder's encode window: a setting of the encode_latents jobs alone (encode_flags), in neither the training
# params nor its config file, so an edit re-encodes and retrains no autoencoder
ENCODE_ONLY = ("encode_window", "encode_overlap")


def preset_sample_steps(model):
    """The preset's `sample_steps` of `model` (None: the model's own default)."""
    preset = config["model_presets"][MODELS["preset"]].get(model, {})
    return preset.get("model", {}).get("sample_steps")


SAMPLING = canonical(
    {
        **{
            k: v
            for k, v in config["sampling"].items()
            if k not in ("resources", "latent_flow", "batch_size")
        },
        "sr_steps": config["sampling"]["sr_steps"] or preset_sample_steps("superres"),
    }
)
FLOW_STEPS = config["sampling"]["latent_flow"]["steps"] or preset_sample_steps(
    "latent_flow"
)


def encode_flags():
    """`ctgen encode-latents`'s window flags from the preset's autoencoder (ENCODE_ONLY); a params entry
    tracked only where a window is set, so that results encoded whole before the option existed rerun nothing,
    while setting, editing or clearing one re-encodes."""
    model = MODEL_PRESET.get("autoencoder", {}).get("model", {})
    if model.get("encode_window") is None:
        return untracked(lambda wc: "")
    flags = "--encode-window " + " ".join(str(int(v)) for v in model["encode_window"])
    if "encode_overlap" in model:  # else the model's default
        flags += f" --encode-overlap {model['encode_overlap']}"
    return flags


SR_BATCH = untracked(lambda wc: config["sampling"]["batch_size"])
# what decides a cascade volume, not which prompts or where it goes: the spec's defaults, TSTR's and the sweep's sampler
SAMPLER = canonical(
    {
        k: SAMPLING[k]
        for k in (
            "seed",
            "steps",
            "guidance_scale",
            "temperature",
            "sr_steps",
        )
    }
)
# the cascade sampler's super-resolution steps as `ctgen sample` reads them (explicit: left out, `ctgen sample` took
# cascade_sampling.json's where the spec job had already written it)
SR_STEPS_FLAG = f"--sr-steps {SAMPLER['sr_steps']}" if SAMPLER["sr_steps"] else ""
# Scheduling priority of the tokenizer -> tokens -> generator chain (with its text inputs), the DAG's longest, and
# of the guidance sweep, the longest job after it: where cores are short (the demo's 2), they start first and the other
# jobs run beside them instead of after them.
LONGEST_CHAIN = 10
MODEL_PRESET = config["model_presets"][MODELS["preset"]]
CHECKPOINTS = MODELS["checkpoints"]
SMALL_TEXT = MODELS["text_encoder"]["kind"] == "small"
# the latent flow family's text encoders: its own (latent_flow_text_encoders), or the cascade's
try:
    FLOW_TEXT_ENCODERS = canonical(flow_text_encoders(MODELS, MODEL_PRESET))
except ValueError as err:
    sys.exit(f"config error: {err}")  # one line naming the keys, no traceback
FLOW_SMALL_TEXT = FLOW_TEXT_ENCODERS[0]["kind"] == "small"
# the report encoder pretrained in this run (kind report_encoder without a path: rule train_report_encoder)
OWN_REPORT_ENCODERS = [
    e
    for e in [MODELS["text_encoder"], *FLOW_TEXT_ENCODERS]
    if e["kind"] == "report_encoder" and not e["path"]
]
OWN_REPORT_ENCODER = bool(OWN_REPORT_ENCODERS)
TEXT_FLAG = "--text-tokenizer" if SMALL_TEXT else "--text-cache"
FLOW_TEXT_FLAG = "--text-tokenizer" if FLOW_SMALL_TEXT else "--text-cache"
TEXT_ENCODER_MODELS = (
    "generator",
    "superres",
    "clip",
    "latent_flow",
)  # trained with the small text encoder
PROMPT_MODELS = (
    "generator",
    "superres",
    "clip",
    "latent_flow",
)  # trained on (volume, prompt) pairs
LOWRES_MODELS = ("tokenizer", "superres")  # trained on the grid / models.lowres_scale
GENERATOR_FAMILIES = ("cascade", "latent_flow")  # what models.generators may list
GENERATORS = MODELS.get("generators") or ["cascade"]
CASCADE = "cascade" in GENERATORS
LATENT = "latent_flow" in GENERATORS


def get_train_manifests(wildcards):
    """The shard manifests of the splits the models train on."""
    return expand(rules.shard_manifest.output.manifest, split=MODELS["train_splits"])


def weighed(manifests):
    """The training shard manifests of a model that weighs their contents (shard_content): ancient, so that shards
    written again with other prompts or reports do not retrain it; by date under --until/--omit-from, where the
    manifest is no checkpoint (shards.smk)."""
    return manifests if DAG_FILTERED else ancient(manifests)


def shard_content(model):
    """What `model`'s training reads of its shards (ctgen.jobs.config.SHARD_READS: the volumes, and the labels where
    it learns them, by shard in order: the sample order too), as a digest; read again when a manifest checkpoint has
    run ("" before a first manifest)."""
    return lambda wildcards: content_digest(
        get_train_manifests(wildcards), SHARD_READS[model]
    )


def get_text(wildcards):
    """The text side: the small encoder's fitted tokenizer, or a frozen encoder's cached states."""
    if SMALL_TEXT:
        return rules.text_tokenizer.output.tokenizer
    return rules.embed_prompts.output.cache


def _train_config(wildcards):
    """The model's preset (model, text_encoder, train) plus the data options, as plain data. ``tstr``: the
    classifier's recipe with evaluation.tstr_steps training steps (both TSTR classifiers train on few volumes).
    """
    model = "classifier" if wildcards.model == "tstr" else wildcards.model
    preset = json.loads(json.dumps(MODEL_PRESET[model]))  # a copy: no shared objects
    if wildcards.model == "tstr" and EVALUATION.get("tstr_steps"):
        preset["train"]["max_steps"] = EVALUATION["tstr_steps"]
    cfg = {"model": preset["model"], "train": preset["train"]}
    if preset.get(
        "maisi_checkpoint"
    ):  # the autoencoder: NVIDIA's weights instead of training
        cfg["maisi_checkpoint"] = preset["maisi_checkpoint"]
    # the report encoder: its learned positions (the vocabulary is its tokenizer's) and the reports it reads
    if (
        wildcards.model == "report_encoder"
    ):  # positions for the longest text any of its users keeps
        cfg["text_encoder"] = {
            "max_length": max(e["max_length"] for e in OWN_REPORT_ENCODERS)
        }
        cfg["data"] = {
            "splits": MODELS["train_splits"],
            "prompt": MODELS["prompt"],
            **preset.get("data", {}),
        }
        return canonical(cfg)
    text = FLOW_TEXT_ENCODERS[0] if model == "latent_flow" else MODELS["text_encoder"]
    if model in TEXT_ENCODER_MODELS and text["kind"] == "small":
        cfg["text_encoder"] = {
            **preset.get("text_encoder", {}),
            "vocab_size": MODELS["text_encoder"]["vocab_size"],
            "max_length": text["max_length"],
        }
    # only what the model's training reads: an edit of models.prompt retrains neither the tokenizer, the
    # classifier nor the autoencoder (nor what is built from them)
    data = {"hu_window": PRESET["clip"]}
    if model in LOWRES_MODELS:
        data["lowres_scale"] = MODELS["lowres_scale"]
    if model in PROMPT_MODELS:
        data["prompt"] = MODELS["prompt"]
    cfg["data"] = {**data, **preset.get("data", {})}
    return canonical(cfg)


def tracked(cfg):
    """A training config as params and file: without the fields that decide how the run works, not what it
    trains (ctgen.training.loop.RUN_ONLY: logging, checkpoint frequency, ...), which reach the training job
    through run_settings: their edit retrains nothing and applies to the next training, whatever starts it.
    """
    cfg = Settings(cfg)
    cfg["train"] = Settings(
        {k: v for k, v in cfg["train"].items() if k not in RUN_ONLY}
    )
    if (
        "model" in cfg
    ):  # and the model's sampling defaults (SAMPLE_ONLY), which the sampling jobs pass, and its encode window
        cfg["model"] = Settings(
            {
                k: v
                for k, v in cfg["model"].items()
                if k not in SAMPLE_ONLY + ENCODE_ONLY
            }
        )
    return cfg


def run_settings(model):
    """The RUN_ONLY fields of `model`'s training config as `ctgen train --run-settings` (untracked, read when
    the job is planned: a retraining that new data starts takes the current ones)."""

    def value(wildcards):
        if model == "slicenet":
            train = SLICENET["train"]
        else:
            train = MODEL_PRESET["classifier" if model == "tstr" else model]["train"]
        return shlex.quote(json.dumps(bookkeeping({"train": train}), sort_keys=True))

    return untracked(value)


def get_train_config(wildcards):
    return tracked(_train_config(wildcards))


def bookkeeping(cfg):
    """The RUN_ONLY fields of a training config: written into its file as well (so that `ctgen train --config`
    by hand runs as configured), untracked; the workflow's own training jobs get the current ones by
    run_settings."""
    return {k: v for k, v in cfg["train"].items() if k in RUN_ONLY}


def get_train_bookkeeping(wildcards):
    return bookkeeping(_train_config(wildcards))


def sample_defaults(cfg):
    """The SAMPLE_ONLY fields of a training config's model: written into its file as well, untracked."""
    return {k: v for k, v in cfg.get("model", {}).items() if k in SAMPLE_ONLY}


def get_sample_defaults(wildcards):
    return sample_defaults(_train_config(wildcards))


def get_launcher(wildcards, threads, resources):
    """`ctgen`, or torchrun (under srun across nodes) for the GPUs and nodes the job was given (its `gpu`
    resource is the job's total, see job_gpus), each process with its share of the job's threads.
    """
    from ctgen.training.launch import launch_prefix

    nodes = max(int(resources.nodes), 1)
    return launch_prefix(resources.gpu // nodes, nodes, threads)


def get_superres_recon(wildcards):
    """Tokenizer reconstructions as low-res inputs (as GenerateCT), or none: downsampled slices."""
    if (
        MODELS["superres_lowres"] == "reconstruction"
    ):  # their own shard set (rule encode_recon)
        return expand(
            rules.recon_manifest.output.manifest, split=MODELS["train_splits"]
        )
    return []


def get_train_tokens(wildcards):
    """The token shard manifests of the training splits (derived from their volume shards)."""
    return expand(rules.tokens_manifest.output.manifest, split=MODELS["train_splits"])


def get_report_encoder(wildcards):
    """The report encoder this run pretrains (its weights), where the frozen encoder is that one; else none."""
    return rules.train_report_encoder.output.weights if OWN_REPORT_ENCODER else []


def encoder_json(enc):
    """A text encoder's settings as JSON for an embedding job, with the path of the report encoder this run
    trains where it is that one. A function of the wildcards only, so that Snakemake tracks it: an edit of the
    encoder's settings re-embeds (and retrains what read the states)."""
    enc = dict(enc)
    if enc["kind"] == "report_encoder" and not enc.get("path"):
        enc["path"] = os.path.dirname(rules.train_report_encoder.output.weights)
    return json.dumps(enc, sort_keys=True)


def encoder_files(enc):
    """A frozen encoder's local files (kind hf, or a report encoder an earlier run trained), as inputs."""
    return (
        local_files(enc.get("path")) if enc["kind"] in ("hf", "report_encoder") else []
    )


def get_encoder_files(wildcards):
    """models.text_encoder's local files, for embed_prompts."""
    return encoder_files(MODELS["text_encoder"])


def get_section_encoder_files(wildcards):
    """The local files of the latent flow family's encoder number `encoder`, for embed_sections."""
    return encoder_files(FLOW_TEXT_ENCODERS[int(wildcards.encoder)])


def get_maisi_checkpoint(wildcards):
    """NVIDIA's MAISI autoencoder weights where the preset loads them instead of training (else none)."""
    return local_files((MODEL_PRESET.get("autoencoder") or {}).get("maisi_checkpoint"))


def get_encoder_config(wildcards):
    """models.text_encoder for embed_prompts."""
    return encoder_json(MODELS["text_encoder"])


def get_section_encoder_config(wildcards):
    """The latent flow family's encoder number `encoder` for embed_sections."""
    return encoder_json(FLOW_TEXT_ENCODERS[int(wildcards.encoder)])


def get_section_text(wildcards):
    """The latent flow's text side: the small encoder's tokenizer, or each frozen encoder's section states."""
    if FLOW_SMALL_TEXT:
        return rules.text_tokenizer.output.tokenizer
    return expand(
        rules.embed_sections.output.cache, encoder=range(len(FLOW_TEXT_ENCODERS))
    )


def get_train_latents(wildcards):
    """The latent shard manifests of the training splits (derived from their volume shards)."""
    return expand(rules.latents_manifest.output.manifest, split=MODELS["train_splits"])


def probe_splits():
    """The split whose latents the flow network's text-reliance probe scores as held out: the evaluation
    split, unless it is also trained on (then none: those rows would not be held out).
    """
    split = config["evaluation"]["split"]
    return [] if split in MODELS["train_splits"] else [split]


def get_probe_latents(wildcards):
    """The held-out latent shard manifests of the text-reliance probe (see probe_splits)."""
    return expand(rules.latents_manifest.output.manifest, split=probe_splits())


def get_tokenizer_columns(wildcards):
    """The prompt columns the small encoder's tokenizer is fitted on: every template (the latent flow family
    reads the report sections, whose words are in them), whichever families are trained, so that turning one
    family off or on does not refit the tokenizer and retrain the other. Sorted: the fit does not depend on
    their order (ctgen.models.text_encoders.fit_text_tokenizer), so neither does the job.
    """
    structured = ["structured"] if config["prompts"]["structured"]["enabled"] else []
    return " ".join(sorted([*config["prompts"]["templates"], *structured]))


def get_chunk_manifest(wildcards, input):
    """The manifest of one chunk's volume shards, inside the shards rule's output folder."""
    return f"{input.shards}/{wildcards.split}-c{wildcards.chunk}.manifest.json"


def grows_with_attempt(value, growth):
    """A resource that is ``value`` on the first attempt and ``growth`` times more on each retry, so a training
    job stopped ahead of its time limit (it checkpoints and exits 75) resumes with more time, and any other long
    job that hit its limit is not resubmitted with the same one.
    """
    return lambda wildcards, attempt: int(value * growth ** (attempt - 1))


def get_data_workers(wildcards, threads, resources):
    """DataLoader workers of each process of a training job (ctgen.training.launch.data_workers)."""
    from ctgen.training.launch import data_workers

    return data_workers(threads, resources.gpu // max(int(resources.nodes), 1))


# --- evaluation ---------------------------------------------------------------------------
def get_eval_manifests(wildcards):
    """The shard manifest of the split whose real volumes are the references."""
    return expand(
        rules.shard_manifest.output.manifest, split=config["evaluation"]["split"]
    )


def get_eval_text(wildcards, input):
    """How the evaluation encodes prompts for the CLIP model: its tokenizer, or the cached states."""
    key = "text_tokenizer" if SMALL_TEXT else "text_cache"
    return {
        key: input.text,
        "prompt": MODELS["prompt"],
        "max_length": MODELS["text_encoder"]["max_length"],
    }


EVALUATION = config["evaluation"]
# what `ctgen evaluate --settings` takes; its set-valued lists in one order (faithfulness_labels, retrieval_k: the
# scores do not depend on it, a reordered list scored everything again)
EVAL_SETTINGS = canonical(in_canonical_order(scoring_settings(EVALUATION)))
# ... as params: without the batch size, which decides how fast the networks run, not what they score (an edit
# after an out-of-memory error re-sampled the whole guidance sweep); it reaches the jobs untracked
EVAL_TRACKED = canonical({k: v for k, v in EVAL_SETTINGS.items() if k != "batch_size"})
# the guidance sweep's scales as the names of their jobs' files: exact (1.0 -> "1", 2.25 -> "2.25"; a
# rounded name could give two scales one file), and the schema refuses repeats
GUIDANCE_SCALES = [
    repr(float(s)).removesuffix(".0") for s in EVALUATION["guidance_scales"]
]
SLICENET = EVALUATION["slicenet"]
SLICENET_RES = SLICENET["resources"]


def get_slicenet_config():
    """The slice network's training config (model, train, data) as plain data, with the HU window."""
    cfg = json.loads(json.dumps({k: SLICENET[k] for k in ("model", "train")}))
    cfg["data"] = {"hu_window": PRESET["clip"], **SLICENET.get("data", {})}
    return canonical(cfg)


def get_inception_weights(wildcards):
    """evaluation.inception_weights (a second 2D FID space), where given."""
    return local_files(EVALUATION.get("inception_weights"))


def get_eval_settings(wildcards):
    """The scoring settings, quoted for the shell (untracked: EVAL_TRACKED is the tracked part)."""
    return shlex.quote(json.dumps(EVAL_SETTINGS, sort_keys=True))


def get_tstr_table(wildcards):
    """What a TSTR training set is made from: the sampled volumes (synthetic), or the prompts (real)."""
    if wildcards.source == "synthetic":
        return rules.sample_tstr.output.manifest
    return rules.tstr_prompts.output.csv


def get_tstr_weights(wildcards):
    """The two TSTR classifiers (trained on synthetic, trained on real) when evaluation.tstr is on; they train
    on the cascade's samples, so they are scored in the cascade's evaluation."""
    if not EVALUATION["tstr"] or wildcards.family != "cascade":
        return []
    return expand(rules.train_tstr.output.weights, source=["synthetic", "real"])


# --- the generator families side by side ------------------------------------------------------
def family_samples(family):
    """A generator family's sampling manifest (both sample the same prompts with the same seeds)."""
    return {
        "cascade": rules.sample.output.manifest,
        "latent_flow": rules.sample_latent_flow.output.manifest,
    }[family]


def family_spec(family):
    """A generator family's spec: the grid its volumes are scored on."""
    return {
        "cascade": rules.cascade.output.spec,
        "latent_flow": rules.latent_flow_spec.output.spec,
    }[family]


def family_evaluation(what, family):
    """One output of `evaluate` for one family: a path (not a one-element list, which a script would get
    as a Namedlist)."""
    return expand(getattr(rules.evaluate.output, what), family=family)[0]


def get_family_evaluations(wildcards):
    """Each family's metrics and per-volume rows, named <what>_<family>."""
    return {
        f"{what}_{family}": family_evaluation(what, family)
        for family in GENERATORS
        for what in ("metrics", "per_volume")
    }


def get_family_runs(wildcards):
    """Each family's samples and evaluation outputs, named <what>_<family> (the figures' and tables' inputs)."""
    runs = {f"samples_{family}": family_samples(family) for family in GENERATORS}
    for family in GENERATORS:
        for what in ("metrics", "per_volume", "histograms", "skipped"):
            runs[f"{what}_{family}"] = family_evaluation(what, family)
    return runs


def get_trained_weights(wildcards):
    """The weights of every model trained in this run, by model (the training curves read metrics.csv beside them)."""
    weights = {
        "clip": rules.train_clip.output.weights,
        "classifier": rules.train_classifier.output.weights,
        "slicenet": rules.train_slicenet.output.weights,
    }
    if CASCADE:
        weights |= {
            "tokenizer": rules.train_tokenizer.output.weights,
            "generator": rules.train_generator.output.weights,
            "superres": rules.train_superres.output.weights,
        }
    if LATENT:
        weights |= {
            "autoencoder": rules.train_autoencoder.output.weights,
            "latent_flow": rules.train_latent_flow.output.weights,
        }
    if OWN_REPORT_ENCODER:
        weights["report_encoder"] = rules.train_report_encoder.output.weights
    return weights


# --- every job as a target ---------------------------------------------------------------------
def get_every_job():
    """One output of every job of the run (besides `all`'s own targets), so that each job is a target.

    Snakemake (9.x; snakemake/snakemake#1978) does not rebuild a missing intermediate file while the
    files downstream of it look up to date. A job deletes its outputs when it starts, so a job that fails
    after a config edit (a training job out of memory, or out of time on every attempt) leaves the old
    downstream results in place and a rerun would answer "Nothing to be done" over them. With each job a
    target, the rerun runs the failed job again, and everything after it (its input is new).
    tests/workflow/test_rules.py checks that every planned job is covered.
    """
    train = MODELS["train_splits"]
    weights = get_trained_weights(None)
    targets = [
        rules.demo_cohort.output.root if DEMO else [],
        rules.cohort.output.table,
        rules.parse_reports.output.labels,
        rules.sample_prompts.output.csv,
        get_text(None),
        rules.text_tokenizer.output.tokenizer if OWN_REPORT_ENCODER else [],
        expand(rules.prep.output.table, chunk=CHUNKS),
        expand(rules.shards.output.shards, split=SPLITS, chunk=CHUNKS),
        expand(
            rules.train_config.output.config,
            model=[m for m in weights if m != "slicenet"],
        ),
        rules.slicenet_config.output.config,
        *weights.values(),
    ]
    if CASCADE:
        targets += [
            expand(rules.encode_tokens.output.tokens, split=train, chunk=CHUNKS),
            get_train_tokens(None),
            get_superres_recon(None),
            (
                expand(rules.encode_recon.output.recon, split=train, chunk=CHUNKS)
                if MODELS["superres_lowres"] == "reconstruction"
                else []
            ),
            rules.cascade.output.spec,
            rules.cascade_sampling.output.json,
            expand(rules.guidance_scale.output.json, scale=GUIDANCE_SCALES),
        ]
        if EVALUATION["tstr"]:
            targets += [
                expand(rules.train_config.output.config, model="tstr"),
                rules.tstr_prompts.output.csv,
                rules.sample_tstr.output.manifest,
                expand(rules.tstr_shards.output.manifest, source=["synthetic", "real"]),
                expand(rules.train_tstr.output.weights, source=["synthetic", "real"]),
            ]
    if LATENT:
        targets += [
            get_section_text(None),
            expand(
                rules.encode_latents.output.latents,
                split=train + probe_splits(),
                chunk=CHUNKS,
            ),
            get_train_latents(None),
            get_probe_latents(None),
            rules.latent_flow_spec.output.spec,
            rules.probe_latent_flow.output.json,
        ]
    return targets
