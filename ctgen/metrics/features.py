"""Running a passed-in feature extractor over volumes in batches, without gradients.

An extractor is any callable ``f(batch) -> (B, F)``: the trained CLIP volume encoder, the
classifier's pooled features, a 2D slice encoder, or InceptionV3/I3D from a local path. When it
is an ``nn.Module`` the batch is moved to the device of its parameters, so the same call runs on
CPU and CUDA; features come back as float64 numpy arrays (bf16 outputs under autocast included).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

Extractor = Callable[[torch.Tensor], torch.Tensor]


def extractor_device(extractor: Extractor) -> torch.device | None:
    """The device of an ``nn.Module`` extractor's first parameter or buffer; None otherwise."""
    if isinstance(extractor, nn.Module):
        for t in (*extractor.parameters(), *extractor.buffers()):
            return t.device
    return None


@torch.no_grad()
def run_extractor(extractor: Extractor, batch: torch.Tensor) -> np.ndarray:
    """batch (B, ...) -> features (B, F) float64, checked for shape."""
    device = extractor_device(extractor)
    if device is not None:
        batch = batch.to(device)
    out = extractor(batch)
    if out.ndim != 2 or out.shape[0] != batch.shape[0]:
        raise ValueError(f"extractor must return (B={batch.shape[0]}, F), got {tuple(out.shape)}")
    return out.detach().to("cpu", torch.float64).numpy()


def as_volume(volume) -> torch.Tensor:
    """A (D, H, W) or (1, D, H, W) array/tensor -> (D, H, W) float32 tensor."""
    v = volume if isinstance(volume, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(volume))
    if v.ndim == 4 and v.shape[0] == 1:
        v = v[0]
    if v.ndim != 3:
        raise ValueError(f"expected a (D, H, W) or (1, D, H, W) volume, got shape {tuple(v.shape)}")
    return v.float()


def volume_features(volumes: Iterable, extractor: Extractor, batch_size: int = 4) -> np.ndarray:
    """Each (D, H, W) volume -> one feature row: (N, F), in input order.

    The extractor sees (B, 1, D, H, W); consecutive volumes of the same shape share a batch.
    Memory: one batch of volumes at a time (the iterable may read volumes lazily from disk).
    """
    feats: list[np.ndarray] = []
    pending: list[torch.Tensor] = []

    def flush():
        if pending:
            feats.append(run_extractor(extractor, torch.stack(pending)[:, None]))  # (B, 1, D, H, W)
            pending.clear()

    for volume in volumes:
        v = as_volume(volume)
        if pending and (v.shape != pending[0].shape or len(pending) == batch_size):
            flush()
        pending.append(v)
    flush()
    if not feats:
        raise ValueError("no volumes given")
    return np.concatenate(feats)
