"""Intensities: deciding per volume whether stored values are HU, rescaling once, clipping.

CT-RATE ships two conventions: the original release stores raw detector values that need the
metadata's ``RescaleSlope``/``RescaleIntercept`` (-1024, or -8192 on Siemens rows), and the
``_fixed`` release stores HU already. Applying the rescale to HU data shifts it a second time.
The decision is made per volume from the data itself (``auto``) or forced by config, and it is
recorded in the volume's history with the evidence.

A volume's folder can state the convention too: ``<split>_fixed/`` holds HU (see
:func:`ctprep.ctrate.stated_convention`). Where folder and data (or a forced convention) disagree,
the volume is refused rather than one of them trusted: one of the two is wrong, and either
silent choice can put a 1024 (or 8192) HU offset into the training data of a generator whose
point is truthful HU. The refusal names both readings, costs one volume, and lands in the
rejects table. A user who has checked such a file moves a raw one out of the ``_fixed`` folder,
or sets ``dataset.intensity: hu`` for an HU one the detector misread; forcing ``raw`` on a
``_fixed`` folder is refused too, since rescaling HU data is never right.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ctprep import ctrate
from ctprep.volume import Volume, VolumeError

#: HU ranges of the tissues every chest CT holds (air outside the body and in the airways, lung
#: parenchyma, fat, soft tissue).
TISSUES_HU = {"air": (-1100.0, -950.0), "lung": (-950.0, -500.0), "fat": (-150.0, -50.0), "soft": (0.0, 100.0)}


def _plausibility(sample: np.ndarray, slope: float, intercept: float) -> float:
    """How CT-like the values look under this mapping: tissue classes present, then their share.

    The integer part counts the classes holding at least 0.5% of the voxels, the fraction is the
    share of voxels in any class. The right mapping puts all four classes in place; a double
    rescale (HU - 1024) or a missing one (raw + 1024, + 8192) leaves at most two, even where
    scanner padding (-2048 stored raw reads as -1024, air-like) fakes one of them.
    """
    hu = sample * np.float32(slope) + np.float32(intercept)
    fractions = [float(((hu >= lo) & (hu <= hi)).mean()) for lo, hi in TISSUES_HU.values()]
    return sum(f >= 0.005 for f in fractions) + min(sum(fractions), 0.999)


def detect_convention(data: np.ndarray, slope: float, intercept: float, max_voxels: int = 200_000) -> dict:
    """Decide whether ``data`` is already HU or raw values needing ``slope * x + intercept``.

    Returns ``{"convention": "hu" | "raw", "score_hu": .., "score_raw": ..}``; raises
    :class:`VolumeError` when neither reading looks like a CT.
    """
    # a strided subsample, not reshape(-1): nibabel arrays are Fortran-ordered, and a C-order
    # reshape would copy the whole volume
    stride = max(1, int(np.ceil((data.size / max_voxels) ** (1 / 3))))
    sample = data[::stride, ::stride, ::stride].astype(np.float32)
    score_hu = _plausibility(sample, 1.0, 0.0)
    if slope == 1.0 and intercept == 0.0:
        score_raw = score_hu
    else:
        score_raw = _plausibility(sample, slope, intercept)
    if max(score_hu, score_raw) < 2:
        raise VolumeError(
            f"intensities look like no CT in either convention (HU fit {score_hu:.2f}, "
            f"rescaled fit {score_raw:.2f} with slope {slope}, intercept {intercept})"
        )
    convention = "raw" if score_raw > score_hu else "hu"
    return {"convention": convention, "score_hu": round(score_hu, 4), "score_raw": round(score_raw, 4)}



def to_hu(vol: Volume, slope: float, intercept: float, convention: str = "auto") -> Volume:
    """Return ``vol`` in HU (float32), applying the rescale only where the data is raw.

    ``convention`` is ``"auto"`` (decide from the data), ``"hu"`` or ``"raw"``. Refuses a volume
    that was already converted, so a rescale can never happen twice, and a volume whose folder
    (from ``vol.meta["source"]``) states a convention that the data or ``convention`` contradicts.
    """
    if vol.meta.get("hu") is True:
        raise VolumeError("volume is already in HU; refusing to rescale twice")
    data = vol.data
    if not np.issubdtype(data.dtype, np.number):
        raise VolumeError(f"non-numeric voxel type {data.dtype}")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise VolumeError("volume holds NaN or infinite values")
    lo, hi = (float(v) for v in (data.min(), data.max()))
    if lo == hi:
        raise VolumeError(f"constant volume (every voxel is {lo:g})")
    if convention not in ("auto", "hu", "raw"):
        raise ValueError(f"unknown intensity convention {convention!r}")
    stated = ctrate.stated_convention(vol.meta.get("source"))
    if convention == "auto":
        evidence = detect_convention(data, slope, intercept)
        if stated and evidence["convention"] != stated["convention"]:
            raise VolumeError(
                f"intensity convention: folder {stated['folder']}/ holds {stated['convention'].upper()} but the data "
                f"reads as {evidence['convention']} (HU fit {evidence['score_hu']:.2f}, rescaled fit "
                f"{evidence['score_raw']:.2f} with slope {slope:g}, intercept {intercept:g}); check the file: "
                "move a raw one out of the _fixed folder, or set dataset.intensity: hu if it is HU"
            )
    else:
        if stated and convention != stated["convention"]:
            raise VolumeError(
                f"dataset.intensity: {convention} contradicts folder {stated['folder']}/, which holds "
                f"{stated['convention'].upper()}: applying slope {slope:g}, intercept {intercept:g} would rescale twice"
            )
        evidence = {"convention": convention, "forced": True}
    if stated:
        evidence = {**evidence, "folder": stated["folder"], "folder_convention": stated["convention"]}
    if evidence["convention"] == "raw":
        hu = _rescaled(data, slope, intercept, lo, hi)
    else:
        hu = data  # already HU: no copy, whatever the stored type
    out = vol.new_like(hu[None], op="to_hu", slope=slope, intercept=intercept, **evidence)
    out.meta["hu"] = True
    out.meta["stored_convention"] = evidence["convention"]
    return out


def _rescaled(data: np.ndarray, slope: float, intercept: float, lo: float, hi: float) -> np.ndarray:
    """``slope * data + intercept``, kept in int16 where that is exact (half the memory of float32)."""
    if data.dtype.kind in "iu" and slope == 1.0 and float(intercept).is_integer():
        if -32768 <= lo + intercept and hi + intercept <= 32767:
            out = data.astype(np.int16)
            out += np.int16(intercept)
            return out
    return data.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def check_window(lo: float, hi: float) -> None:
    """An HU window must have its low bound below its high one: [1000, -1000] clipped every voxel to -1000."""
    if not lo < hi:
        raise ValueError(f"HU window [{lo:g}, {hi:g}]: the low bound must be below the high one")


#: air in HU; and the level below which a voxel is padding outside the scan circle, not a measurement
#: (PixelPaddingValue: -2000 stored, -3024 HU on GE; -2048, -8192 elsewhere), while noise in air reaches
#: ~-1200 HU (the real test scans: -1064 to -1207), which is data and stays as it is
AIR_HU = -1024.0
PADDING_BELOW = -1500.0


def padding_floor(data: np.ndarray, lo: float) -> Callable[[np.ndarray], None] | None:
    """The in-place map that sets padding (HU below ``min(PADDING_BELOW, lo)``) to air (``min(AIR_HU, lo)``), for
    the resampler to apply to the input's values before it interpolates them; None where ``data`` holds none
    (one pass: its minimum). -3024 HU interpolated into the body at the scan circle's edge made a rim up to
    ~680 HU too dark that the clip after resampling kept (it clips the mix, not the padding). Measured values,
    noise in air included, are kept. Given to the resampler rather than applied to a copy: a padded
    CT-RATE-size volume's copy (nibabel's arrays of a .nii.gz are read-only) cost prep ~0.45 CPU s a volume.
    """
    cut, fill = padding_bounds(lo)
    if data.size == 0 or data.min() >= cut:
        return None

    def apply(block: np.ndarray) -> None:
        np.copyto(block, block.dtype.type(fill), where=block < cut)

    return apply


def padding_bounds(lo: float) -> tuple[float, float]:
    """(the level below which a value is padding, the air value it becomes) for an HU window's low bound."""
    return min(PADDING_BELOW, float(lo)), min(AIR_HU, float(lo))


