# Config validation and the values rules read; logic lives in ctprep.
import json
import os
import sys
from pathlib import Path

from snakemake.utils import validate

from ctgen.jobs.geometry import GeometryError, check_geometry

validate(config, "../schemas/config.schema.yaml")
try:  # the prep grid and every model's sizes fit together
    check_geometry(config)
except GeometryError as err:
    sys.exit(f"config error: {err}")  # one line naming the keys and a fix, no traceback

R = config["results"]
SPLITS = config["dataset"]["splits"]
CHUNKS = [f"{i:03d}" for i in range(config["prep"]["n_chunks"])]
if config["prep"]["preset"] not in config["presets"]:
    raise ValueError(
        f"prep.preset {config['prep']['preset']!r} is not among presets: {sorted(config['presets'])}"
    )
PRESET = config["presets"][config["prep"]["preset"]]
DEMO = config.get("demo", {}).get("enabled", False)
DICOM_OUTPUTS = (
    [f"{R}/dicom/metadata.csv"] if config.get("dicom", {}).get("series_dir") else []
)

EVAL_JSONL = config["reports"]["eval_jsonl"]
LABELLER_EVAL = (
    [f"{R}/reports/labeller_eval.tsv"]
    if EVAL_JSONL and Path(EVAL_JSONL).is_file()
    else []
)


def get_dataset_root(wildcards):
    """The demo rule's output when the demo is on; a real CT-RATE copy needs no rule."""
    return config["dataset"]["root"]


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
MODEL_PRESET = config["model_presets"][MODELS["preset"]]
CHECKPOINTS = MODELS["checkpoints"]
TRAIN_MANIFESTS = [f"{R}/shards/{s}/manifest.json" for s in MODELS["train_splits"]]
SMALL_TEXT = MODELS["text_encoder"]["kind"] == "small"
TEXT_INPUT = (
    f"{R}/text/tokenizer.json" if SMALL_TEXT else f"{R}/text/prompts.safetensors"
)
TEXT_FLAG = "--text-tokenizer" if SMALL_TEXT else "--text-cache"


def get_train_config(wildcards):
    """The model's preset (model, text_encoder, train) plus the data options, as plain data."""
    preset = MODEL_PRESET[wildcards.model]
    cfg = {"model": preset["model"], "train": preset["train"]}
    if wildcards.model not in ("tokenizer", "classifier") and SMALL_TEXT:
        cfg["text_encoder"] = {
            **preset.get("text_encoder", {}),
            "vocab_size": MODELS["text_encoder"]["vocab_size"],
            "max_length": MODELS["text_encoder"]["max_length"],
        }
    cfg["data"] = {
        "hu_window": PRESET["clip"],
        "lowres_scale": MODELS["lowres_scale"],
        "prompt": MODELS["prompt"],
        **preset.get("data", {}),
    }
    return cfg


def get_launcher(wildcards, resources):
    """`ctgen`, or torchrun (under srun across nodes) for the GPUs and nodes the job was given."""
    from ctgen.training.launch import launch_prefix

    return launch_prefix(resources.gpu, resources.nodes)


def get_superres_recon(wildcards):
    """Tokenizer reconstructions as low-res inputs (as GenerateCT), or none: downsampled slices."""
    if MODELS["superres_lowres"] == "reconstruction":
        return f"{R}/tokens/train_recon.safetensors"
    return []


# --- evaluation ---------------------------------------------------------------------------
EVAL_MANIFESTS = [f"{R}/shards/{config['evaluation']['split']}/manifest.json"]


def get_eval_text(wildcards, input):
    """How the evaluation encodes prompts for the CLIP model: its tokenizer, or the cached states."""
    key = "text_tokenizer" if SMALL_TEXT else "text_cache"
    return {
        key: input.text,
        "prompt": MODELS["prompt"],
        "max_length": MODELS["text_encoder"]["max_length"],
    }
