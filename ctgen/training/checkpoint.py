"""Resumable training state: one ``last.pt`` written atomically, read back with ``weights_only``.

The file holds the model, optimiser, LR scheduler and EMA state, the step, the run's configs, and
per rank its data position (epoch, micro-batches consumed) and ALL its RNG states (Python, NumPy,
torch CPU, and the CUDA generator of the device that rank drives). RNG states are stored as
tensors and plain lists/ints, so ``torch.load(weights_only=True)`` reads the file without
unpickling any code: a checkpoint from an untrusted source cannot execute anything.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctprep.errors import first_line

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = 1


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states, as weights_only-loadable types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, py_state, py_gauss = random.getstate()
    state = {
        "python": [version, list(py_state), py_gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` captured."""
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(state: dict[str, Any], directory: str | os.PathLike) -> Path:
    """Write ``state`` to ``directory/last.pt`` via a temporary file, fsync and ``os.replace``.

    A crash (or SIGKILL) while writing leaves the previous ``last.pt`` intact and a stray temporary
    file, which the next save removes (Slurm's SIGKILL after its KillWait can land in a multi-GB save).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_NAME
    for stale in directory.glob(f".{CHECKPOINT_NAME}.*.tmp"):  # one writer per folder (rank 0 of one run)
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{CHECKPOINT_NAME}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (best effort: not every filesystem allows opening a folder)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The state in ``directory/last.pt`` (CPU tensors), or None if there is none yet."""
    path = Path(directory) / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, KeyError, pickle.UnpicklingError) as err:
        # an empty or truncated file (a full disk, a copy cut short) gave a bare EOFError or zip error naming no file
        raise ValueError(f"{path} is no readable checkpoint ({first_line(err)[:200]}); "
                         "delete it to train afresh") from err
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    return state


#: TrainConfig fields that never change the weights (how often a run logs and checkpoints, when it stops for a
#: time limit or fails for NaN gradients): a resume across their edits is exact.
BOOKKEEPING = ("ckpt_every", "log_every", "tensorboard", "stop_margin_s", "max_nonfinite_steps")
#: ... and with them the fields that decide how a run works (data workers, device), not what it trains: left out of
#: the checkpoint folder's hash (``ctgen.jobs.config.config_hash``), so a run resumes across their edits, and out of
#: the workflow's params (an edit retrains nothing; the rules pass them as ``ctgen train --run-settings``).
RUN_ONLY = (*BOOKKEEPING, "num_workers", "device", "find_unused_parameters")


def check_compatible(state: dict[str, Any], model_class: str, model_config: dict[str, Any],
                     train_config: dict[str, Any], path: str | os.PathLike) -> None:
    """Fail clearly if the checkpoint is for another model; warn about changed training settings."""
    if state["model_class"] != model_class:
        raise ValueError(f"{path}: checkpoint is for {state['model_class']}, not {model_class}; "
                         "delete it or point checkpoint_dir elsewhere")
    diff = _diff(state["model_config"], model_config)
    if diff:
        raise ValueError(f"{path}: checkpoint model config differs from this run's: {diff}; "
                         "delete it or point checkpoint_dir elsewhere")
    diff = _diff(state["train_config"], train_config)
    exact = {k: v for k, v in diff.items() if k in BOOKKEEPING}
    if exact:
        log.info("resuming with other bookkeeping (the weights are the same): %s", exact)
    if len(exact) < len(diff):
        log.warning("resuming with changed training settings (the run will not reproduce an "
                    "uninterrupted one exactly): %s", {k: v for k, v in diff.items() if k not in exact})


def _diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (checkpoint value, current value)}`` for keys that differ (tuples == lists)."""
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if norm(old.get(k)) != norm(new.get(k))}
