"""CT-RATE's layout and table schemas, in one place, shared by the demo cohort and the readers.

A CT-RATE download holds each split's volumes in up to two copies of one tree,
``<folder>/<split>_<pid>/<split>_<pid>_<scan>/<split>_<pid>_<scan>_<recon>.nii.gz``:

- ``<split>_fixed/`` (``fixed``): the current release; intensities are HU already, although the
  metadata still lists the scanner's ``RescaleSlope``/``RescaleIntercept``;
- ``<split>/`` (``original``): the first release; raw values that need that rescale.

Users download subsets, so either folder may be partial or absent.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from ctprep.errors import UserError, read_text

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
#: The report columns the cohort cannot do without (a missing clinical information or technique column reads as blank).
REQUIRED_REPORT_COLUMNS: tuple[str, ...] = ("VolumeName", "Findings_EN", "Impressions_EN")


def is_blank_section(text) -> bool:
    """Whether a report section says nothing: not text, blank, or CT-RATE's "Not given." (any case, stop or not).
    Training's text, its cached states and sampling all read a section through this, so that they agree."""
    return (not isinstance(text, str) or not text.strip()
            or text.strip().rstrip(".").lower() == NOT_GIVEN.rstrip(".").lower())

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

#: The two copies of a split's volumes, in the order a cohort falls back through them.
LAYOUTS: tuple[str, ...] = ("fixed", "original")
#: Folder name of each layout, per split.
LAYOUT_FOLDER = {"fixed": "{split}_fixed", "original": "{split}"}
#: What a layout's folder says about the stored values: HU already, or nothing (the data decides;
#: the original release is raw, but copies that mix in HU files circulate).
LAYOUT_CONVENTION = {"fixed": "hu", "original": None}

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


def volume_folder(split: str, layout: str = "original") -> str:
    """The folder of ``split``'s volumes in ``layout``: ``train`` or ``train_fixed``."""
    if layout not in LAYOUT_FOLDER:
        raise ValueError(f"unknown layout {layout!r}; choose from {list(LAYOUTS)}")
    return LAYOUT_FOLDER[layout].format(split=SPLITS[split]["volumes"])


def volume_relpath(name: str, layout: str = "original") -> Path:
    """Relative path of a volume under ``dataset/``: ``train/train_1/train_1_a/train_1_a_1.nii.gz``
    (``train_fixed/...`` for the ``fixed`` layout)."""
    p = parse_volume_name(name)
    return Path(volume_folder(p["split"], layout)) / p["patient"] / p["scan"] / name


def canonical_name(file_name: str) -> str:
    """The VolumeName a file stands for: ``train_1_a_1_fixed.nii.gz`` -> ``train_1_a_1.nii.gz``."""
    return re.sub(r"_fixed(?=\.nii(\.gz)?$)", "", file_name)


def volume_name(text: str) -> str:
    """The VolumeName a table cell, list entry or file name stands for, in the tables' own form
    ``train_1_a_1.nii.gz``: surrounding blanks, a missing or ``.nii`` extension and the ``_fixed`` suffix are
    spelling (a CSV re-saved without extensions, a decompressed file), so every table and the disk are keyed by it."""
    return canonical_name(volume_key(str(text).strip()) + ".nii.gz")


def discover(root: Path, split: str) -> dict[str, dict[str, list[Path]]]:
    """Volume files of ``split`` in every layout folder: ``{VolumeName: {layout: [paths]}}``, keyed by
    :func:`volume_name` as the tables are.

    Files are found anywhere below a layout folder (flattened copies work too); more than one
    path for a name in one layout is left for the caller to refuse. Symlinked folders are not
    followed. Absent folders hold nothing. Hidden files (the ``._*`` that macOS leaves beside each file it
    copies to exFAT) and files in hidden folders are no volumes.
    """
    found: dict[str, dict[str, list[Path]]] = {}
    for layout in LAYOUTS:
        for dirpath, dirs, files in os.walk(Path(root) / volume_folder(split, layout)):
            # hidden folders too (rsync's .~tmp~ of a transfer under way), as the volumes digest skips them: a
            # partial copy there made a "2 files for one volume" reject that its removal did not rerun
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if name.endswith((".nii.gz", ".nii")) and not name.startswith("."):  # macOS ._* companions
                    found.setdefault(volume_name(name), {}).setdefault(layout, []).append(Path(dirpath) / name)
    for copies in found.values():
        for paths in copies.values():
            paths.sort()
    return found


