"""HU checks: per-tissue HU statistics by threshold masks, histograms, and out-of-range flags.

A generated volume whose lung median sits at -300 HU, or which has no bone at all, is wrong in a
way that FID hides. Tissues are half-open HU intervals ``[low, high)`` over all voxels (no body
mask: air outside the patient counts as air, as it does in the real volumes it is compared with).
"""

from __future__ import annotations

import math

import numpy as np

# name -> [low, high) in HU; None is unbounded. Thresholds from the issue (common CT windows).
TISSUES: dict[str, tuple[float | None, float | None]] = {
    "air": (None, -950.0),  # outside the body, airways
    "lung": (-950.0, -500.0),  # aerated lung parenchyma
    "fat": (-190.0, -30.0),  # subcutaneous and mediastinal fat
    "soft_tissue": (-30.0, 100.0),  # muscle, blood, organs (unenhanced)
    "bone": (300.0, None),  # cortical and dense trabecular bone, calcifications, metal
}
STATS = ("median", "p5", "p95", "fraction")
#: voxels of the strided subsample that :func:`not_hu` reads
HU_CHECK_VOXELS = 200_000


def tissue_mask(volume_hu: np.ndarray, tissue: str) -> np.ndarray:
    """Boolean mask of the voxels in a tissue's HU interval."""
    low, high = TISSUES[tissue]
    mask = np.ones(volume_hu.shape, dtype=bool)
    if low is not None:
        mask &= volume_hu >= low
    if high is not None:
        mask &= volume_hu < high
    return mask


def _as_array(volume_hu) -> np.ndarray:
    if hasattr(volume_hu, "detach"):  # a torch tensor
        volume_hu = volume_hu.detach().cpu().float().numpy()
    v = np.asarray(volume_hu, dtype=np.float32)
    if v.size == 0 or not np.isfinite(v).all():
        raise ValueError("volume is empty or holds NaN/inf")
    return v


def tissue_stats(volume_hu) -> dict[str, dict[str, float]]:
    """volume (D, H, W) in HU -> {tissue: {median, p5, p95, fraction of all voxels}}.

    A tissue with no voxels has NaN median/p5/p95 and fraction 0.
    """
    v = _as_array(volume_hu)
    out = {}
    for tissue in TISSUES:
        values = v[tissue_mask(v, tissue)]
        if values.size:
            p5, median, p95 = np.percentile(values, (5, 50, 95))
        else:
            p5 = median = p95 = math.nan
        out[tissue] = {"median": float(median), "p5": float(p5), "p95": float(p95),
                       "fraction": values.size / v.size}
    return out


def hu_histogram(volume_hu, bins=None) -> tuple[np.ndarray, np.ndarray]:
    """-> (density per bin, bin edges). bins: edges or a count; default 256 bins of 16 HU over
    [-1024, 3072], values outside clipped into the end bins so that every voxel is counted."""
    v = _as_array(volume_hu)
    edges = np.linspace(-1024.0, 3072.0, 257) if bins is None else bins
    if np.ndim(edges) == 0:
        edges = np.histogram_bin_edges(v, bins=int(edges))
    edges = np.asarray(edges, dtype=np.float64)
    counts, edges = np.histogram(np.clip(v, edges[0], edges[-1]), bins=edges)
    return counts / (counts.sum() * np.diff(edges)), edges


def real_ranges(real_stats_list, stat: str = "median") -> dict[str, tuple[float, float]]:
    """[tissue_stats(real) ...] -> {tissue: (min, max) of the statistic over the real volumes}
    (volumes without that tissue ignored; (NaN, NaN) if none has it)."""
    out = {}
    for tissue in TISSUES:
        vals = [s[tissue][stat] for s in real_stats_list if not math.isnan(s[tissue][stat])]
        out[tissue] = (min(vals), max(vals)) if vals else (math.nan, math.nan)
    return out


def flag_out_of_range(fake_stats, real_stats_list, tolerance_hu: float = 20.0) -> list[dict]:
    """Flags where a generated volume's tissue median leaves the real range [min, max] +- tolerance.

    fake_stats: tissue_stats of one generated volume; real_stats_list: tissue_stats of the real
    volumes. Each flag is {tissue, value, low, high, reason}, reason 'below', 'above' or 'missing'
    (every real volume has the tissue, the generated one has none). An empty list means no flag.
    """
    if not real_stats_list:
        raise ValueError("no real statistics to compare with")
    flags = []
    for tissue, (lo, hi) in real_ranges(real_stats_list).items():
        if math.isnan(lo):
            continue
        value = fake_stats[tissue]["median"]
        low, high = lo - tolerance_hu, hi + tolerance_hu
        if math.isnan(value):
            if all(s[tissue]["fraction"] > 0 for s in real_stats_list):
                flags.append({"tissue": tissue, "value": value, "low": low, "high": high, "reason": "missing"})
        elif value < low or value > high:
            reason = "below" if value < low else "above"
            flags.append({"tissue": tissue, "value": value, "low": low, "high": high, "reason": reason})
    return flags


def not_hu(values) -> str | None:
    """Why a volume's values (a 3D array or nibabel proxy, header scaling applied) do not read as HU, in one
    line; None where they do.

    Volumes from other tools often come normalised ([-1, 1], [0, 1]) or as raw stored values that need an
    intercept of -1024 (0..4095 without scaling); scored as HU they give numbers that mean nothing. The test
    is ctprep's intensity plausibility (:func:`ctprep.intensity.detect_convention`: the HU ranges of air,
    lung, fat and soft tissue) on a strided subsample; a poor generation in HU (two of the four tissue
    classes are enough) passes.
    """
    from ctprep.intensity import detect_convention
    from ctprep.volume import VolumeError

    s = max(1, int(np.ceil((np.prod(values.shape[:3]) / HU_CHECK_VOXELS) ** (1 / 3))))
    sample = np.asarray(values[::s, ::s, ::s], dtype=np.float32)
    lo, hi = float(np.nanmin(sample)), float(np.nanmax(sample))
    try:
        evidence = detect_convention(sample, 1.0, -1024.0, max_voxels=sample.size)
    except VolumeError:
        hint = ("normalised values, not HU" if hi - lo <= 2.5 else
                "no value below 0: stored without an intercept?" if lo >= 0 else "not a chest CT in HU")
        return f"values span [{lo:g}, {hi:g}] with no chest CT's air, lung, fat and soft tissue in HU ({hint})"
    if evidence["convention"] == "raw":
        return (f"values span [{lo:g}, {hi:g}]: they read as HU only 1024 lower (raw stored values, as in "
                "CT-RATE's original release; score HU volumes)")
    return None
