"""Volume preprocessing: stored values -> HU -> canonical orientation -> target grid -> clipped HU.

A *preset* is plain config data (``config.yaml: presets``)::

    mode: spacing | resize      # fixed physical spacing then crop/pad, or whole-volume resize
    spacing: [0.75, 0.75, 1.5]  # mm along R, A, S (mode: spacing)
    shape: [480, 480, 240]      # output voxels along R, A, S
    center: body | volume       # where the crop/pad window is centred (mode: spacing)
    clip: [-1000, 1000]         # HU window
    interpolation: linear
    antialias: true

and the dataset part says how to read a CT-RATE-style file (``config.yaml: dataset``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np

from ctprep import geometry, intensity, resample
from ctprep.volume import CANONICAL, Volume, VolumeError, corner_distance

logger = logging.getLogger(__name__)

#: The NIfTI descrip of the files ``ctprep dicom2nifti`` writes (their header holds the scanner's geometry).
DICOM_DESCRIP = "ctprep dicom "

#: How to read CT-RATE files when config says nothing (see config.yaml: dataset).
DATASET_DEFAULTS = {
    "geometry": "metadata",  # metadata | header
    "array_axes": ["row", "column", "slice"],
    "slice_direction": -1,
    "reversed_slice_manufacturers": ["PNMS"],
    "intensity": "auto",  # auto | hu | raw
}


def stored_to_geometry(vol: Volume, row: Mapping | None, dataset: Mapping) -> Volume:
    """Give the stored array its truthful affine.

    With ``geometry: metadata`` the affine comes from the metadata row (the header is ignored;
    CT-RATE's holds defaults) after undoing a reversed slice order; with ``header`` the file's
    own affine is kept, with a warning where it is the identity, and refused where the file states
    no transform (qform and sform codes 0: nibabel and ITK then guess opposite orientations).
    A file ``ctprep dicom2nifti`` wrote (its descrip says so) holds the scanner's geometry in its
    header and another array order than CT-RATE's: metadata mode would mirror it, so it is refused.
    """
    cfg = {**DATASET_DEFAULTS, **dataset}
    if cfg["geometry"] == "header" or row is None:
        if cfg["geometry"] == "metadata":
            raise VolumeError("no metadata row to take the geometry from")
        if vol.meta.get("header_sform_code", 1) == 0 == vol.meta.get("header_qform_code", 0):
            raise VolumeError("the header states no orientation (qform_code and sform_code 0): give the geometry "
                              "by metadata (dataset.geometry: metadata) or write the file with its transform")
        if np.allclose(vol.affine, np.eye(4)):
            logger.warning("%s: header geometry looks like a default (identity affine)", vol.meta.get("source"))
        return vol.new_like(vol.array, op="geometry", source="header")
    if str(vol.meta.get("header_descrip", "")).startswith(DICOM_DESCRIP):
        raise VolumeError("written by ctprep dicom2nifti with the scanner's geometry in its header (column, row, "
                          "slice order): set dataset.geometry: header; metadata mode would mirror it")
    axes = list(cfg["array_axes"])
    slice_axis = axes.index("slice")
    n_meta = row.get("NumberofSlices")
    if n_meta is not None and str(n_meta).strip() not in ("", "nan", "None"):
        try:
            n_meta_int = int(float(n_meta))
        except ValueError as err:
            raise VolumeError(f"unparsable NumberofSlices {n_meta!r}") from err
        if n_meta_int != vol.shape[slice_axis]:
            raise VolumeError(f"metadata says {n_meta_int} slices, the file has {vol.shape[slice_axis]}")
    array = vol.array
    reversed_order = str(row.get("Manufacturer", "")).strip() in set(cfg["reversed_slice_manufacturers"])
    if reversed_order:
        array = np.flip(array, axis=1 + slice_axis)
    affine = geometry.affine_from_ctrate_row(row, axes, int(cfg["slice_direction"]))
    _warn_if_header_disagrees(vol, affine, slice_axis if reversed_order else None)
    return vol.new_like(array, affine, op="geometry", source="metadata", array_axes=axes,
                        slice_direction=int(cfg["slice_direction"]), reversed_slices=reversed_order)


_HEADER_WARNINGS = [0]  # volumes of this process whose header disagreed (a list: mutable at module level)
_HEADER_WARNINGS_SHOWN = 3


def _warn_if_header_disagrees(vol: Volume, affine: np.ndarray, flipped_axis: int | None) -> None:
    """Metadata mode reads the metadata's geometry; a header that states a transform of its own (codes > 0, not the
    identity CT-RATE's hold) and places the stored voxels elsewhere (more than 1.5 voxels at a corner) is said:
    a truthful header (files from another converter) wants ``dataset.geometry: header``."""
    codes = (vol.meta.get("header_sform_code", 0), vol.meta.get("header_qform_code", 0))
    if not any(codes) or np.allclose(vol.affine, np.eye(4)):
        return
    stored = affine.copy()  # the metadata's affine for the stored voxel order (before a reversed stack is flipped)
    if flipped_axis is not None:
        n = vol.shape[flipped_axis]
        stored[:3, 3] += (n - 1) * stored[:3, flipped_axis]
        stored[:3, flipped_axis] *= -1
    off = corner_distance(vol.affine, stored, vol.shape)
    voxel = float(np.linalg.norm(stored[:3, :3], axis=0).max())
    if off > 1.5 * voxel:
        _HEADER_WARNINGS[0] += 1
        if _HEADER_WARNINGS[0] <= _HEADER_WARNINGS_SHOWN:  # a release whose headers all disagree: not 50k lines
            logger.warning("%s: its header places the volume up to %.0f mm from where the metadata does; reading "
                           "the metadata (dataset.geometry: metadata): set dataset.geometry: header if the header is "
                           "the truth%s", vol.meta.get("source"), off,
                           " (further such volumes in this job are not listed)"
                           if _HEADER_WARNINGS[0] == _HEADER_WARNINGS_SHOWN else "")


def _rescale(row: Mapping | None) -> tuple[float, float]:
    if row is None:
        return 1.0, 0.0
    try:
        slope = float(row.get("RescaleSlope", 1.0))
        intercept = float(row.get("RescaleIntercept", 0.0))
    except (TypeError, ValueError) as err:
        raise VolumeError(f"unparsable rescale: slope {row.get('RescaleSlope')!r}, intercept {row.get('RescaleIntercept')!r}") from err
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0:
        raise VolumeError(f"invalid rescale: slope {slope}, intercept {intercept}")
    return slope, intercept


def body_center(vol: Volume, threshold_hu: float = -500.0, stride: int = 4) -> np.ndarray:
    """RAS centre (mm) of the body: mean position of voxels above ``threshold_hu``.

    Sampled every ``stride`` voxels: centring needs millimetres, not every voxel. Falls back to
    the grid centre where nothing is above the threshold.
    """
    sub = vol.data[::stride, ::stride, ::stride]
    idx = np.argwhere(sub > threshold_hu)
    if len(idx) == 0:
        return vol.center
    ijk = idx.mean(axis=0) * stride
    center = vol.affine[:3, :3] @ ijk + vol.affine[:3, 3]
    # keep the full extent along the body axis centred on the scan: a chest scan's z centre is
    # the scan's own, not the centre of mass of the (often shoulder-heavy) body
    center[2] = vol.center[2]
    return center


def to_target_grid(
    vol: Volume, preset: Mapping, post: Callable[[np.ndarray], None] | None = None, dtype: str = "float32"
) -> Volume:
    """Reoriented HU volume -> the preset's grid (``dtype`` HU, truthful affine).

    ``post`` maps the output values in place, ``dtype`` rounds them (see
    :func:`ctprep.resample.resample_to_affine`). Scanner padding becomes air as the resampler reads the input
    (:func:`ctprep.intensity.padding_floor`): here, so that every path to a grid does it, the training data's
    (prep) and the evaluation's ground truth alike.
    """
    lo = float(preset.get("clip", (-1000, 1000))[0])
    pre = intensity.padding_floor(vol.array, lo)
    if pre is not None:  # recorded before the resampling it is fused into
        below, to = intensity.padding_bounds(lo)
        vol = vol.new_like(vol.array, op="floor_padding", below=below, to=to, fused_into="the resampler's input")
    mode = preset.get("mode", "spacing")
    interp = preset.get("interpolation", "linear")
    antialias = bool(preset.get("antialias", True))
    if mode == "spacing":
        center = body_center(vol) if preset.get("center", "body") == "body" else vol.center
        return resample.resample_to_grid(vol, preset["spacing"], preset["shape"], center=center,
                                         pad_value=float(preset.get("pad_hu", -1024)),
                                         interpolation=interp, antialias=antialias, post=post, dtype=dtype, pre=pre)
    if mode == "resize":
        return resample.resize_to_shape(vol, preset["shape"], interpolation=interp, antialias=antialias, post=post,
                                        dtype=dtype, pre=pre)
    raise ValueError(f"unknown preset mode {mode!r} (spacing | resize)")


def preprocess_volume(
    stored: Volume,
    row: Mapping | None,
    preset: Mapping,
    dataset: Mapping | None = None,
    normalise: bool = False,
    dtype: str = "float32",
) -> Volume:
    """The whole per-volume recipe; returns clipped HU (or [-1, 1] with ``normalise``).

    ``dtype="int16"`` returns the HU rounded half to even, inside the resampler's last pass (for
    storage: the same values as rounding the float32 grid, without ever holding that grid).
    """
    if normalise and np.dtype(dtype) != np.float32:
        raise ValueError(f"normalised values are float32, not {dtype}")
    dataset = {**DATASET_DEFAULTS, **(dataset or {})}
    vol = stored_to_geometry(stored, row, dataset)
    slope, intercept = _rescale(row)
    vol = intensity.to_hu(vol, slope, intercept, dataset["intensity"])
    vol = geometry.reorient(vol, CANONICAL)
    lo, hi = (float(v) for v in preset.get("clip", (-1000, 1000)))
    # clip (and normalise) after interpolation, as separate steps would, but fused into the
    # resampler's last pass: the output grid is written once instead of three times
    vol = to_target_grid(vol, preset, post=intensity.window(lo, hi, normalise), dtype=dtype)
    grid_op = vol.meta["history"][-1]["op"]
    vol = vol.new_like(vol.array, op="clip", lo=lo, hi=hi, fused_into=grid_op)
    if normalise:
        vol = vol.new_like(vol.array, op="normalise", lo=lo, hi=hi, fused_into=grid_op)
    vol.meta["preset"] = dict(preset)
    return vol
