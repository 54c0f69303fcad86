"""DICOM series -> :class:`~ctprep.volume.Volume` / NIfTI, strictly and truthfully.

A series folder becomes one HU volume whose affine comes from the headers alone:

- slices are sorted by their position along the slice normal (ImagePositionPatient projected
  on row cosine x column cosine), never by file name or InstanceNumber;
- the slice step is measured from those positions; SliceThickness is only recorded beside it
  (it often differs: the bundled Siemens series is 3 mm thick every 2 mm);
- RescaleSlope/RescaleIntercept are applied per slice, since they may differ between slices;
- array axes are ``("column", "row", "slice")``: ``array[i, j, k] = pixel_array[k][j, i]``, so i
  steps along the row cosine, j along the column cosine and k along the slice normal, which
  is the order of SimpleITK's ``(x, y, z)``;
- an enhanced (multi-frame) CT file, as newer scanners write a whole series, is read frame by
  frame from its functional groups (position per frame; orientation, pixel spacing and rescale
  per frame or shared), and its frames go through the same checks as classic slices.
- compressed pixel data decode through pydicom's plugins, all permissively licensed: python-gdcm
  (JPEG Lossless, JPEG-LS, JPEG 2000), pylibjpeg-openjpeg (JPEG 2000, HTJ2K) and pydicom itself
  (RLE Lossless, Deflated Explicit VR Little Endian); :data:`DECODED_BY` names each syntax's.

Anything that would make the geometry or the intensities a guess is refused with a
:class:`SeriesError` naming the reason: a non-CT Modality, several CT series in one folder without a
``series_uid`` (a scout, a dose report or a single image beside one CT series is skipped, and named;
:func:`convert_folder` converts each of several as a reconstruction of its own), mixed
orientation or matrix size or pixel spacing, duplicate positions, missing or irregular slices,
fewer than two slices (a single slice has no measured step, and a 2D image is no volume for
this pipeline), missing geometry tags, a damaged header element among those read
(:data:`_PER_FILE_TAGS`), missing or undecodable pixel data, and two slices with bitwise
identical pixels (one image written at two positions, as in lungmask's test files: real
neighbouring slices always differ by noise).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import multiprocessing as mp
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import pydicom.uid as uids
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import DSfloat

from ctprep.ctrate import METADATA_COLUMNS
from ctprep.geometry import affine_from_dicom
from ctprep.preprocess import DICOM_DESCRIP
from ctprep.volume import Volume, VolumeError, save_nifti

logger = logging.getLogger(__name__)

#: Array axes of every volume read here (see the module docstring).
ARRAY_AXES = ("column", "row", "slice")
#: Two slices closer than this along the normal (mm) sit at the same position.
DUPLICATE_MM = 0.01
#: Allowed deviation of a slice step from the series' step: relative part and absolute part (mm).
STEP_RTOL, STEP_ATOL = 0.01, 0.01
#: Orientation cosines and pixel spacings that differ by more than this are "mixed".
ORIENTATION_ATOL, SPACING_ATOL = 1e-4, 1e-4
#: Metadata columns that are measured rather than copied from a DICOM tag of the same keyword.
_MEASURED = {"VolumeName", "XYSpacing", "NumberofSlices", "ZSpacing"}
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: File names that say DICOM: such a file that is none (empty, or cut short inside its preamble or file meta) is
#: skipped with a warning naming it, where other files (notes, thumbnails, DICOMDIR indexes) are skipped quietly.
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_NIFTI_INT16 = (-32768, 32767)
#: What decodes each compressed transfer syntax (pyproject's dependencies), named when a file cannot be decoded.
#: 12-bit JPEG Extended (lossy, rare in CT) has no permissively licensed pydicom plugin: only pylibjpeg-libjpeg
#: (GPL-3), which this Apache-2.0 project does not depend on.
DECODED_BY = {
    uids.JPEGBaseline8Bit: "python-gdcm",
    uids.JPEGExtended12Bit: "python-gdcm for 8-bit samples; 12-bit only by pylibjpeg-libjpeg (GPL-3, not a dependency)",
    uids.JPEGLossless: "python-gdcm",
    uids.JPEGLosslessSV1: "python-gdcm",
    uids.JPEGLSLossless: "python-gdcm",
    uids.JPEGLSNearLossless: "python-gdcm",
    uids.JPEG2000Lossless: "pylibjpeg-openjpeg or python-gdcm",
    uids.JPEG2000: "pylibjpeg-openjpeg or python-gdcm",
    uids.HTJ2KLossless: "pylibjpeg-openjpeg",
    uids.HTJ2KLosslessRPCL: "pylibjpeg-openjpeg",
    uids.HTJ2K: "pylibjpeg-openjpeg",
    uids.RLELossless: "pydicom",
    uids.DeflatedExplicitVRLittleEndian: "pydicom",
}


class SeriesError(VolumeError):
    """A DICOM series that cannot be turned into a truthful volume; the message says why."""


class SeveralSeries(SeriesError):
    """A folder holding more than one series that could be the CT volume; ``uids``: those series in their
    reconstruction order (:func:`_series_order`), set after construction so that the error pickles as a
    SeriesError does."""

    uids: list[str] = []


@dataclass(frozen=True)
class _Stack:
    """Validated headers of one series, sorted along the slice normal."""

    names: list[str]  # file names (or "dataset <n>"), for messages
    paths: list[Path | None]
    headers: list[Dataset]
    positions: np.ndarray  # (N, 3) ImagePositionPatient, LPS mm
    orientation: list[float]  # six cosines
    pixel_spacing: list[float]  # [between rows, between columns]
    step: np.ndarray  # (3,) LPS vector from slice k to k+1
    step_mm: float  # the step along the unit slice normal
    gaps: list[dict]


#: First bytes of a DICOM data set written without the 128-byte preamble and "DICM" prefix (ACR-NEMA era
#: files, raw dumps of some PACS and tools): the little-endian group of its first element, 0002 or 0008.
_RAW_STARTS = (b"\x02\x00", b"\x08\x00")


def _dcmread(path: Path, stop_before_pixels: bool = False) -> Dataset:
    """``pydicom.dcmread``, also for an image file without the preamble and "DICM" prefix, as GDCM reads it.

    pydicom refuses such a file unless forced, and forcing reads any junk as a data set; so only a file that
    starts like a data set and holds Rows and Columns is taken. Without file meta its transfer syntax is the
    encoding pydicom detected (such files are never compressed). Anything else raises ``InvalidDicomError``.
    """
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        with open(path, "rb") as f:
            if f.read(2) not in _RAW_STARTS:
                raise
        try:
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=stop_before_pixels)
            is_image = "Rows" in ds and "Columns" in ds
        except Exception as err:  # forced parsing of a non-DICOM file fails in many ways
            raise InvalidDicomError(f"{path.name}: not a DICOM file ({err})") from err
        if not is_image:
            raise InvalidDicomError(f"{path.name}: no DICOM image header") from None
        if "TransferSyntaxUID" not in ds.file_meta:
            implicit, little = ds.original_encoding
            ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        return ds

# --- headers ------------------------------------------------------------------------------
#: Tags read from the header of every file (series selection, geometry, rescale) and of its file meta.
#: pydicom converts an element's value only when it is first read, so a damaged element (a corrupted VR byte,
#: a value of the wrong length) would raise then, deep inside the checks, as NotImplementedError or
#: BytesLengthException, and end a whole folder conversion; :func:`_parse_header` reads them at once instead,
#: so the series is refused as an unreadable file. Only these: converting every element of a header costs
#: ~3 ms a file (the bundled Siemens header has 134 elements, 167 with its sequences), 5x reading it and
#: ~12 CPU hours over the 15M slices of a 50k-volume cohort. These are converted once and read from then on
#: (only the rescale is read again, from the file re-read for its pixels): reading the bundled series' headers
#: went from 0.88 to 0.95 ms a file (+~0.08 ms; reading a slice with its pixels takes ~36 ms).
#: The selection tags are converted for every file of a folder (which series a file belongs to, whether it is a
#: scout); the rest only for the files of the series read, so a damaged element of a skipped file (a scout, another
#: series) refuses nothing.
_SELECTION_TAGS = ("SeriesInstanceUID", "Modality", "ImageType", "NumberOfFrames")
_PER_FILE_TAGS = (*_SELECTION_TAGS, "Rows", "Columns",
                  "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope", "RescaleIntercept")
_FILE_META_TAGS = ("MediaStorageSOPClassUID", "TransferSyntaxUID")
#: Tags read from the first slice alone (the metadata row and the volume's meta), checked once per series.
_FIRST_SLICE_TAGS = tuple(c for c in METADATA_COLUMNS if c not in _MEASURED) + ("Manufacturer", "SliceThickness")


def _parse_header(ds: Dataset, name: str, keywords: Sequence[str] = _PER_FILE_TAGS, whole: bool = True) -> None:
    """Convert the elements of ``keywords`` (and the file meta's) now: a damaged one raises :class:`SeriesError`.

    ``whole``: an enhanced (multi-frame) file is converted in full, as :func:`_frames` copies all its top-level
    elements and reads its functional groups (one such file holds a whole series, so the cost is the series').
    """
    try:
        for keyword in keywords:
            ds.get(keyword)
        file_meta = getattr(ds, "file_meta", None)
        if file_meta is not None:
            for keyword in _FILE_META_TAGS:
                file_meta.get(keyword)
        if whole and (int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds):
            for _ in ds.iterall():
                pass
    except Exception as err:  # pydicom's conversions raise many types
        raise SeriesError(f"unreadable DICOM file {name}: {' '.join(str(err).split())}") from err


#: {folder: its scan} while a study folder's series are converted (:func:`_scans_kept`), else None
_KEPT_SCANS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("ctprep_dicom_kept_scans", default=None)


@contextlib.contextmanager
def _scans_kept():
    """Within it each folder's headers are read once: a study folder of k series was scanned k + 1 times (once to
    find its series, then once for each), every file's header each time, and its skipped files warned of as often.
    Headers are read without pixels and converted idempotently, so a kept scan reads as a fresh one."""
    token = _KEPT_SCANS.set({})
    try:
        yield
    finally:
        _KEPT_SCANS.reset(token)


def _scan(series_dir: Path) -> list[tuple[str, Path, Dataset]]:
    """Headers of every DICOM file directly in ``series_dir`` (other files are skipped)."""
    kept = _KEPT_SCANS.get()
    if kept is None:
        return _read_headers(series_dir)
    if series_dir not in kept:  # a scan that fails is not kept: the folder's first read then returns its error
        kept[series_dir] = _read_headers(series_dir)
    return list(kept[series_dir])


def _read_headers(series_dir: Path) -> list[tuple[str, Path, Dataset]]:
    if not series_dir.is_dir():
        raise SeriesError(f"not a folder: {series_dir}")
    found = []
    for path in sorted(p for p in series_dir.iterdir() if p.is_file()):
        try:
            ds = _dcmread(path, stop_before_pixels=True)
        except InvalidDicomError as err:
            if path.suffix.lower() in _DICOM_SUFFIXES:  # empty, or cut short before its header: a failed copy?
                logger.warning("skipping %s: named like a DICOM file but no readable one (%d bytes): %s",
                               path, path.stat().st_size, " ".join(str(err).split()))
            else:
                logger.debug("skipping non-DICOM file %s", path)
            continue
        except Exception as err:  # a file with a DICOM preamble that cannot be parsed
            raise SeriesError(f"unreadable DICOM file {path.name}: {err}") from err
        _parse_header(ds, path.name, _SELECTION_TAGS, whole=False)  # the rest once its series is chosen
        if str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")) == _DICOMDIR_SOP_CLASS:
            continue  # a DICOMDIR index, not an image
        found.append((path.name, path, ds))
    if not found:
        raise SeriesError(f"no DICOM files in {series_dir}")
    return found


def _select(items: list, series_uid: str | None) -> list:
    """The files of one SeriesInstanceUID; several without ``series_uid`` is an error, unless exactly one of
    them could be a CT volume (:func:`_not_a_volume`)."""
    groups: dict[str, list] = {}
    for item in items:
        groups.setdefault(str(item[2].get("SeriesInstanceUID", "") or "").strip(), []).append(item)
    if series_uid is not None:
        if series_uid not in groups:
            raise SeriesError(f"series {series_uid!r} not found; present: {sorted(groups)}")
        return groups[series_uid]
    if len(groups) > 1:
        why_not = {uid: _not_a_volume(files) for uid, files in groups.items()}
        volumes = [uid for uid, why in why_not.items() if why is None]
        if len(volumes) == 1:  # a scout, a dose report or a screenshot beside the one CT series
            skipped = "; ".join(f"{uid or '<empty>'} ({why})" for uid, why in sorted(why_not.items()) if why)
            logger.warning("%s: read series %s; skipped %s", items[0][1].parent if items[0][1] else "datasets",
                           volumes[0] or "<empty>", skipped)
            return groups[volumes[0]]
        listed = "; ".join(
            f"{uid or '<empty>'} ({groups[uid][0][2].get('Modality', '?')}, {len(groups[uid])} files"
            + (f", {why_not[uid]}" if why_not[uid] else "") + ")"
            for uid in sorted(groups)
        )
        message = (f"folder holds {len(groups)} series: {listed}; move each into a folder of its own "
                   "(or pick one: ctprep dicom2nifti --series-uid UID)")
        if not volumes:
            raise SeriesError(message)
        several = SeveralSeries(message)
        several.uids = sorted(volumes, key=lambda uid: _series_order(uid, groups[uid]))
        raise several
    return next(iter(groups.values()))


def _series_order(uid: str, items: list) -> tuple:
    """The order in which a folder's series become reconstructions 1, 2, ...: SeriesNumber (scanners number a
    study's series in the order they made them; absent or not a number: last), then the series' date and time
    (where an export renumbered them alike), then the UID by its numeric components ("1.2.10" after "1.2.9", which
    text order has the other way round)."""
    ds = items[0][2]
    try:
        number = float(ds.get("SeriesNumber"))
    except (TypeError, ValueError, OverflowError):  # pydicom's IS("inf") overflows
        number = float("inf")
    when = "".join(str(ds.get(k, "") or "").strip() for k in ("SeriesDate", "SeriesTime"))
    return number, when == "", when, [(0, int(p), "") if p.isascii() and p.isdigit() else (1, 0, p)
                                          for p in uid.split(".")]  # "²" is a digit that int() refuses


def _not_a_volume(items: list) -> str | None:
    """Why a series cannot be a CT volume (not CT, localizer images only, a single image), else None.

    Exports of a study often put the scout, the dose report and screenshots beside the axial series;
    where exactly one series could be the volume, :func:`_select` takes it and names what it skipped.
    """
    heads = [ds for _, _, ds in items]
    other = sorted({str(ds.get("Modality", "") or "").strip() for ds in heads} - {"CT", ""})
    if other:
        return f"modality {', '.join(other)}"
    if all(map(_is_localizer, heads)):
        return "localizer images"
    if all(_image_type_has(ds, "SCREEN SAVE") for ds in heads):
        return "screen captures (ImageType SCREEN SAVE)"
    if sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in heads) < 2:
        return "a single image"
    if not any("ImagePositionPatient" in ds or "PerFrameFunctionalGroupsSequence" in ds
               or "SharedFunctionalGroupsSequence" in ds for ds in heads):
        return "no image positions (a dose screen or another picture, not slices)"
    # beside other series, a reformat is a second view of a scan already there: converted too, it would count
    # that scan twice in training (an export of a whole study carries coronal, sagittal and MIP series)
    kinds = sorted({v for ds in heads for v in _REFORMATS if _image_type_has(ds, v)})
    if kinds and all(any(_image_type_has(ds, v) for v in _REFORMATS) for ds in heads):
        return f"a reformat (ImageType {', '.join(kinds)})"
    orientation = heads[0].get("ImageOrientationPatient")
    if orientation is not None and len(orientation) == 6:
        try:
            normal = np.cross([float(v) for v in orientation[:3]], [float(v) for v in orientation[3:]])
        except (TypeError, ValueError):
            return None  # the reader names a damaged orientation if this series is read
        if abs(normal[2]) < _AXIAL_MIN:
            return "not axial (a coronal or sagittal reformat)"
    return None


#: ImageType values of series derived from another one's slices (multiplanar and projection reformats)
_REFORMATS = ("REFORMATTED", "MPR", "MIP", "MINIP", "PROJECTION IMAGE", "CURVED")
#: A slice normal's least z component for an axial series (60 degrees off the patient's long axis, a tilted
#: gantry's few degrees far inside)
_AXIAL_MIN = 0.5


def _image_type_has(ds: Dataset, value: str) -> bool:
    """Whether ImageType holds ``value`` (e.g. LOCALIZER, SCREEN SAVE)."""
    image_type = ds.get("ImageType") or []
    if isinstance(image_type, str):  # a single value is not a MultiValue
        image_type = [image_type]
    return value in [str(v).strip().upper() for v in image_type]


def _is_localizer(ds: Dataset) -> bool:
    """A scout/topogram: ImageType holds LOCALIZER."""
    return _image_type_has(ds, "LOCALIZER")


def _drop_localizers(items: list) -> list:
    """The series without its localizer images, where it also holds others.

    Some scanners give the scout the axial series' SeriesInstanceUID; its orientation or position would
    then refuse the whole series ("mixed ImageOrientationPatient"), so it is skipped, and named.
    """
    scouts = [item for item in items if _is_localizer(item[2])]
    if not scouts or len(scouts) == len(items):
        return items
    logger.warning("skipped %d localizer image(s) in the series: %s", len(scouts),
                   ", ".join(name for name, _, _ in scouts))
    return [item for item in items if not _is_localizer(item[2])]


def _floats(ds: Dataset, keyword: str, n: int, name: str) -> list[float]:
    value = ds.get(keyword)
    if value is None or value == "":
        raise SeriesError(f"missing {keyword} in {name}")
    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise SeriesError(f"unparsable {keyword} {value!r} in {name}") from err
    if len(out) != n or not np.all(np.isfinite(out)):
        raise SeriesError(f"{keyword} in {name} must hold {n} finite numbers, got {list(values)}")
    return out


def _check_and_sort(items: list, allow_gaps: bool) -> _Stack:
    """Refuse what makes geometry a guess; sort by position along the normal; measure the step."""
    if len(items) < 2:
        raise SeriesError(f"fewer than 2 slices ({len(items)}): no slice step can be measured")
    first_name, _, first = items[0]
    iop = _floats(first, "ImageOrientationPatient", 6, first_name)
    spacing = _floats(first, "PixelSpacing", 2, first_name)
    matrix = (first.get("Rows"), first.get("Columns"))
    positions = []
    for name, _, ds in items:
        modality = str(ds.get("Modality", "") or "").strip()
        if modality and modality != "CT":
            raise SeriesError(f"Modality is {modality!r} in {name}, not CT")
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, name), iop, atol=ORIENTATION_ATOL, rtol=0):
            raise SeriesError(f"mixed ImageOrientationPatient: {list(ds.ImageOrientationPatient)} in {name}, "
                              f"{iop} in {first_name}")
        if (ds.get("Rows"), ds.get("Columns")) != matrix or None in matrix:
            raise SeriesError(f"mixed or missing Rows/Columns: {(ds.get('Rows'), ds.get('Columns'))} in {name}, "
                              f"{matrix} in {first_name}")
        if not np.allclose(_floats(ds, "PixelSpacing", 2, name), spacing, atol=SPACING_ATOL, rtol=0):
            raise SeriesError(f"mixed PixelSpacing: {list(ds.PixelSpacing)} in {name}, {spacing} in {first_name}")
        positions.append(_floats(ds, "ImagePositionPatient", 3, name))

    normal = np.cross(iop[:3], iop[3:])
    pos = np.asarray(positions)
    along = pos @ normal
    order = sorted(range(len(items)), key=lambda k: (along[k], items[k][0]))
    items = [items[k] for k in order]
    pos, along = pos[order], along[order]
    names = [it[0] for it in items]
    _parse_header(items[0][2], names[0], _FIRST_SLICE_TAGS)  # its tags fill the metadata row

    steps = np.diff(pos, axis=0)
    dn = np.diff(along)
    dup = np.flatnonzero(dn < DUPLICATE_MM)
    if dup.size:
        k = int(dup[0])
        raise SeriesError(
            f"duplicate slice position {along[k]:.3f} mm along the normal: {names[k]} and {names[k + 1]}"
            + (f" (and {dup.size - 1} more)" if dup.size > 1 else "")
        )
    ref = np.median(steps, axis=0)  # the series' step; a minority of gaps cannot move it
    ref_n = float(ref @ normal)
    # positions written to 0.1 mm (0.625 mm slices at -785.6, -785.0, -784.4) carry up to half a unit each: a
    # step between two of them up to a whole unit per component, which the tolerance must hold
    # (only the components that change along the stack: an axial series' x and y are the same in every file)
    varies = np.ptp(pos, axis=0) > 0
    tol = STEP_RTOL * float(np.linalg.norm(ref)) + STEP_ATOL + float(np.linalg.norm(_position_units(items) * varies))
    gaps, multiples = [], []
    for k, step in enumerate(steps):
        m = max(1, int(round(dn[k] / ref_n)))
        if np.linalg.norm(step - m * ref) > tol * m:
            raise SeriesError(
                f"non-uniform slice spacing: step of {dn[k]:.3f} mm between positions {along[k]:.3f} and "
                f"{along[k + 1]:.3f} mm ({names[k]}, {names[k + 1]}), median step {ref_n:.3f} mm"
            )
        if m > 1:
            gaps.append({"after": names[k], "before": names[k + 1], "from_mm": round(float(along[k]), 4),
                         "to_mm": round(float(along[k + 1]), 4), "missing": m - 1})
        multiples.append(m)
    if gaps and not allow_gaps:
        listed = "; ".join(f"{g['from_mm']:.3f} and {g['to_mm']:.3f} mm ({g['missing']} missing, "
                           f"after {g['after']})" for g in gaps[:5])
        raise SeriesError(f"missing slice(s) between positions {listed}; series step {ref_n:.3f} mm")
    # The mean over the whole stack is the least noisy step; counting missing slices keeps it
    # the true step where gaps were allowed (the array then has fewer slices than the grid).
    step = (pos[-1] - pos[0]) / sum(multiples)
    index = np.concatenate([[0], np.cumsum(multiples)])
    # Positions rounded to their unit put an oblique series' measured step a tiny angle off the normal (0.01 mm
    # over a 24 mm stack: up to ~0.03 deg); kept, that angle makes a sheared affine, whose NIfTI has no qform and which
    # ITK refuses. Where a step along the (unit) normal puts every slice within the tolerance, it is that step: no
    # slice moves by more than the checks below accept. A gantry tilt drifts sideways far beyond it (0.5 deg:
    # 0.44 mm over a 50 mm stack) and keeps its measured step. (IOP written to 6 decimals is unit to ~1e-6 only.)
    unit = normal / np.linalg.norm(normal)  # not zero: the duplicate check above saw the slices apart along it
    upright = float(step @ unit) * unit
    if np.linalg.norm(pos - (pos[0] + index[:, None] * upright), axis=1).max() <= tol:
        step = upright
    # each step may pass against the median and the slices still drift from the grid the affine describes
    # (100 steps of 1.000 mm then 100 of 1.015: slice 100 lies 0.75 mm from where the uniform step puts it)
    off = np.linalg.norm(pos - (pos[0] + index[:, None] * step), axis=1)
    k = int(np.argmax(off))
    if off[k] > tol:
        raise SeriesError(
            f"non-uniform slice spacing: {names[k]} lies {off[k]:.3f} mm from where the series' uniform step of "
            f"{float(step @ unit):.4f} mm puts it (the steps drift or change along the stack)"
        )
    return _Stack(
        names=names, paths=[it[1] for it in items], headers=[it[2] for it in items], positions=pos,
        orientation=iop, pixel_spacing=spacing, step=step, step_mm=float(step @ unit), gaps=gaps,
    )


def _position_units(items: list) -> np.ndarray:
    """(3,) mm: the unit of the last digit each ImagePositionPatient component was written to, the finest over the
    slices (a writer keeps one format: "-785.6" and "-785" are both 0.1 mm), 0 where it cannot be told."""
    decimals = np.full(3, -1)
    for _, _, ds in items:
        for c, v in enumerate((ds.get("ImagePositionPatient") or [])[:3]):
            text = str(getattr(v, "original_string", None) or repr(float(v))).strip().lower()
            mantissa, _, exponent = text.partition("e")
            try:
                d = len(mantissa.partition(".")[2]) - (int(exponent) if exponent else 0)
            except ValueError:
                return np.zeros(3)
            decimals[c] = max(decimals[c], d)
    return np.where(decimals >= 0, 10.0 ** -np.maximum(decimals, 0), 0.0) if (decimals >= 0).all() else np.zeros(3)


def _items_from(source: str | os.PathLike | Iterable[Dataset], series_uid: str | None) -> list:
    if isinstance(source, (str, os.PathLike)):
        items = _select(_scan(Path(source)), series_uid)
    else:
        items = []
        for n, ds in enumerate(source):
            path = Path(ds.filename) if isinstance(getattr(ds, "filename", None), (str, os.PathLike)) else None
            items.append((path.name if path else f"dataset {n}", path, ds))
            _parse_header(ds, items[-1][0], _SELECTION_TAGS, whole=False)
        items = _select(items, series_uid)
    items = _drop_localizers(items)
    for name, _, ds in items:  # the series read: every tag the checks read (a skipped file's are never read)
        _parse_header(ds, name)
    return [frame for item in items for frame in _frames(*item)]


#: functional groups of an enhanced (multi-frame) CT and the classic tags each holds
_FUNCTIONAL_GROUPS = {
    "PlanePositionSequence": ("ImagePositionPatient",),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness"),
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept"),
}


def _frames(name: str, path: Path | None, ds: Dataset) -> list[tuple[str, Path | None, Dataset]]:
    """One (name, path, header) per image: a classic file as it is; an enhanced (multi-frame) CT file, as
    newer scanners write a whole series, as one classic header per frame.

    Each frame's header holds the file's top-level elements and, from its functional groups (the frame's
    own first, else the shared ones), ImagePositionPatient, ImageOrientationPatient, PixelSpacing,
    SliceThickness and the rescale, so that frames are checked, sorted and measured like the slices of a
    classic series (and may be spread over several files). ``ctprep_frame`` (the frame's index) and
    ``ctprep_source`` (the whole dataset, where it was passed in memory) tell :func:`_decode` where its
    pixels are. pydicom parses the functional groups but does not turn them into per-frame geometry, hence this.
    """
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if n <= 1 and "PerFrameFunctionalGroupsSequence" not in ds:  # an enhanced file of one frame keeps its
        return [(name, path, ds)]  # geometry in the functional groups too
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) != n:
        raise SeriesError(f"{name}: {n} frames but {len(per_frame or [])} per-frame functional groups")
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared = shared[0] if shared else Dataset()
    top = [elem for elem in ds if elem.VR != "SQ" and elem.keyword not in ("PixelData", "NumberOfFrames")]
    frames = []
    for k, groups in enumerate(per_frame):
        frame = Dataset()  # new elements with the file's values: setting one frame's tags leaves the others
        for elem in top:
            frame.add(DataElement(elem.tag, elem.VR, elem.value))
        if getattr(ds, "file_meta", None) is not None:
            frame.file_meta = ds.file_meta
        for group, keywords in _FUNCTIONAL_GROUPS.items():
            item = next((src.get(group)[0] for src in (groups, shared) if src.get(group)), None)
            for keyword in keywords:
                if item is not None and keyword in item:
                    setattr(frame, keyword, item[keyword].value)
        frame.ctprep_frame = k
        if path is None:
            frame.ctprep_source = ds
        frames.append((f"{name} frame {k + 1}", path, frame))
    return frames


# --- CT-RATE metadata row -----------------------------------------------------------------
def _number(value: Any) -> int | float:
    """A numeric header value as written: DS ``"1"`` stays 1, DS ``"1.0"`` stays 1.0."""
    if isinstance(value, (int, np.integer)):  # IS, US, SS
        return int(value)
    if isinstance(value, DSfloat) and float(value).is_integer() and not any(c in str(value) for c in ".eE"):
        return int(value)
    return float(value)


def _cell(value: Any) -> Any:
    """A header value as CT-RATE's CSV holds it: lists as ``"[a, b]"``, empty as None."""
    if value is None or value == "":
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        return "[" + ", ".join(repr(str(v)) if isinstance(v, str) and not isinstance(v, DSfloat)
                               else repr(_number(v)) for v in value) + "]"
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):  # DS and FD scalars: floats, as pandas reads the CSV
        return float(value)
    return str(value).strip() or None


def _row(stack: _Stack, volume_name: str | None) -> dict[str, Any]:
    first = stack.headers[0]
    row: dict[str, Any] = {}
    for col in METADATA_COLUMNS:
        if col not in _MEASURED:
            row[col] = _cell(first.get(col))
    row["VolumeName"] = volume_name
    row["ImagePositionPatient"] = _cell(first.ImagePositionPatient)  # the first *sorted* slice
    row["XYSpacing"] = _cell(first.PixelSpacing)
    row["NumberofSlices"] = len(stack.headers)
    row["ZSpacing"] = round(stack.step_mm, 6)
    return {col: row[col] for col in METADATA_COLUMNS}


def metadata_row(
    series: str | os.PathLike | Iterable[Dataset],
    volume_name: str | None,
    *,
    series_uid: str | None = None,
    allow_gaps: bool = False,
) -> dict[str, Any]:
    """The series' row in CT-RATE's 44-column metadata schema.

    ``series`` is a folder or the datasets of one series (headers suffice). Tags come from the
    first slice after sorting along the normal; ``ZSpacing`` is the measured step, ``XYSpacing``
    PixelSpacing; absent or empty tags are None. The series is validated as by
    :func:`read_series`. With the volumes written here, the row reproduces the affine through
    ``geometry.affine_from_ctrate_row(row, ARRAY_AXES, slice_direction=+1)``.
    """
    return _row(_check_and_sort(_items_from(series, series_uid), allow_gaps), volume_name)


# --- pixels -------------------------------------------------------------------------------
def _rescale(ds: Dataset, name: str) -> tuple[float, float]:
    """(slope, intercept) of one slice; absent tags mean identity (the CT IOD requires them)."""
    values = []
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        value = ds.get(keyword)
        if value is None or value == "":
            logger.warning("%s: no %s, assuming %g", name, keyword, default)
            values.append(default)
            continue
        try:
            values.append(float(value))
        except (TypeError, ValueError) as err:
            raise SeriesError(f"unparsable {keyword} {value!r} in {name}") from err
    slope, intercept = values
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0:
        raise SeriesError(f"invalid rescale in {name}: slope {slope}, intercept {intercept}")
    return slope, intercept


def _syntax(ts: str | None) -> str:
    """A transfer syntax for messages: its name, its UID and what decodes it."""
    if not ts:
        return "unknown transfer syntax"
    ts = uids.UID(ts)
    decoder = DECODED_BY.get(ts) or ("pydicom" if ts in uids.UncompressedTransferSyntaxes else "no known decoder")
    return f"{ts.name}{'' if ts.name == ts else f' {ts}'}; decoded by {decoder}"


def _decode(stack: _Stack) -> tuple[np.ndarray, list[str], list[tuple[float, float]]]:
    """Pixel data in HU, shape (N, Rows, Columns); int16 where exact, else float32."""
    rows, cols = int(stack.headers[0].Rows), int(stack.headers[0].Columns)
    raw, syntaxes, rescales, seen = [], [], [], {}
    frames: dict = {}  # a multi-frame file's (pixels, transfer syntax), decoded once for all its frames
    for name, path, header in zip(stack.names, stack.paths, stack.headers):
        frame, source = getattr(header, "ctprep_frame", None), getattr(header, "ctprep_source", None)
        key = path if path is not None else id(source)
        if frame is not None and key in frames:
            arr, ts = frames[key][0][frame], frames[key][1]
        else:
            ds = source if source is not None else _dcmread(path) if path is not None else header
            ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            if "PixelData" not in ds:
                raise SeriesError(f"no pixel data in {name} (absent, or the file is truncated)")
            try:
                arr = ds.pixel_array  # compressed syntaxes decode through the plugins of DECODED_BY
            except Exception as err:
                raise SeriesError(f"cannot decode pixel data of {name} ({_syntax(ts)}): "
                                  + " ".join(str(err).split())) from err  # one line: pydicom lists plugins on several
            if frame is not None:
                if arr.ndim == 2 and int(ds.get("NumberOfFrames", 1) or 1) == 1:
                    arr = arr[None]  # pydicom gives one frame as a 2D image
                if arr.ndim != 3:
                    raise SeriesError(f"pixel data of {name} has shape {arr.shape}, not one image per frame")
                frames[key] = arr, ts
                arr = arr[frame]
        if arr.shape != (rows, cols):
            raise SeriesError(f"pixel data of {name} has shape {arr.shape}, header says {(rows, cols)}")
        if arr.min() != arr.max():  # constant padding slices may repeat; real image slices never do
            digest = hashlib.blake2b(arr.tobytes(), digest_size=16).digest()
            if digest in seen:
                raise SeriesError(f"slices {seen[digest]} and {name} hold identical pixel data: one image "
                                  "written at two positions, not a scanned stack")
            seen[digest] = name
        raw.append(arr)
        syntaxes.append(ts.name if ts else "unknown")
        rescales.append(_rescale(header if frame is not None else ds, name))  # a frame's own, from its groups

    integral = all(float(s).is_integer() and float(b).is_integer() for s, b in rescales)
    if integral:
        ends = [v for a, (s, b) in zip(raw, rescales) for v in (int(a.min()) * s + b, int(a.max()) * s + b)]
        integral = _NIFTI_INT16[0] <= min(ends) and max(ends) <= _NIFTI_INT16[1]
    out = np.empty((len(raw), rows, cols), dtype=np.int16 if integral else np.float32)
    for k, (a, (s, b)) in enumerate(zip(raw, rescales)):
        if integral:
            out[k] = a.astype(np.int32) * int(s) + int(b)
        else:
            out[k] = a.astype(np.float64) * s + b
    return out, syntaxes, rescales


def read_series(
    series_dir: str | os.PathLike, *, series_uid: str | None = None, allow_gaps: bool = False
) -> Volume:
    """Read the DICOM CT series in ``series_dir`` (files directly in it) as an HU volume.

    Non-DICOM files are ignored; several SeriesInstanceUIDs need ``series_uid``. With
    ``allow_gaps`` missing slices are recorded in ``meta["gaps"]`` instead of refused; the
    array then has fewer slices than the grid it came from, so the affine is only exact up to
    the first gap. Raises :class:`SeriesError` for anything that would make geometry or HU a
    guess (see the module docstring).
    """
    series_dir = Path(series_dir)
    stack = _check_and_sort(_items_from(series_dir, series_uid), allow_gaps)
    hu, syntaxes, rescales = _decode(stack)
    data = hu.transpose(2, 1, 0)  # (N, rows, cols) -> (column i, row j, slice k)
    affine = affine_from_dicom(stack.positions[0], stack.orientation, stack.pixel_spacing[0],
                               stack.pixel_spacing[1], stack.step, ARRAY_AXES)
    normal = np.cross(stack.orientation[:3], stack.orientation[3:])
    # step_mm is along the unit normal: the cross product of cosines written to 6 decimals is unit to ~1e-6 only,
    # and arccos(1 - 1e-6) would report 0.08 deg of tilt where there is none
    tilt = float(np.degrees(np.arccos(np.clip(stack.step_mm / np.linalg.norm(stack.step), -1, 1))))
    if tilt > 0.01:
        logger.warning("%s: slices step %.2f deg off the normal (gantry tilt); the affine is sheared",
                       series_dir, tilt)
    if stack.gaps:
        logger.warning("%s: %d missing slice(s) kept as gaps: %s",
                       series_dir, sum(g["missing"] for g in stack.gaps), stack.gaps)
    first = stack.headers[0]
    thickness = first.get("SliceThickness")
    meta = {
        "source": str(series_dir),
        "format": "dicom",
        "modality": str(first.get("Modality", "") or "") or None,
        "series_uid": str(first.get("SeriesInstanceUID", "") or "") or None,
        "study_uid": str(first.get("StudyInstanceUID", "") or "") or None,
        "manufacturer": str(first.get("Manufacturer", "") or "") or None,
        "transfer_syntax": sorted(set(syntaxes)),
        "n_slices": len(stack.headers),
        "slice_step_mm": round(stack.step_mm, 6),
        "slice_step_lps": [round(float(v), 6) for v in stack.step],
        "slice_normal_lps": normal.tolist(),
        "slice_thickness_header": float(thickness) if thickness not in (None, "") else None,
        "slice_tilt_deg": round(tilt, 4),
        "pixel_spacing": stack.pixel_spacing,
        "rescale": [list(sb) for sb in sorted(set(rescales))],  # distinct [slope, intercept] pairs
        "gaps": stack.gaps,
        "hu": True,
        "stored_convention": "raw",
        "metadata_row": _row(stack, None),
        "history": [],
    }
    vol = Volume(data[None], affine, meta)
    return vol.new_like(vol.array, op="read_dicom", sorted_by="position along slice normal",
                        array_axes=list(ARRAY_AXES), dtype=str(data.dtype), allow_gaps=allow_gaps)


# --- writing ------------------------------------------------------------------------------
def dicom_to_nifti(
    series_dir: str | os.PathLike, out_path: str | os.PathLike, *, series_uid: str | None = None,
    allow_gaps: bool = False,
) -> Volume:
    """Read a series and write it as an int16 HU NIfTI with its truthful affine; returns the volume.

    Float HU (non-integer rescale) are rounded to whole HU; values beyond int16 are refused
    rather than clipped. A series with missing slices is refused even with ``allow_gaps`` (which
    :func:`read_series` takes for inspection): a NIfTI has one uniform step, so every slice after a gap would
    be written one step or more from where it was scanned.
    """
    vol = read_series(series_dir, series_uid=series_uid, allow_gaps=allow_gaps)
    if vol.meta["gaps"]:
        raise SeriesError(f"{sum(g['missing'] for g in vol.meta['gaps'])} missing slice(s) ({vol.meta['gaps']}): "
                          "a NIfTI's uniform step would misplace every slice after the gap")
    lo, hi = float(vol.data.min()), float(vol.data.max())
    if lo < _NIFTI_INT16[0] or hi > _NIFTI_INT16[1]:
        raise SeriesError(f"HU range [{lo:g}, {hi:g}] does not fit int16")
    save_nifti(vol, out_path, dtype="int16", descrip=f"{DICOM_DESCRIP}{Path(series_dir).name}")
    return vol.new_like(vol.array, op="write_nifti", path=str(out_path), dtype="int16",
                        rounded=vol.data.dtype.kind == "f")


def _names(folders: Sequence[Path], name_format: str, split: str, start_index: int) -> list[str]:
    """Each folder's name for its first (or only) series."""
    names = [name_format.format(**_fields(folder, n, split, start_index), recon=1) for n, folder in enumerate(folders)]
    for name in names:
        if name != Path(name).name or not name.endswith(".nii.gz"):
            raise ValueError(f"name_format gives {name!r}, not a bare *.nii.gz file name")
    if len(set(names)) != len(names):
        raise ValueError(f"name_format {name_format!r} gives duplicate names; include {{index}} or {{folder}}")
    return names


def _fields(folder: Path, n: int, split: str, start_index: int) -> dict:
    return {"split": split, "index": start_index + n, "folder": folder.name}


def convert_folder(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    strict: bool = False,
    split: str = "train",
    name_format: str = "{split}_{index}_a_{recon}.nii.gz",
    start_index: int = 1,
    allow_gaps: bool = False,
    workers: int = 1,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Convert every immediate subfolder of ``in_dir`` (one series each) to ``out_dir/<name>``.

    Names come from ``name_format`` with ``{split}``, ``{index}`` (``start_index`` + position in
    the sorted folder names, so a rejected folder keeps its index and reruns name the same
    folder the same), ``{folder}`` and ``{recon}``. A folder holding several series that could each be the
    volume (a study exported whole: a lung and a soft-tissue kernel, thin and thick slices) gives one volume per
    series, its reconstructions 1, 2, ... in SeriesNumber order, as CT-RATE names a scan's reconstructions
    (``train_3_a_1``, ``train_3_a_2``); each is converted or rejected on its own, its reject reason naming its
    SeriesInstanceUID. Where ``name_format`` has no ``{recon}``, such a folder is rejected, its series named.
    Scouts, dose reports, screen captures and reformats (coronal, sagittal, MIP) beside a series are skipped, as
    :func:`read_series` does. Files an earlier run wrote for reconstructions a folder no longer holds are left in
    ``out_dir`` (the workflow's rule starts from an empty folder).
    Returns ``(metadata, rejects)``: metadata in CT-RATE's
    44-column schema with ``VolumeName`` = the output file name, and rejects with
    ``VolumeName``, ``stage`` ("dicom") and ``reason``. Both carry ``attrs["source"]``, the
    folder of each VolumeName, and ``attrs["uids"]`` its (SeriesInstanceUID, StudyInstanceUID) where it was
    read (:func:`sources_table` joins them). A series with the voxels and affine of an earlier folder's (in name
    order, within this conversion) is a reject naming that folder: the same scan twice would weigh double in
    training. Copies across separate conversions (parts, splits) are not compared. ``strict`` raises on the
    first bad series (in name order) instead.

    ``workers`` > 1 converts that many series at a time in worker processes (each holds one decoded series, a
    few hundred MB); the results are taken in name order, so the tables and files are the same for any
    ``workers``. Where the run stops (``strict``, an unexpected error, named with its folder), series after the
    failing one may already be written by then: a rerun replaces them.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    folders = sorted((p for p in in_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: p.name)
    if any(p.is_file() for p in in_dir.iterdir()):
        logger.warning("%s: files directly in the input folder are ignored; one series per subfolder", in_dir)
    _names(folders, name_format, split, start_index)  # bare and distinct file names, checked before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, rejects, sources, series_uids, first_of = [], [], {}, {}, {}
    # forked workers inherit the rule's log handler, so a series' own warnings reach its log file
    pool = ProcessPoolExecutor(min(workers, len(folders)), mp_context=mp.get_context(
        "fork" if "fork" in mp.get_all_start_methods() else None)) if workers > 1 and len(folders) > 1 else None
    fields = [_fields(folder, n, split, start_index) for n, folder in enumerate(folders)]
    try:
        done = (pool.map if pool else map)(_convert_study, folders, [out_dir] * len(folders),
                                           [name_format] * len(folders), fields,
                                           [allow_gaps] * len(folders))  # in order
        series = ((folder, name, uid, result, err) for folder, study in zip(folders, done)
                  for name, uid, (result, err) in study)
        for n, (folder, name, uid, result, err) in enumerate(series, 1):
            sources[name] = str(folder)
            if uid is not None:  # one of several series of its folder: its UID, read or not
                series_uids[name] = (uid, None)
            try:
                if err is not None:
                    raise err
                meta, uid_pair, digest = result
                series_uids[name] = uid_pair
                # by content, not SeriesInstanceUID: anonymised exports blank it, and a re-export gives new UIDs
                earlier, earlier_name = first_of.setdefault(digest, (folder, name))
                if earlier_name != name:
                    copied = f"{earlier_name} of this folder" if earlier == folder else str(earlier)
                    own = f"series {uid or '<empty>'}: " if uid is not None else ""
                    raise SeriesError(f"{own}the same voxels and geometry as {copied}: a copy of that series would "
                                      "count the scan twice")
            except VolumeError as error:
                if strict:
                    raise
                logger.warning("rejected %s (%s): %s", folder, name, error)
                (out_dir / name).unlink(missing_ok=True)  # no stale volume from an earlier run, nor the copy
                rejects.append({"VolumeName": name, "stage": "dicom", "reason": str(error)})
                continue
            logger.info("%s -> %s (%d)", folder, name, n)
            rows.append({**meta, "VolumeName": name})
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    metadata = pd.DataFrame(rows, columns=list(METADATA_COLUMNS))
    rejected = pd.DataFrame(rejects, columns=["VolumeName", "stage", "reason"])
    for table in (metadata, rejected):
        table.attrs["source"] = {n: sources[n] for n in table["VolumeName"]}
        table.attrs["uids"] = {n: series_uids[n] for n in table["VolumeName"] if n in series_uids}
    return metadata, rejected


def _convert_study(folder: Path, out_dir: Path, name_format: str, fields: dict,
                   allow_gaps: bool) -> list[tuple[str, tuple]]:
    """One folder of :func:`convert_folder`: [(name, series UID or None, :func:`_convert_one`'s result)], one for
    each series where it holds several (the UID given), else one (or where ``name_format`` names several alike)."""
    first = name_format.format(**fields, recon=1)
    with _scans_kept():  # the folder's headers read once for all its series
        result = _convert_one(folder, out_dir / first, allow_gaps)
        several = result[1]
        if not isinstance(several, SeveralSeries):
            return [(first, None, result)]
        names = [name_format.format(**fields, recon=recon) for recon in range(1, len(several.uids) + 1)]
        if len(set(names)) < len(names):  # no {recon} field to name them by
            return [(first, None, (None, SeriesError(f"{several}; name_format {name_format!r} has no {{recon}} "
                                                     "field to name each series by")))]
        return [(name, uid, _convert_one(folder, out_dir / name, allow_gaps, uid))
                for name, uid in zip(names, several.uids)]


def _convert_one(folder: Path, out_path: Path, allow_gaps: bool,
                 series_uid: str | None = None) -> tuple[tuple | None, Exception | None]:
    """One series of :func:`convert_folder`: ((metadata row, (series, study UID), content digest), None), or
    (None, the error): a VolumeError for a series to reject (named by its UID where the folder holds several),
    else a RuntimeError naming the folder and the unexpected error (raised in the parent: an exception that does
    not pickle broke the whole pool, naming nothing)."""
    try:
        vol = dicom_to_nifti(folder, out_path, allow_gaps=allow_gaps, series_uid=series_uid)
    except VolumeError as err:
        if series_uid is not None:
            return None, SeriesError(f"series {series_uid or '<empty>'}: {err}")
        return None, VolumeError(str(err)) if type(err).__init__ is not VolumeError.__init__ else err
    except Exception as err:  # a bug or a broken file the reader did not expect: the folder named, the run stops
        return None, RuntimeError(f"{folder}: {type(err).__name__}: {err}")
    logger.info("%s: %r", out_path.name, vol)
    return (vol.meta["metadata_row"], (vol.meta["series_uid"], vol.meta["study_uid"]), _content_digest(vol)), None


def _content_digest(vol: Volume) -> str:
    """A digest of a volume's voxels (shape, type, bytes) and affine: ~0.3 s for a 512 x 512 x 300 series, about
    a tenth of decoding it uncompressed. :func:`read_series` gives a transposed view of the decoded slices, whose
    transpose is contiguous: hashed as it is, without the 150 MB copy of making the view contiguous."""
    data = vol.array[0]
    data = data.T if data.T.flags.c_contiguous else np.ascontiguousarray(data)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{data.shape}{data.dtype.str}".encode())
    h.update(data.data)
    h.update(np.asarray(vol.affine, dtype=np.float64).round(4).tobytes())
    return h.hexdigest()


def sources_table(metadata: pd.DataFrame, rejects: pd.DataFrame) -> pd.DataFrame:
    """Which folder (and series, study) each VolumeName of :func:`convert_folder` came from, converted or
    rejected: the names follow the folders' sorted order, so this table, not the name, ties a volume to its
    scan (and so to its report) once the archive grows."""
    rows = [{"VolumeName": n, "status": status, "folder": table.attrs["source"][n],
             "SeriesInstanceUID": table.attrs["uids"].get(n, (None, None))[0],
             "StudyInstanceUID": table.attrs["uids"].get(n, (None, None))[1]}
            for table, status in ((metadata, "converted"), (rejects, "rejected")) for n in table["VolumeName"]]
    return pd.DataFrame(rows, columns=["VolumeName", "status", "folder", "SeriesInstanceUID", "StudyInstanceUID"])


def convert_folder_to_outputs(in_dir, volumes_dir, metadata_csv, rejects_path, *, split: str = "train",
                              strict: bool = False, sources_csv=None, workers: int = 1) -> pd.DataFrame:
    """The ``dicom2nifti`` rule: convert a folder of series (``workers`` at a time) and write metadata CSV, rejects
    and the sources (:func:`sources_table`)."""
    metadata, rejects = convert_folder(in_dir, volumes_dir, strict=strict, split=split, workers=workers)
    metadata.to_csv(metadata_csv, index=False)
    if sources_csv is not None:
        sources_table(metadata, rejects).to_csv(sources_csv, index=False)
    rejects.assign(split=split).to_parquet(rejects_path, index=False)
    logger.info("dicom2nifti: %d series converted, %d rejected", len(metadata), len(rejects))
    return metadata