def layout_of(path: str | os.PathLike | None) -> str | None:
    """The layout a volume file lies in, from its nearest ancestor folder named for its split.

    ``.../train_fixed/train_1/train_1_a/train_1_a_1.nii.gz`` -> ``fixed``; ``.../train/...`` ->
    ``original``; a path outside a CT-RATE tree (a converted DICOM series, a single file) -> None.
    """
    if not path:
        return None
    p = Path(path)
    try:
        split = parse_volume_name(canonical_name(p.name))["split"]
    except ValueError:
        return None
    folders = {volume_folder(split, layout): layout for layout in LAYOUTS}
    for parent in p.parents:
        if parent.name in folders:
            return folders[parent.name]
    return None


def stated_convention(path: str | os.PathLike | None) -> dict | None:
    """What a volume's folder says about its intensities: ``{"folder", "convention"}`` or None."""
    layout = layout_of(path)
    if layout is None or LAYOUT_CONVENTION[layout] is None:
        return None
    split = parse_volume_name(canonical_name(Path(path).name))["split"]
    return {"folder": volume_folder(split, layout), "convention": LAYOUT_CONVENTION[layout]}


def no_chest_txt(root: Path, split: str) -> Path:
    """CT-RATE's list of the split's volumes that are not chest scans: ``no_chest_valid.txt`` or, under the
    reports' spelling of the split, ``no_chest_validation.txt`` (which was ignored); the first where neither is."""
    names = dict.fromkeys(f"no_chest_{SPLITS[split][part]}.txt" for part in ("labels", "reports"))
    paths = [Path(root) / "metadata" / name for name in names]
    found = [p for p in paths if p.is_file()]
    if len(found) > 1:
        raise UserError(f"two no-chest lists for split {split}: {' and '.join(map(str, found))}; keep one")
    return (found or paths)[0]


def dataset_tables(root: Path, splits) -> list[Path]:
    """The tables of a copy that the cohort reads and that exist: each split's reports, metadata and labels CSV
    and its no-chest list (a missing CSV is the cohort's own, clearer error)."""
    files = [f(Path(root), s) for s in splits for f in (report_csv, metadata_csv, labels_csv, no_chest_txt)]
    return [f for f in files if f.is_file()]


def volumes_digest(root: Path, splits) -> str:
    """:func:`ctprep.shards.tree_digest` of the volume files under the splits' layout folders (name, size):
    it changes where volumes were downloaded, removed or replaced since (the root folder's mtime does not)."""
    from ctprep.shards import tree_digest

    folders = [LAYOUT_FOLDER[layout].format(split=SPLITS[s]["volumes"]) for s in splits for layout in LAYOUTS]
    return tree_digest(root, folders, (".nii.gz", ".nii"))


def read_volume_list(path: Path) -> list[str]:
    """Volume names from a one-name-a-line text file such as ``no_chest_train.txt``.

    Tolerates blank lines, surrounding whitespace and quotes, a ``VolumeName`` header, ``#``
    comments, Windows line ends, a byte-order mark, folder prefixes, and names with or without
    ``.nii.gz`` or ``.nii``. Entries come in :func:`volume_name`'s form (a scan id such as ``train_1_a`` stays
    one, as ``train_1_a.nii.gz``; the caller decides what it matches).
    """
    names = []
    for line in read_text(path).splitlines():  # names a file that is not UTF-8 text
        entry = line.strip().strip(",;").strip().strip("\"'").strip()
        if not entry or entry.startswith("#") or entry.lower() == "volumename":
            continue
        entry = PurePosixPath(entry.replace("\\", "/")).name
        names.append(volume_name(entry))
    return names


def scan_of_entry(entry: str) -> str | None:
    """``train_1_a`` from a list entry ``train_1_a.nii.gz`` that names a whole scan, else None."""
    m = re.fullmatch(r"((?:train|valid)_[0-9]+_[a-z]+)\.nii(\.gz)?", entry)
    return m[1] if m else None


def report_csv(root: Path, split: str) -> Path:
    return Path(root) / "radiology_text_reports" / f"{SPLITS[split]['reports']}_reports.csv"


def metadata_csv(root: Path, split: str) -> Path:
    return Path(root) / "metadata" / f"{SPLITS[split]['reports']}_metadata.csv"


def labels_csv(root: Path, split: str) -> Path:
    return Path(root) / "multi_abnormality_labels" / f"{SPLITS[split]['labels']}_predicted_labels.csv"
