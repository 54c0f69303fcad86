"""Synthetic volume -> a CT Image Storage DICOM series (pydicom), truthful and marked synthetic.

One file per axial slice, explicit VR little endian, uncompressed: the volume is first reoriented (flips and
transposes, the affine following) to ``DISPLAY_AXES``, as scanners write axial CT, whatever axis order the NIfTI
beside it keeps. Storage is **signed** int16 with RescaleSlope 1 and RescaleIntercept 0: every int16
HU is stored exactly whatever ``hu_range`` is, and stored value = HU means no reader can get the
intercept wrong (the unsigned + intercept -1024 convention cannot hold values below -1024).

Array axis i steps along the row cosine (the column index), j along the column cosine (the row
index), k from slice to slice: ``pixel_array[k][j, i] = array[i, j, k]``, as
:mod:`ctprep.dicom` reads it. Readers sort slices along the normal (row x column cosine), so a
volume whose k runs against the normal comes back with k reversed: the same voxels in the same
places, described by the same affine up to that flip.
"""

from __future__ import annotations

import copy
import datetime as dt
import glob
import hashlib
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.errors
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from ctprep import __version__
from ctprep.errors import read_json
from ctprep.geometry import reorient
from ctprep.volume import Volume, load_nifti, ras_to_lps

from ctgen.export.config import ExportConfig, to_int16_hu
from ctgen.export.sidecar import RESERVED, build_sidecar, sidecar_path, to_json

logger = logging.getLogger(__name__)

#: Longest value of an LT element (ImageComments), in characters.
LT_MAX = 10240
#: Longest value of an LO element (SeriesDescription, PatientID, ...), in characters.
LO_MAX = 64
#: Cosine of the largest angle tolerated between axes that must be orthogonal (about 0.06 deg).
ORTHO_TOL = 1e-3
#: The array's axes in the series, as nibabel names them (toward): columns to the patient's left, rows to posterior,
#: slices upward. ImageOrientationPatient is then [1, 0, 0, 0, 1, 0], as scanners write axial CT, and a viewer
#: that draws the pixels as stored (most do, for axial CT) shows the patient's right on the screen's left, anterior
#: up. The volume's own (RAS, or ``--orientation``) order gave [-1, 0, 0, 0, -1, 0]: correct geometry, but drawn
#: rotated by 180 degrees. A flip or a transpose of the voxels, the affine following: the same places and values.
DISPLAY_AXES = ("L", "P", "S")
#: Private creator and group holding the sidecar JSON in every slice.
PRIVATE_CREATOR, PRIVATE_GROUP = "CTGEN sidecar", 0x0011


@dataclass(frozen=True)
class SliceGeometry:
    """DICOM (LPS) geometry of a stack of slices, from a voxel-to-RAS affine."""

    orientation: list[float]  # ImageOrientationPatient: row cosine (i), then column cosine (j)
    pixel_spacing: list[float]  # PixelSpacing: [between rows (j), between columns (i)] mm
    positions: np.ndarray  # (K, 3) ImagePositionPatient of each slice k, LPS mm
    normal: np.ndarray  # (3,) row cosine x column cosine
    thickness: float  # length of the k step, mm
    spacing_between: float  # k step projected on the normal, mm (equal to thickness: no tilt)


def dicom_geometry(affine_ras: np.ndarray, n_slices: int) -> SliceGeometry:
    """The one RAS -> LPS conversion of the export: slice geometry of an ``(I, J, K)`` grid.

    Refuses in-plane shear (DICOM cosines must be orthogonal) and a k step off the slice
    normal (a gantry-tilt stack, which SimpleITK and most viewers misplace).
    """
    lps = ras_to_lps(affine_ras)
    step_i, step_j, step_k = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    col_spacing, row_spacing = float(np.linalg.norm(step_i)), float(np.linalg.norm(step_j))
    rowcos, colcos = step_i / col_spacing, step_j / row_spacing
    if abs(float(rowcos @ colcos)) > ORTHO_TOL:
        raise ValueError(f"affine axes i and j are not orthogonal (cos {rowcos @ colcos:.2e}): "
                         "DICOM cannot describe an in-plane shear")
    normal = np.cross(rowcos, colcos)
    thickness = float(np.linalg.norm(step_k))
    along = float(step_k @ normal)
    if abs(along) < thickness * (1.0 - ORTHO_TOL**2 / 2):  # cos of the k-to-normal angle below ~cos(0.06 deg)
        tilt = float(np.degrees(np.arccos(min(1.0, abs(along) / thickness))))
        raise ValueError(f"affine axis k is {tilt:.3f} deg off the slice normal (sheared, like a gantry tilt): "
                         "SimpleITK and most viewers would misplace such a DICOM series")
    positions = lps[:3, 3] + np.arange(n_slices)[:, None] * step_k  # (K, 3)
    return SliceGeometry(
        orientation=[*rowcos.tolist(), *colcos.tolist()],
        pixel_spacing=[row_spacing, col_spacing],
        positions=positions,
        normal=normal,
        thickness=thickness,
        spacing_between=abs(along),
    )


