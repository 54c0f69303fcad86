"""The model layout, both ways, and the HU <-> unit maps: the one place arrays change shape or scale.

Files and shards hold volumes as ``(I, J, K)`` in affine order (RAS after preprocessing), in HU.
Models see ``(C, D, H, W)`` with ``D = k``, ``H = j``, ``W = i`` and intensities in [-1, 1], where
-1 and 1 are the ends of the prep preset's HU window (``presets.<name>.clip``). The window is
always passed in, never assumed: it comes from the prep preset (training configs carry it as
``data.hu_window``, ``cascade.json`` as ``grid.clip``), so a preset with another window stays right.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from einops import rearrange

import torch

from ctprep.volume import Volume


def to_model_layout(volume_ijk: np.ndarray) -> np.ndarray:
    """(I, J, K) RAS array -> (C=1, D, H, W) with D = k, H = j, W = i.

    For a canonical (RAS) volume: D runs inferior -> superior (axial slices), H posterior ->
    anterior, W left -> right in patient terms (index 0 is the patient's left). No flips: models
    learn whatever fixed orientation they are given, and keeping the mapping a pure axis
    permutation means the affine still describes the data after undoing it.
    """
    if volume_ijk.ndim != 3:
        raise ValueError(f"expected an (I, J, K) array, got shape {volume_ijk.shape}")
    out = rearrange(volume_ijk, "i j k -> 1 k j i")  # (C, D, H, W)
    # A copy, so batch collation and pinned memory get one contiguous block per sample.
    return np.ascontiguousarray(out)


def from_model_layout(x: Any, affine: np.ndarray, **meta: Any) -> Volume:
    """(C, D, H, W) model-layout array (NumPy or torch) -> :class:`Volume` (C, I, J, K) with ``affine``.

    The exact inverse of :func:`to_model_layout` (a pure axis permutation, so the affine that
    described the training volumes still describes the output). ``meta`` goes into the volume.
    """
    if hasattr(x, "detach"):  # a torch tensor, possibly on GPU or in bf16
        x = x.detach().float().cpu().numpy() if x.dtype.is_floating_point else x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"expected a (C, D, H, W) array, got shape {x.shape}")
    out = np.ascontiguousarray(rearrange(x, "c d h w -> c w h d"))  # (C, I=W, J=H, K=D)
    vol = Volume(out, np.asarray(affine, dtype=np.float64), dict(meta))
    return vol.new_like(vol.array, op="from_model_layout", layout="(C, D=k, H=j, W=i)")


def _window(window: Sequence[float]) -> tuple[float, float]:
    lo, hi = (float(v) for v in window)
    if not hi > lo:
        raise ValueError(f"an HU window needs low < high, got {list(window)}")
    return lo, hi


def hu_to_unit(hu, window: Sequence[float]):
    """HU (torch tensor) clipped to ``window`` = (low, high) -> [-1, 1], a new float32 tensor.

    One copy, then in place (five out-of-place ops on a 480 x 480 x 240 volume cost 0.26 s, this 0.05 s:
    it runs on every volume of every epoch in the data workers).
    """
    lo, hi = _window(window)
    return hu.to(torch.float32, copy=True).clamp_(lo, hi).sub_((lo + hi) / 2).mul_(2 / (hi - lo))


def unit_to_hu(x, window: Sequence[float]):
    """[-1, 1] (torch tensor) -> HU in ``window`` = (low, high), float32; the inverse of :func:`hu_to_unit`."""
    lo, hi = _window(window)
    return (x.float().clamp(-1, 1) + 1) / 2 * (hi - lo) + lo


def unit_to_int16_hu(x, window: Sequence[float]):
    """A network's [-1, 1] output (torch tensor) -> (whole HU as an int16 tensor, the number of non-finite values).

    A diverged network emits NaN or inf, and a cast to int16 writes NaN as 0 HU (water) and nothing downstream can
    tell (the export's own NaN guard only sees int16): NaN becomes the window's lower bound and +-inf its bounds,
    and their count is returned, for the caller to warn about and record. Finite values are mapped as
    :func:`unit_to_hu` maps them, bit for bit.
    """
    x = x.float()
    n_nonfinite = int((~torch.isfinite(x)).sum())
    if n_nonfinite:
        x = torch.nan_to_num(x, nan=-1.0, posinf=1.0, neginf=-1.0)
    return unit_to_hu(x, window).round().to(torch.int16), n_nonfinite


def at_window_bounds(hu, window: Sequence[float]) -> dict[str, int | list[int]]:
    """The HU window a volume was made in and how many of its voxels lie at each bound (``unit_to_int16_hu``'s
    output): what a sidecar records, since the export's own ``hu_range`` is wider and clipped nothing."""
    lo, hi = (round(v) for v in _window(window))
    return {"hu": [lo, hi], "n_low": int((hu == lo).sum()), "n_high": int((hu == hi).sum())}


def downsample(x, scale: int):
    """In-plane area downsampling of a torch tensor (..., H, W) by an integer factor (box filter: no aliasing)."""
    import torch.nn.functional as F

    if scale == 1:
        return x
    lead = x.shape[:-2]
    y = F.avg_pool2d(x.reshape(-1, 1, *x.shape[-2:]), scale)
    return y.reshape(*lead, *y.shape[-2:])
