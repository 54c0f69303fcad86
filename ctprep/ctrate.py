"""CT-RATE's layout and table schemas, in one place, shared by the demo cohort and the readers."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

#: The 18 abnormality labels, in CT-RATE's column order.
LABELS: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)

#: Report CSV columns; a missing section reads "Not given.".
REPORT_COLUMNS: tuple[str, ...] = (
    "VolumeName",
    "ClinicalInformation_EN",
    "Technique_EN",
    "Findings_EN",
    "Impressions_EN",
)
NOT_GIVEN = "Not given."

#: Metadata CSV columns (44), DICOM header fields of each series; list-valued ones as "[a, b]".
METADATA_COLUMNS: tuple[str, ...] = (
    "VolumeName",
    "Manufacturer",
    "SeriesDescription",
    "ManufacturerModelName",
    "PatientSex",
    "PatientAge",
    "ReconstructionDiameter",
    "DistanceSourceToDetector",
    "DistanceSourceToPatient",
    "GantryDetectorTilt",
    "TableHeight",
    "RotationDirection",
    "ExposureTime",
    "XRayTubeCurrent",
    "Exposure",
    "FilterType",
    "GeneratorPower",
    "FocalSpots",
    "ConvolutionKernel",
    "PatientPosition",
    "RevolutionTime",
    "SingleCollimationWidth",
    "TotalCollimationWidth",
    "TableSpeed",
    "TableFeedPerRotation",
    "SpiralPitchFactor",
    "DataCollectionCenterPatient",
    "ReconstructionTargetCenterPatient",
    "ExposureModulationType",
    "CTDIvol",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceThickness",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "XYSpacing",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "NumberofSlices",
    "ZSpacing",
    "StudyDate",
)
assert len(METADATA_COLUMNS) == 44

#: The metadata columns the pipeline itself reads; the others are carried along.
REQUIRED_METADATA: tuple[str, ...] = (
    "VolumeName",
    "Manufacturer",
    "PatientSex",
    "PatientAge",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "XYSpacing",
    "ZSpacing",
    "RescaleIntercept",
    "RescaleSlope",
    "NumberofSlices",
)

#: Split folder names as they appear in each part of the release.
SPLITS = {"train": {"volumes": "train", "reports": "train", "labels": "train"},
          "valid": {"volumes": "valid", "reports": "validation", "labels": "valid"}}

_NAME = re.compile(r"^(?P<split>train|valid)_(?P<pid>[0-9]+)_(?P<scan>[a-z]+)_(?P<recon>[0-9]+)(?P<suffix>_fixed)?\.nii(\.gz)?$")


def parse_volume_name(name: str) -> dict[str, str]:
    """Split ``train_12_a_1.nii.gz`` into split, patient, scan and reconstruction.

    Raises ``ValueError`` for a name that is not a bare CT-RATE file name (path separators,
    ``..``, or anything else that could leave the data root).
    """
    if not isinstance(name, str) or name != PurePosixPath(name).name or name in {".", ".."} or "\\" in name:
        raise ValueError(f"VolumeName {name!r} is not a bare file name")
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"VolumeName {name!r} does not follow <split>_<pid>_<scan>_<recon>.nii.gz")
    return {
        "split": m["split"],
        "patient": f"{m['split']}_{m['pid']}",
        "scan": f"{m['split']}_{m['pid']}_{m['scan']}",
        "recon": m["recon"],
        "fixed": bool(m["suffix"]),
    }


def volume_key(name: str) -> str:
    """The sample key of a volume (its name without ``.nii``/``.nii.gz``), as the shards store it."""
    return name.split(".nii")[0]


def volume_relpath(name: str) -> Path:
    """Relative path of a volume under ``dataset/``: ``train/train_1/train_1_a/train_1_a_1.nii.gz``."""
    p = parse_volume_name(name)
    return Path(SPLITS[p["split"]]["volumes"]) / p["patient"] / p["scan"] / name


def report_csv(root: Path, split: str) -> Path:
    return Path(root) / "radiology_text_reports" / f"{SPLITS[split]['reports']}_reports.csv"


def metadata_csv(root: Path, split: str) -> Path:
    return Path(root) / "metadata" / f"{SPLITS[split]['reports']}_metadata.csv"


def labels_csv(root: Path, split: str) -> Path:
    return Path(root) / "multi_abnormality_labels" / f"{SPLITS[split]['labels']}_predicted_labels.csv"