def _ds(values: Any) -> list[str] | str:
    """Numbers as DS strings of at most 16 characters (about 1e-12 mm at chest CT scale)."""
    if np.ndim(values) == 0:
        return format_number_as_ds(float(values))
    return [format_number_as_ds(float(v)) for v in values]


def _series_dataset(
    geom: SliceGeometry, shape: tuple[int, int, int], config: ExportConfig, series_description: str,
    patient_name: str, prompt: str | None, sidecar_json: str, study_id: str = "",
) -> Dataset:
    """Tags shared by every slice of one series (fresh study/series/frame UIDs, the time now)."""
    now = dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: prompts may hold any character
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    for what in ("Study", "Series", "Content", "InstanceCreation"):
        setattr(ds, f"{what}Date", date)
        setattr(ds, f"{what}Time", time)
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.PatientPosition = ""  # Type 2C (no Patient Orientation Code Sequence): present, claiming no position
    ds.Manufacturer = config.manufacturer[:LO_MAX]
    ds.ManufacturerModelName = "ctgen"
    ds.SoftwareVersions = __version__
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = series_description[:LO_MAX]
    ds.SeriesDescription = series_description[:LO_MAX]
    ds.DerivationDescription = "Synthetic CT generated by ctgen from a text prompt; no patient was imaged"
    ds.PatientName = patient_name
    ds.PatientID = config.patient_id[:LO_MAX]
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "synthetic image (ctgen): contains no patient data"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.KVP = ""
    ds.SliceThickness = _ds(geom.thickness)
    ds.SpacingBetweenSlices = _ds(geom.spacing_between)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.StudyID = study_id
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = _ds(geom.orientation)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(shape[1]), int(shape[0])  # rows run along j, columns along i
    ds.PixelSpacing = _ds(geom.pixel_spacing)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1  # signed: stored value = HU (see the module docstring)
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
    ds.WindowCenter = _ds([w[1] for w in config.windows])
    ds.WindowWidth = _ds([w[2] for w in config.windows])
    ds.WindowCenterWidthExplanation = [w[0] for w in config.windows]
    if prompt:
        ds.ImageComments = f"SYNTHETIC (ctgen) from prompt: {prompt}"[:LT_MAX]
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "UT", sidecar_json)  # (0011,1010): the sidecar JSON, provenance in every file
    return ds


def _written_by_ctgen(path: Path) -> bool:
    """Whether a DICOM file carries ctgen's private sidecar block, i.e. is a slice of a series ctgen wrote."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    except (KeyError, OSError, pydicom.errors.InvalidDicomError):
        return False
    return True


def _prepare_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to mix series: ``out_dir`` must be absent or empty, or (``overwrite``) hold only the .dcm files of a
    series ctgen wrote (a real patient's series, or anyone else's files, is never replaced)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file, where a DICOM series' folder is to be made")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True to replace the series in it")
    stray = [p.name for p in out_dir.iterdir() if not (p.is_file() and p.suffix == ".dcm")]
    if stray:
        raise FileExistsError(f"{out_dir} holds files other than a DICOM series ({stray[:3]}); not replacing it")
    foreign = [p.name for p in sorted(out_dir.iterdir()) if not _written_by_ctgen(p)]
    if foreign:
        raise FileExistsError(f"{out_dir} holds DICOM files ctgen did not write ({foreign[:3]}); not replacing them")


def check_replaceable(out_dir: str | os.PathLike) -> None:
    """Refuse, before anything is sampled, a DICOM folder that :func:`save_synthetic_dicom` with ``overwrite`` would
    refuse after it: one that is not absent, empty or a series ctgen wrote."""
    _prepare_dir(Path(out_dir), overwrite=True)


#: Longest value of an SH element (StudyID), in characters.
SH_MAX = 16


def _case_name(sidecar: dict[str, Any]) -> str | None:
    """``<prompt id>_s<seed>`` (as the NIfTI is named) of a sample's sidecar, or what of it the sidecar has."""
    pid, seed = sidecar.get("prompt_id"), sidecar.get("seed")
    if pid is None and seed is None:
        return None
    return "_".join(str(v) for v in (pid, None if seed is None else f"s{seed}") if v is not None)


