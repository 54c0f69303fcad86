"""The model card (``README.md``) written beside every saved model, generated from its ``config.json``.

Nothing in it is kept by hand per model: the class and its docstring say what the network is, the
role comes from the ``model_kind`` the training job recorded, the data from the recorded inputs
(shard manifests give their split and sample count), and the hashes, seed, code version and date
from the provenance. :func:`write_model_card` can rebuild it from a saved folder at any time.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import json
from pathlib import Path
from typing import Any

from ctprep.shards import sha256_file
from ctprep.volume import atomic_write

CARD_NAME = "README.md"
#: The statement every card carries, word for word.
INTENDED_USE = "Synthetic images, research use only, not for diagnosis."
#: What each trained kind does in the project (the keys are ctgen.jobs.train's model kinds).
ROLES = {
    "tokenizer": "stage 1 of the text-to-CT cascade: a CT-ViT VQ tokenizer that turns a low-resolution CT volume "
                 "into a grid of discrete tokens and back",
    "generator": "stage 2 of the text-to-CT cascade: a MaskGIT transformer that samples token grids from report text "
                 "(classifier-free guidance)",
    "superres": "stage 3 of the text-to-CT cascade: a text-conditional diffusion model that brings decoded slices "
                "to the full in-plane resolution",
    "clip": "evaluation feature network: a CT-CLIP-style volume/text model for the CLIP score and a 3D Frechet distance",
    "classifier": "evaluation feature network: an 18-label abnormality classifier for faithfulness (AUROC), "
                  "train-on-synthetic-test-on-real and a 3D Frechet distance",
    "slicenet": "evaluation feature network: a 2D CNN trained on real CT slices (plane, slice position, labels), "
                "whose features the 2D and 2.5D FID compare",
    "autoencoder": "stage 1 of the latent flow family: MONAI's MAISI 3D autoencoder (KL), which maps a CT volume to "
                   "a 4x smaller latent (its mean and spread) and back",
    "latent_flow": "stage 2 of the latent flow family: a 3D U-Net (MONAI's MAISI diffusion U-Net) with text "
                   "cross-attention, trained with rectified flow in the autoencoder's latent space "
                   "(classifier-free guidance)",
    "report_encoder": "text encoder: the small transformer pretrained on the training reports' parsed findings, "
                      "then frozen as the generators' text side",
}


def config_hash(meta: dict[str, Any]) -> str:
    """Short sha256 of what defines the trained model: class, model config, training and data settings."""
    prov = meta.get("provenance", {})
    keyed = {"class": meta.get("class"), "config": meta.get("config"), "train": prov.get("train"),
             "data": prov.get("data")}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _summary(class_path: str) -> str:
    """The first paragraph of the class docstring, on one line ("" when the class cannot be read)."""
    module, _, name = class_path.rpartition(".")
    if not module.startswith("ctgen."):
        return ""
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return ""
    doc = inspect.cleandoc(vars(cls).get("__doc__") or "")  # its own docstring, never nn.Module's
    return " ".join(doc.split("\n\n")[0].split())


def _class_line(label: str, class_path: str) -> str:
    summary = _summary(class_path)
    return f"- {label}: `{class_path}`" + (f": {summary}" if summary else "")


def _paths(value: Any) -> list[str]:
    """A recorded data value as a list of strings (the training jobs record lists as their repr)."""
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, str) and value.startswith("["):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [value]
        return [str(v) for v in parsed] if isinstance(parsed, (list, tuple)) else [value]
    return [str(value)]


def _describe_input(path: str) -> str:
    """What a data file holds, where it is cheap to read: a manifest's split, samples and hash; a tensor file's entries."""
    p = Path(path)
    if not p.is_file():
        return "not found when the model was saved"
    if p.suffix == ".json":
        try:
            manifest = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return ""
        if isinstance(manifest, dict) and "n_samples" in manifest:
            return f"split `{manifest.get('split')}`, {manifest['n_samples']} samples, sha256 {sha256_file(p)[:12]}"
    if p.suffix == ".safetensors":  # token grids, reconstructions, cached text states: one entry per volume/prompt
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as fh:
            return f"{len(list(fh.keys()))} entries"
    return ""


def _data_lines(prov: dict[str, Any]) -> list[str]:
    data = prov.get("data") or {}
    lines = []
    for key, what in (("n_volumes", "training volumes"), ("n_samples", "training samples")):
        if key in prov:
            lines.append(f"- {what}: {prov[key]}")
    for key, value in sorted(data.items()):
        if key in ("manifests", "tokens", "recon", "text_cache", "text_tokenizer"):
            for path in _paths(value):
                what = _describe_input(path)
                lines.append(f"- `{key}`: `{path}`" + (f" ({what})" if what else ""))
        else:
            lines.append(f"- `{key}`: {value}")
    return lines or ["- not recorded (the model was saved outside a training job)"]


def model_card(directory: str | Path) -> str:
    """The card's Markdown for the model saved in ``directory`` (config.json and model.safetensors)."""
    directory = Path(directory)
    meta = json.loads((directory / "config.json").read_text())
    prov = meta.get("provenance", {})
    cls = meta.get("class", "?")
    kind = prov.get("model_kind")
    weights = directory / "model.safetensors"
    train = prov.get("train") or {}
    core = (meta.get("config") or {}).get("core_class")  # TextConditioned wraps the network that does the work
    lines = [
        f"# {cls.rpartition('.')[2]}" + (f": the ctgen {kind}" if kind else ""),
        "",
        f"**{INTENDED_USE}**",
        "",
        "## What it is",
        "",
        _class_line("class", cls),
        *([_class_line("core network", core)] if isinstance(core, str) else []),
        f"- role: {ROLES.get(kind, 'not recorded')}",
        "- weights: `model.safetensors`" + (f", sha256 {sha256_file(weights)[:12]}" if weights.is_file() else ""),
    ]
    if "ema_decay" in prov:
        lines.append(f"- these are the exponential moving average of the weights (decay {prov['ema_decay']})")
    if train:
        lines.append(f"- training: {train.get('max_steps')} steps, batch {train.get('batch_size')} x "
                     f"{train.get('grad_accum', 1)} accumulation, lr {train.get('lr')}")
    lines += ["", "## Training data", "", *_data_lines(prov), "", "## Reproducibility", "",
              "| what | value |", "|---|---|",
              f"| config hash (class, model config, training and data settings) | `{config_hash(meta)}` |",
              f"| seed | {prov.get('seed')} |",
              f"| ctgen version | {prov.get('ctgen_version')} |",
              f"| git commit | `{prov.get('git')}` |",
              f"| torch | {prov.get('torch')} |",
              f"| saved (UTC) | {meta.get('saved_at')} |",
              "", "The full settings are in `config.json`; load the model with "
              f"`{cls.rpartition('.')[2]}.from_pretrained(\"{directory.name}\")`.",
              "", "## Intended use", "",
              f"{INTENDED_USE} This model is for research on generating chest CT volumes from report text and "
              "on measuring such generators. Its outputs are not real patients' scans; they may show findings "
              "their text does not name and miss those it does. It has not been validated for any clinical purpose, "
              "and neither it nor its outputs may inform the diagnosis or treatment of a patient.", ""]
    return "\n".join(lines)


def write_model_card(directory: str | Path) -> Path:
    """Write ``README.md`` beside the saved model (atomically); returns its path."""
    path = Path(directory) / CARD_NAME
    text = model_card(directory)
    atomic_write(path, lambda p: Path(p).write_text(text))
    return path
