"""What every ctgen model shares: a loss-carrying output type and ``save_pretrained``/``from_pretrained``.

The contract with the one training loop (``ctgen/training/loop.py``):

* a model is an ``nn.Module`` with a frozen config dataclass in ``self.config``;
* ``model(**batch)`` (batch: a dict of tensors) returns a :class:`ModelOutput` subclass whose
  ``loss`` is the scalar to minimise over *all* trainable parameters; its other tensor/float fields
  are logged as they are (``output.logs()``);
* frozen networks (text encoders, perceptual nets) are passed in, never registered as submodules,
  so they never enter the trained ``state_dict``.

Weights are written as safetensors beside a ``config.json`` (class, config, package version, git
hash, seed, date) and a model card (``README.md``, :mod:`ctgen.models.card`); nothing is ever
unpickled on load (as diffusers' ``ModelMixin`` does).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import logging
import os
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ctgen.models.card import write_model_card
from ctprep.errors import first_line, read_json
from ctprep.settings import check_fields
from ctprep.volume import atomic_write

FORMAT_VERSION = 1

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ModelOutput:
    """Base of every model's forward output: ``loss`` plus named terms for the logs."""

    loss: torch.Tensor

    def logs(self) -> dict[str, float]:
        """Scalar fields as Python floats (tensors are detached); non-scalars are skipped."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                out[f.name] = float(v.detach())
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f.name] = float(v)
        return out


#: The folder holding the ctgen and ctprep packages: a checkout's root, or site-packages.
PACKAGES_ROOT = Path(__file__).resolve().parents[2]
_CODE = ("ctgen", "ctprep", "workflow", "Snakefile")  # what the recorded code state covers


def git_hash(path: str | os.PathLike | None = None) -> str | None:
    """The checkout's commit (with ``-dirty`` if the code has uncommitted or untracked changes), or None where the
    packages are not a git checkout's own: outside git, or installed into a git work tree that is another
    project's (a ``.venv`` inside it), whose commit says nothing of this code."""
    root = Path(path).resolve() if path else PACKAGES_ROOT
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
        if top.returncode != 0:
            return None
        toplevel, rev = top.stdout.split()[:2]
        if Path(toplevel).resolve() != root:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *_CODE], cwd=root, capture_output=True,
                               text=True, timeout=10)
        return rev + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


@functools.lru_cache(maxsize=1)
def source_sha256() -> str:
    """sha256 (16 hex) of the ctgen and ctprep sources (every .py by path and bytes): the code that ran, where no
    commit says it (an installed package) or a ``-dirty`` one does not tell two trees apart."""
    digest = hashlib.sha256()
    for path in sorted(p for pkg in ("ctgen", "ctprep") for p in (PACKAGES_ROOT / pkg).rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGES_ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def code_version() -> dict[str, str | None]:
    """The code that runs, as :func:`provenance` records it: git hash and source hash (a training checkpoint keeps it
    too, so a resumed run knows which code trained its weights)."""
    return {"git": git_hash(), "source_sha256": source_sha256()}


def provenance(seed: int | None = None, **extra: Any) -> dict[str, Any]:
    """What is recorded with every model and sample: package version, git hash, source hash, torch, seed."""
    from ctgen import __version__

    return {"ctgen_version": __version__, **code_version(), "torch": torch.__version__, "seed": seed, **extra}


#: Integer fields that count or size something (a width, a depth, heads, channels, patches, steps): at least 1 where
#: their default is (a negative width failed inside torch, ``heads: 0`` in einops, with a traceback)
_SIZE_NAME = re.compile(r"dim|depth|heads|size|channels|blocks|layers|groups|mult|patch|codebook|vocab|length|"
                        r"tokens|^max_|^num_|steps|stride")
_ZERO_ALLOWED = {"dim_split", "null_tokens"}  # an axis index; a count that may be none


def check_sizes(config_class, kwargs: dict[str, Any], where: str) -> None:
    """A size field given below 1 where its default is at least 1 is named (``model.dim: -4``)."""
    for f in dataclasses.fields(config_class):
        if f.name not in kwargs or f.name in _ZERO_ALLOWED or not _SIZE_NAME.search(f.name):
            continue
        default, value = f.default, kwargs[f.name]
        values = value if isinstance(value, (tuple, list)) else (value,)
        defaults = default if isinstance(default, tuple) else (default,)
        if (all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in defaults) and defaults
                and any(isinstance(v, int) and not isinstance(v, bool) and v < 1 for v in values)):
            raise ValueError(f"{where}.{f.name}: {value!r} must be at least 1")


