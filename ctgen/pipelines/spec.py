"""A family's spec file (cascade.json, latent_flow.json) read and checked against the weights beside it.

Both pipelines load the same way: the spec names each network's weights by sha256, so a folder whose
weights were retrained, or mixed from two runs, is refused before anything is sampled; a network
loads its EMA weights where the training kept them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ctgen.models.base import weights_folder
from ctgen.models.text_encoders import REPORT_ENCODER_DIR
from ctprep.errors import UserError, read_json
from ctprep.shards import sha256_file


def spec_weights(models_dir: Path, networks: list[str], text_encoders: list[dict]) -> dict[str, str]:
    """{network: sha256 of its weights} for a spec: ``networks``, and the report encoder inside ``models_dir``
    where a text entry names it (:func:`ctgen.models.text_encoders.spec_entry`), so that ``read_spec`` refuses
    a folder whose encoder was retrained; never a leftover folder no entry names."""
    own = [REPORT_ENCODER_DIR] if any(e.get("kind") == "report_encoder" and e.get("path") == REPORT_ENCODER_DIR
                                      for e in text_encoders) else []
    out = {m: sha256_file(models_dir / m / "model.safetensors") for m in [*networks, *own]}
    for m in networks:  # the EMA weights, which sampling loads where they exist (load_network): checked as well
        used = weights_folder(models_dir / m)
        if used.name == "ema":
            out[f"{m}/ema"] = sha256_file(used / "model.safetensors")
    return out


def spec_files(models_dir: Path, networks: list[str], extra: list[str] = ()) -> dict[str, str]:
    """{path relative to ``models_dir``: sha256} of what decides a sample beside the weights: each network's
    config.json (and its EMA's: a sampler or step count edited there changed the volume, unrecorded) and
    ``extra`` files (the small text encoder's tokenizer), so that ``read_spec`` refuses them changed."""
    rels = [f"{m}/config.json" for m in networks] + [f"{m}/ema/config.json" for m in networks] + list(extra)
    return {rel: sha256_file(models_dir / rel) for rel in rels if (models_dir / rel).is_file()}


def check_types(data: dict, required: dict[str, type | tuple], path: Path, optional: bool = False) -> None:
    """Refuse, naming ``path`` and the key, a hand-edited file whose ``required`` keys ("grid.spacing": inside
    "grid") are missing (unless ``optional``) or not of their type: read later, they failed as a KeyError or
    TypeError traceback. A bool is no number here."""
    for key, kind in required.items():
        value, parts = data, key.split(".")
        for part in parts:
            if not isinstance(value, dict) or part not in value:
                if optional:
                    break
                raise UserError(f"{path}: `{key}` is missing (write the file again)")
            value = value[part]
        else:
            kinds = kind if isinstance(kind, tuple) else (kind,)
            if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
                names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
                raise UserError(f"{path}: `{key}` must be {names}, not {type(value).__name__} {value!r}")


#: what sampling reads of either family's ``grid``
GRID_KEYS = {"grid": dict, "grid.spacing": list, "grid.shape": list, "grid.clip": list}


def read_spec(models_dir: Path, name: str, missing_hint: str, required: dict[str, type | tuple] | None = None) -> dict:
    """``models_dir/name`` with every weights file it names present and matching its sha256, and the ``required``
    keys of their types (:func:`check_types`)."""
    path = models_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"{models_dir} {missing_hint}: {name} is missing")
    spec = read_json(path, "sampling spec")
    check_types(spec, {"weights": dict, "files": dict}, path, optional=True)
    check_types(spec, required or {}, path)
    for model, digest in spec.get("weights", {}).items():
        weights = models_dir / model / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"missing checkpoint {weights}")
        if sha256_file(weights) != digest:
            raise ValueError(f"{weights} does not match {name} (sha256 differs): the models were retrained or "
                             "mixed from different runs; write the spec again")
    for rel, digest in spec.get("files", {}).items():
        path = models_dir / rel
        if not path.is_file() or sha256_file(path) != digest:
            raise ValueError(f"{path} {'is missing' if not path.is_file() else 'changed'} since {name} was written "
                             "(a config or tokenizer decides the samples too): restore it or write the spec again")
    return spec


def load_network(folder: Path, kind, device: torch.device, use_ema: bool = True, used: dict | None = None):
    """``kind.from_pretrained`` of ``folder`` (its ``ema/`` weights where present and wanted), in eval mode;
    ``used``: where given, ``used[folder name]`` is set to the folder the weights came from (``name/ema`` or ``name``),
    what a sidecar records."""
    weights = weights_folder(folder, use_ema)
    if used is not None:
        used[folder.name] = str(weights.relative_to(folder.parent))
    return kind.from_pretrained(weights, map_location=device).eval()