def _study_id(case: str | None) -> str:
    """StudyID (SH, 16 characters) naming the case: as it is where it fits, else its head and a hash of all of it, so
    that long ids sharing a prefix stay apart in a worklist."""
    if not case:
        return ""
    if len(case) <= SH_MAX:
        return case
    return f"{case[:SH_MAX - 9]}~{hashlib.sha1(case.encode()).hexdigest()[:8]}"


def _prompt_text(sidecar: dict[str, Any]) -> str | None:
    """The text a sample was drawn from: the cascade's prompt, or the latent flow family's report sections."""
    if sidecar.get("prompt"):
        return str(sidecar["prompt"])
    report = sidecar.get("report") or {}
    text = " ".join(f"{k.capitalize()}: {v}" for k, v in report.items() if v) if isinstance(report, dict) else str(report)
    return text or None


def save_synthetic_dicom(
    vol: Volume,
    out_dir: str | os.PathLike,
    sidecar: dict[str, Any],
    series_description: str | None = None,
    patient_name: str | None = None,
    *,
    config: ExportConfig | None = None,
    overwrite: bool = False,
    case: str | None = None,
) -> list[Path]:
    """Write ``vol`` as a CT series in ``out_dir`` (one ``IM<k>.dcm`` per k slice); returns the paths in k order.

    Voxels are rounded and clipped to ``config.hu_range`` first. UIDs are fresh on every call.
    The series is written into a temporary folder beside ``out_dir`` and renamed into place, so
    a killed job leaves no half series. SeriesDescription (unless given) and StudyID name the case: ``case``, the
    NIfTI's file stem where the caller has one, else ``<prompt_id>_s<seed>`` of the sidecar. ``sidecar["prompt"]``
    (or its ``report`` sections) goes to ImageComments; the whole sidecar (plus geometry) into private tag
    (0011,1010).
    """
    config = config or ExportConfig()
    out_dir = Path(out_dir)
    _prepare_dir(out_dir, overwrite)
    out, n_clipped = to_int16_hu(vol, config.hu_range)
    out = reorient(out, DISPLAY_AXES)
    data = out.data  # (I, J, K) int16
    geom = dicom_geometry(out.affine, out.shape[2])
    content = build_sidecar(out, sidecar, {"format": "dicom", "dtype": "int16", "hu_range": list(config.hu_range),
                                           "n_clipped": n_clipped, "storage": "signed, slope 1, intercept 0"})
    case = case or _case_name(sidecar)
    if series_description is None:  # every series was called the same in a worklist: the case names it
        default = config.series_description
        series_description = (f"SYNTHETIC {case} - {default.removeprefix('SYNTHETIC ')}" if case and
                              default.startswith("SYNTHETIC") else f"{default} {case}" if case else default)
    base = _series_dataset(
        geom, out.shape, config, series_description, patient_name or config.patient_name, _prompt_text(sidecar),
        to_json(content, indent=None), _study_id(case),
    )
    names = [f"IM{k + 1:05d}.dcm" for k in range(out.shape[2])]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # a job killed with SIGKILL mid-series (no except clause runs) left its temporary folder: one job writes one
    # series name, and the uuid's 32 hex digits keep another series' ("p1" and "p1.v2") out of the pattern
    for stale in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.{'[0-9a-f]' * 32}.part"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex}.part"  # mkdir honours the umask (mkdtemp: 0700)
    tmp.mkdir()
    try:
        for k, name in enumerate(names):
            ds = copy.deepcopy(base)
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = _ds(geom.positions[k])
            ds.SliceLocation = _ds(geom.positions[k] @ geom.normal)
            pixels = np.ascontiguousarray(data[:, :, k].T, dtype="<i2")  # (rows = j, columns = i)
            ds.add_new(0x7FE00010, "OW", pixels.tobytes())  # PixelData
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            pydicom.dcmwrite(tmp / name, ds, enforce_file_format=True)
        if out_dir.exists():
            shutil.rmtree(out_dir)  # empty, or only the .dcm files of an earlier series (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote synthetic DICOM series %s (%d slices, series %s) %r",
                out_dir, len(names), base.SeriesInstanceUID, out)
    return [out_dir / name for name in names]


def dicom_from_nifti(nifti: str | os.PathLike, dicom_dir: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    """A DICOM series of a written synthetic NIfTI, its sidecar's provenance travelling along (``overwrite``: as
    :func:`save_synthetic_dicom`'s)."""
    side = sidecar_path(Path(nifti))
    sidecar = read_json(side, "sample sidecar") if side.is_file() else {}
    return save_synthetic_dicom(load_nifti(nifti), dicom_dir, {k: v for k, v in sidecar.items() if k not in RESERVED},
                                overwrite=overwrite)