def clip_hu(vol: Volume, lo: float, hi: float, inplace: bool = False) -> Volume:
    """Clip HU to ``[lo, hi]`` (``inplace`` reuses the array: only for volumes nobody else holds)."""
    check_window(lo, hi)
    out = vol.array if inplace else np.empty_like(vol.array)
    a, b = lo, hi
    if vol.array.dtype.kind in "iu":  # integer HU: the integer bounds inside [lo, hi] (numpy will not cast floats in)
        a, b = (vol.array.dtype.type(v) for v in (np.ceil(lo), np.floor(hi)))
    return vol.new_like(np.clip(vol.array, a, b, out=out), op="clip", lo=lo, hi=hi)


def normalise(vol: Volume, lo: float, hi: float, inplace: bool = False) -> Volume:
    """Map HU ``[lo, hi]`` linearly to ``[-1, 1]`` (GenerateCT's ``/1000`` for ±1000)."""
    out = vol.array.astype(np.float32, copy=not inplace)
    _to_unit(out, lo, hi)
    return vol.new_like(out, op="normalise", lo=lo, hi=hi)


def _to_unit(block: np.ndarray, lo: float, hi: float) -> None:
    """In place: HU ``[lo, hi]`` -> ``[-1, 1]`` (shared by :func:`normalise` and :func:`window`)."""
    block -= np.float32((lo + hi) / 2.0)
    block *= np.float32(2.0 / (hi - lo))


def window(lo: float, hi: float, normalise: bool = False) -> Callable[[np.ndarray], None]:
    """The in-place elementwise map of :func:`clip_hu` (then :func:`normalise`) on float32 HU.

    Given to the resampler, which applies it to each output block while it is in cache: the
    same values as clipping and normalising the finished grid, without two more passes over it.
    """
    check_window(lo, hi)

    def apply(block: np.ndarray) -> None:
        np.clip(block, lo, hi, out=block)
        if normalise:
            _to_unit(block, lo, hi)

    return apply


def denormalise(array: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Inverse of :func:`normalise`: ``[-1, 1]`` back to HU."""
    return (np.asarray(array, dtype=np.float32) + 1.0) * np.float32((hi - lo) / 2.0) + np.float32(lo)
