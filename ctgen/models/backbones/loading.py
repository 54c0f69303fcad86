"""Loading a published checkpoint into one of our architectures, with a key check that names the mismatch.

Nothing is downloaded and nothing is unpickled beyond tensors: ``.safetensors`` through safetensors,
anything else through ``torch.load(weights_only=True)``. A wrong file (another network, a truncated
download: the CT-Net file committed to the VLM3D repository is cut at 840 kB) ends with one line
that names the file and the first mismatching keys.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from ctprep.errors import first_line

log = logging.getLogger(__name__)


def read_state_dict(path: str | os.PathLike, what: str) -> dict:
    """The raw checkpoint object at ``path`` (a dict), read without unpickling code.

    ``what`` names the network in the messages ("CT-Net weights").
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, f"{what} not found (its path in config.yaml's evaluation section)", str(path))
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:  # a truncated download, a text file: "header too large" etc.
            first = first_line(err)
            raise ValueError(f"{what} {path} cannot be read as a safetensors file (truncated or not weights?): "
                             f"{first}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, KeyError) as err:  # KeyError: a text file
        first = first_line(err)
        if "weights_only" in first:  # torch's advice to load with weights_only=False: unsafe, and no cure for a bad file
            first = type(err).__name__
        raise ValueError(f"{what} {path} cannot be read as a weights-only checkpoint (truncated or not a "
                         f"state dict?): {first}") from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{what} {path} holds a {type(state).__name__}, not a state dict")
    return dict(state)


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys without a leading ``prefix`` (``module.`` of DataParallel checkpoints); others unchanged."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def load_checked(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | os.PathLike, what: str,
                 ignore_unexpected: Iterable[str] = (), ignore_missing: Iterable[str] = ()) -> nn.Module:
    """Load ``state`` into ``model``; any missing, unexpected or mis-shaped key is a one-line error.

    ``ignore_unexpected`` / ``ignore_missing``: keys, or prefixes ending in ``.``, that the published
    checkpoint holds but the forward pass never uses (a decoder, a classifier head), or that it may
    lack (BatchNorm counters). Returns the model in eval mode without gradients.
    """
    ignore_unexpected, ignore_missing = tuple(ignore_unexpected), tuple(ignore_missing)
    own = model.state_dict()
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state and not _matches(k, ignore_missing)
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not _matches(k, ignore_unexpected)]
    if missing or unexpected or shapes:
        raise ValueError(f"{source} is not a {what} state dict: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"shape mismatch {shapes[:3]} ({len(missing)}/{len(unexpected)}/{len(shapes)} in all)")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    log.info("loaded %s from %s", what, source)
    return model.eval().requires_grad_(False)
