"""Geometry: truthful affines from CT-RATE metadata, and lossless reorientation.

CT-RATE's NIfTI headers hold default geometry; the scanner geometry is in the metadata CSV
(``ImagePositionPatient``, ``ImageOrientationPatient``, ``XYSpacing``, ``ZSpacing``, DICOM LPS).
How the NIfTI array axes map onto the DICOM grid is a property of the dataset, named in config
(``dataset.array_axes``), not guessed per file.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from ctprep.volume import CANONICAL, Volume, VolumeError, lps_to_ras


def _split(text: str, commas: bool = False) -> list[str]:
    """Items of a list written without Python syntax: DICOM's ``0.75\\0.75`` or blanks between (and commas, in
    brackets only: a bare ``1,5`` is a decimal comma, one number, not two)."""
    return [v for v in re.split(r"[\\\s,]+" if commas else r"[\\\s]+", text) if v]


def parse_list(value: object, length: int, name: str) -> list[float]:
    """Parse a CT-RATE list string like ``"[0.75, 0.75]"`` (or ``"0.75\\0.75"``, ``"[0.75 0.75]"``) into floats."""
    if isinstance(value, (list, tuple, np.ndarray)):
        items = list(value)
    else:
        text = str(value).strip()
        if not text or text.lower() in {"nan", "none", "null"}:
            raise VolumeError(f"{name} is missing")
        try:
            parsed = ast.literal_eval(text) if text[0] in "[(" else _split(text)
        except (ValueError, SyntaxError) as err:  # numpy's print form, "[0.75 0.75]" (a table written from arrays)
            if text[-1] not in "])":  # "[0.75, 0.75": cut short, not a list
                raise VolumeError(f"unparsable {name}: {text!r}") from err
            parsed = _split(text[1:-1], commas=True)
        items = list(parsed) if isinstance(parsed, (list, tuple)) else [parsed]
    try:
        out = [float(v) for v in items]
    except (TypeError, ValueError) as err:
        raise VolumeError(f"unparsable {name}: {value!r}") from err
    if len(out) != length or not all(math.isfinite(v) for v in out):
        raise VolumeError(f"{name} must hold {length} finite numbers, got {value!r}")
    return out


def affine_from_dicom(
    position: Sequence[float],
    orientation: Sequence[float],
    row_spacing: float,
    col_spacing: float,
    slice_step: Sequence[float],
    array_axes: Sequence[str] = ("column", "row", "slice"),
) -> np.ndarray:
    """Voxel-to-RAS affine of a stack of DICOM slices.

    ``position`` is ImagePositionPatient of slice 0 (LPS mm), ``orientation`` the six direction
    cosines (row direction first: the direction in which the *column index* grows),
    ``row_spacing``/``col_spacing`` PixelSpacing (between rows, between columns), and
    ``slice_step`` the LPS vector from slice k to slice k+1. ``array_axes`` names what each array
    axis indexes: ``"column"`` (steps along the row cosine), ``"row"`` (along the column cosine)
    or ``"slice"``.
    """
    rowcos = np.asarray(orientation[:3], dtype=np.float64)
    colcos = np.asarray(orientation[3:], dtype=np.float64)
    if not (np.isclose(np.linalg.norm(rowcos), 1, atol=1e-3) and np.isclose(np.linalg.norm(colcos), 1, atol=1e-3)):
        raise VolumeError(f"ImageOrientationPatient cosines are not unit vectors: {list(orientation)}")
    if abs(float(rowcos @ colcos)) > 1e-3:
        raise VolumeError(f"ImageOrientationPatient cosines are not orthogonal: {list(orientation)}")
    if row_spacing <= 0 or col_spacing <= 0 or np.linalg.norm(slice_step) <= 0:
        raise VolumeError(f"non-positive spacing: rows {row_spacing}, columns {col_spacing}, slices {list(slice_step)}")
    columns = {
        "column": rowcos * col_spacing,
        "row": colcos * row_spacing,
        "slice": np.asarray(slice_step, dtype=np.float64),
    }
    if sorted(array_axes) != ["column", "row", "slice"]:
        raise VolumeError(f"array_axes must name column, row and slice once each, got {list(array_axes)}")
    lps = np.eye(4)
    for axis, name in enumerate(array_axes):
        lps[:3, axis] = columns[name]
    lps[:3, 3] = np.asarray(position, dtype=np.float64)
    return lps_to_ras(lps)


def affine_from_ctrate_row(
    row: dict,
    array_axes: Sequence[str] = ("row", "column", "slice"),
    slice_direction: int = -1,
) -> np.ndarray:
    """Voxel-to-RAS affine of a CT-RATE volume from its metadata row.

    Slice k lies at ``ImagePositionPatient + k * ZSpacing * slice_direction * n`` where ``n`` is the
    slice normal (row cosine x column cosine). ``slice_direction=-1``: slices run from head to feet
    along a head-first normal, CT-RATE's order; scanners whose files run the other way (PNMS) are
    flipped along k before this affine applies (see :func:`ctprep.preprocess.hu_volume`).
    """
    ipp = parse_list(row.get("ImagePositionPatient"), 3, "ImagePositionPatient")
    iop = parse_list(row.get("ImageOrientationPatient"), 6, "ImageOrientationPatient")
    xy = parse_list(row.get("XYSpacing"), 2, "XYSpacing")
    try:
        dz = float(row.get("ZSpacing"))
    except (TypeError, ValueError) as err:
        raise VolumeError(f"unparsable ZSpacing: {row.get('ZSpacing')!r}") from err
    if not math.isfinite(dz) or dz <= 0:
        raise VolumeError(f"ZSpacing must be positive, got {row.get('ZSpacing')!r}")
    normal = np.cross(iop[:3], iop[3:])
    return affine_from_dicom(ipp, iop, xy[0], xy[1], slice_direction * dz * normal, array_axes)


def reorient(vol: Volume, axcodes: Sequence[str] = CANONICAL) -> Volume:
    """Flip/transpose the array (losslessly) so its axes follow ``axcodes``; affine updated."""
    target = nib.orientations.axcodes2ornt(tuple(axcodes))
    try:
        current = nib.orientations.io_orientation(vol.affine)
        transform = nib.orientations.ornt_transform(current, target)
    except ValueError as err:  # axes nibabel cannot tell apart (srow values of 1e30 dwarf the others): a reject
        source = Path(vol.meta["source"]).name if vol.meta.get("source") else "the volume"
        raise VolumeError(f"no orientation can be read from the affine of {source}: {err}") from err
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return vol.new_like(vol.array, op="reorient", to="".join(axcodes), changed=False)
    # flips and transposes are views: no voxel is copied until resampling reads them
    data = nib.orientations.apply_orientation(vol.data, transform)
    affine = vol.affine @ nib.orientations.inv_ornt_aff(transform, vol.shape)
    return vol.new_like(data[None], affine, op="reorient", to="".join(axcodes), changed=True)
