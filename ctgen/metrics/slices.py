"""2D slices of (D, H, W) volumes for FID: axial, and 2.5D (axial, coronal, sagittal).

Layout is the model's (``ctgen.data.layout.to_model_layout``): D = axial slices (inferior -> superior),
H posterior -> anterior, W the patient's left -> right. An axial slice is (H, W); coronal and
sagittal slices are (D, W) and (D, H), flipped so that row 0 is superior, as they are displayed.
Slices are picked deterministically (centres of ``n`` equal bins along the axis), so a run's FID
does not depend on a random seed.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from ctgen.metrics.features import Extractor, as_volume, run_extractor
from ctgen.metrics.frechet import frechet_distance

PLANES = ("axial", "coronal", "sagittal")
PLANE_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}  # the volume axis a plane's slices step along


def slice_indices(size: int, n: int | None = None) -> np.ndarray:
    """Indices of ``n`` slices out of ``size``: every slice if n is None or n >= size, else the
    centres of n equal bins (evenly spread, no edge slices)."""
    if n is None or n >= size:
        return np.arange(size)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return ((np.arange(n) + 0.5) * size / n).astype(np.int64)


def take_slice(volume: torch.Tensor, plane: str, index: int) -> torch.Tensor:
    """One slice of a (D, H, W) tensor in display orientation: axial (H, W); coronal (D, W) and
    sagittal (D, H) with row 0 superior. The one definition, shared by FID and the slice network's training."""
    if plane not in PLANE_AXIS:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    s = volume.select(PLANE_AXIS[plane], index)  # (a, b)
    return s if plane == "axial" else s.flip(0)  # D runs inferior -> superior; display superior on top


def slice_stack(volume, plane: str = "axial", n: int | None = None) -> torch.Tensor:
    """volume (D, H, W) (or (1, D, H, W)) -> (S, h, w) float32 slices of one plane.

    axial: (S, H, W); coronal: (S, D, W); sagittal: (S, D, H), rows superior first (as :func:`take_slice`).
    """
    if plane not in PLANE_AXIS:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    v = as_volume(volume)  # (D, H, W)
    axis = PLANE_AXIS[plane]
    idx = torch.from_numpy(slice_indices(v.shape[axis], n))
    s = v.index_select(axis, idx).movedim(axis, 0)  # (S, a, b)
    if plane != "axial":
        s = s.flip(1)  # as take_slice
    return s.contiguous()


def slice_features(volumes: Iterable, extractor: Extractor, planes=PLANES, n_slices: int | None = None,
                   batch_size: int = 64) -> dict[str, np.ndarray]:
    """One pass over the volumes -> {plane: features (total slices, F)}.

    The extractor sees (B, 1, h, w) slices in the volumes' own units (HU or [-1, 1]); windowing,
    resizing and channel repetition are its job. n_slices: slices per volume and plane (None: all).
    Memory: one volume and one batch of slices at a time.
    """
    planes = tuple(planes)
    feats: dict[str, list[np.ndarray]] = {p: [] for p in planes}
    count = 0
    for volume in volumes:
        count += 1
        for p in planes:
            stack = slice_stack(volume, p, n_slices)  # (S, h, w)
            for start in range(0, stack.shape[0], batch_size):
                chunk = stack[start:start + batch_size, None]  # (B, 1, h, w)
                feats[p].append(run_extractor(extractor, chunk))
    if count == 0:
        raise ValueError("no volumes given")
    return {p: np.concatenate(f) for p, f in feats.items()}


def fid_from_features(real: dict[str, np.ndarray], fake: dict[str, np.ndarray]) -> dict[str, float]:
    """{plane: features} pairs -> {plane: FID, ..., 'mean': average over the planes}.

    Keep ``real`` from :func:`slice_features` to score many fake sets (a guidance sweep) against
    the same real set without re-extracting it.
    """
    if set(real) != set(fake):
        raise ValueError(f"planes differ: {sorted(real)} vs {sorted(fake)}")
    out = {p: frechet_distance(real[p], fake[p]) for p in real}
    out["mean"] = float(np.mean(list(out.values())))
    return out


def fid_2d(real_vols: Iterable, fake_vols: Iterable, extractor: Extractor, planes=PLANES,
           n_slices: int | None = None, batch_size: int = 64) -> dict[str, float]:
    """FID on 2D slices: {axial, coronal, sagittal, mean} (2.5D), or {axial, mean} for planes=('axial',)."""
    real = slice_features(real_vols, extractor, planes, n_slices, batch_size)
    fake = slice_features(fake_vols, extractor, planes, n_slices, batch_size)
    return fid_from_features(real, fake)