class PretrainedMixin:
    """``save_pretrained(dir)`` / ``from_pretrained(dir)`` for a module with ``self.config``.

    Subclasses set ``config_class`` (a frozen dataclass, JSON-serialisable: ints, floats, strings,
    bools, tuples/lists of those). Tuples come back from JSON as lists and are turned back into
    tuples where the dataclass default is a tuple.
    """

    config_class: ClassVar[type]

    def save_pretrained(self, directory: str | os.PathLike, seed: int | None = None, **extra: Any) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "config": dataclasses.asdict(self.config),
            "provenance": provenance(seed, **extra),
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        # contiguous copies: safetensors refuses views and shared storage
        state = {k: v.detach().contiguous().clone() for k, v in self.state_dict().items()}
        atomic_write(directory / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
        atomic_write(directory / "config.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
        write_model_card(directory)  # README.md: what it is, its data, hashes, "research use only"
        return directory

    @classmethod
    def config_from_dict(cls, values: dict[str, Any]):
        kwargs = check_fields(cls.config_class, values, cls.__name__)
        check_sizes(cls.config_class, kwargs, cls.__name__)
        return cls.config_class(**kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu", **kwargs):
        directory = Path(directory)
        meta = read_json(directory / "config.json", "model config")
        if not isinstance(meta, dict) or not isinstance(meta.get("class"), str) or not isinstance(meta.get("config"), dict):
            raise ValueError(f"{directory}: config.json is not a ctgen model's (no 'class' and 'config': a folder "
                             "ctgen's save_pretrained wrote)")
        if int(meta.get("format_version", FORMAT_VERSION)) > FORMAT_VERSION:
            raise ValueError(f"{directory}: saved in format {meta['format_version']}, newer than this ctgen's "
                             f"{FORMAT_VERSION}: update ctgen")
        target = cls
        if cls is PretrainedMixin or meta["class"] != f"{cls.__module__}.{cls.__qualname__}":
            module, _, name = meta["class"].rpartition(".")
            if not module.startswith("ctgen."):  # never import arbitrary code named in a file
                raise ValueError(f"{directory}: refusing to load class {meta['class']!r}")
            target = getattr(importlib.import_module(module), name)
            if cls is not PretrainedMixin and not issubclass(target, cls):
                raise ValueError(f"{directory} holds a {meta['class']}, not a {cls.__name__}")
        config = target.config_from_dict(meta["config"])
        # a field added to the config class after the folder was written takes its default: said, since a default
        # that changes behaviour (not the weights, which the state-dict check below covers) would otherwise pass
        # silently
        defaulted = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in meta["config"]}
        if defaulted:
            logger.warning("%s: config.json has no %s (written by an older ctgen): using the default%s %s", directory,
                           ", ".join(defaulted), "s" if len(defaulted) > 1 else "",
                           ", ".join(f"{k}={v!r}" for k, v in defaulted.items()))
        model = target(config, **kwargs)
        model.defaulted_config = tuple(defaulted)
        weights = directory / "model.safetensors"
        try:
            state = load_file(weights, device=str(map_location))
        except FileNotFoundError:
            raise  # already names the file
        except (SafetensorError, OSError) as err:
            # a truncated copy or an interrupted download: safetensors' traceback ("header too small") named no file
            raise ValueError(f"{weights} cannot be read ({first_line(err)}): train the model again, or restore the "
                             "file from where it was copied") from None
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        shapes = [f"{k} {tuple(state[k].shape)} for {tuple(own[k].shape)}" for k in sorted(set(own) & set(state))
                  if state[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            parts = [f"{what} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                     for what, keys in (("missing", missing), ("unexpected", unexpected), ("shapes differ:", shapes))
                     if keys]
            raise ValueError(f"{directory}: weights do not match its config.json ({meta['class']}): {'; '.join(parts)}")
        model.load_state_dict(state)
        model.provenance = meta.get("provenance", {})
        # load_state_dict copies into the parameters where they are (built on the CPU): move the module itself
        return model.to(map_location)


def weights_folder(folder: str | os.PathLike, use_ema: bool = True) -> Path:
    """The folder a trained model's weights are used from: its ``ema/`` where present and wanted, else ``folder``.

    An ``ema/`` must come from the training that wrote ``folder``'s own weights (both configs record its ``run``):
    one left from an earlier training, or copied from another folder, is refused rather than used.
    """
    folder = Path(folder)
    ema = folder / "ema"
    if not (use_ema and (ema / "model.safetensors").is_file()):
        return folder
    runs = [((read_json(f / "config.json", "model config") or {}).get("provenance") or {}).get("run")
            if (f / "config.json").is_file() else None for f in (folder, ema)]
    if runs[0] and runs[1] and runs[0] != runs[1]:
        raise ValueError(f"{ema} is from another training run ({runs[1]}) than {folder}'s weights ({runs[0]}): "
                         "remove it, or train again")
    return ema


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
