"""The cohort table: volumes on disk joined with metadata, reports and labels, one row each.

Every CT-RATE-layout dataset (the real release, the demo cohort, converted DICOM) goes through
this one function. A row that cannot be used lands in the rejects table with its reason.
"""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from ctprep import ctrate, geometry, rejects
from ctprep.volume import VolumeError

logger = logging.getLogger(__name__)

#: Report sections under the names the prompt templates use.
SECTIONS = {
    "ClinicalInformation_EN": "clinical_information",
    "Technique_EN": "technique",
    "Findings_EN": "findings",
    "Impressions_EN": "impression",
}


def chunk_of(patient: str, n_chunks: int) -> int:
    """Stable chunk of a patient (all its volumes together), the same on every machine."""
    return zlib.crc32(patient.encode()) % n_chunks


def parse_age(value: object) -> int | None:
    """DICOM age string ('036Y', '18M', '2W') in whole years; None where absent."""
    text = str(value).strip().upper()
    if not text or text in {"NAN", "NONE"}:
        return None
    unit = text[-1] if text[-1] in "DWMY" else "Y"
    digits = text[:-1] if text[-1] in "DWMY" else text
    try:
        n = float(digits)
    except ValueError:
        return None
    return int(n / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[unit])


def _read(path: Path, what: str) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"{what} table not found: {path} (is dataset.root a CT-RATE copy?)")
    # strings throughout: list columns and "Not given." stay exactly as written
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _discover(root: Path, split: str) -> dict[str, Path]:
    """Volume files under ``root/<split folder>``, by file name."""
    found: dict[str, Path] = {}
    base = root / ctrate.SPLITS[split]["volumes"]
    for dirpath, _dirs, files in os.walk(base):
        for name in files:
            if name.endswith((".nii.gz", ".nii")):
                found[name] = Path(dirpath) / name
    return found


def _is_empty(text: str) -> bool:
    return not text.strip() or text.strip().rstrip(".").lower() == ctrate.NOT_GIVEN.rstrip(".").lower()


def build_cohort(root: str | Path, splits=("train", "valid"), n_chunks: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Join a CT-RATE-layout dataset into (cohort table, rejects table)."""
    root = Path(root).resolve()
    rows: list[dict] = []
    bad: list[dict] = []
    for split in splits:
        tables = {
            "metadata": _read(ctrate.metadata_csv(root, split), "metadata"),
            "report": _read(ctrate.report_csv(root, split), "report"),
            "labels": _read(ctrate.labels_csv(root, split), "labels"),
        }
        files = _discover(root, split)
        indexed: dict[str, dict[str, dict]] = {}
        for kind, df in tables.items():
            if "VolumeName" not in df.columns:
                raise ValueError(f"{kind} table of split {split} has no VolumeName column")
            dupes = set(df["VolumeName"][df["VolumeName"].duplicated()])
            for name in sorted(dupes):
                bad.append({"VolumeName": name, "split": split, "stage": "cohort", "reason": f"duplicate {kind} rows"})
            indexed[kind] = {r["VolumeName"]: r for r in df.to_dict("records") if r["VolumeName"] not in dupes}
        names = sorted(set(files) | set().union(*(set(v) for v in indexed.values())))
        for name in names:
            row, reason = _join(root, split, name, files, indexed, n_chunks)
            if reason:
                bad.append({"VolumeName": name, "split": split, "stage": "cohort", "reason": reason})
            else:
                rows.append(row)
    cohort = pd.DataFrame(rows)
    rej = rejects.frame(bad).drop_duplicates().reset_index(drop=True)
    if len(cohort):
        cohort = cohort.sort_values(["split", "VolumeName"], kind="stable").reset_index(drop=True)
        _check_patient_splits(cohort)
    logger.info("cohort: %d volumes, %d rejected", len(cohort), len(rej))
    return cohort, rej


def _join(root: Path, split: str, name: str, files: dict, indexed: dict, n_chunks: int) -> tuple[dict, str]:
    try:
        parts = ctrate.parse_volume_name(name)
    except ValueError as err:
        return {}, f"invalid VolumeName: {err}"
    if parts["split"] != split:
        return {}, f"VolumeName belongs to split {parts['split']} but is listed under {split}"
    if name not in files:
        return {}, f"volume file not found (expected {ctrate.volume_relpath(name)})"
    path = files[name]  # found by walking the split folder (symlinked folders are not followed)
    for kind in ("metadata", "report", "labels"):
        if name not in indexed[kind]:
            return {}, f"missing {kind} row"
    meta, report, labels = indexed["metadata"][name], indexed["report"][name], indexed["labels"][name]
    missing = [c for c in ctrate.REQUIRED_METADATA if c not in meta]
    if missing:
        return {}, f"metadata lacks columns {missing}"
    try:
        geometry.parse_list(meta["ImagePositionPatient"], 3, "ImagePositionPatient")
        geometry.parse_list(meta["ImageOrientationPatient"], 6, "ImageOrientationPatient")
        xy = geometry.parse_list(meta["XYSpacing"], 2, "XYSpacing")
        z = float(meta["ZSpacing"])
        slope, intercept = float(meta["RescaleSlope"]), float(meta["RescaleIntercept"])
        n_slices = int(float(meta["NumberofSlices"]))
    except (VolumeError, ValueError) as err:
        return {}, f"bad metadata: {err}"
    if not (np.isfinite([z, slope, intercept]).all() and z > 0 and slope != 0):
        return {}, f"bad metadata: ZSpacing {z}, RescaleSlope {slope}, RescaleIntercept {intercept}"
    sections = {SECTIONS[c]: str(report.get(c, "")).strip() for c in SECTIONS}
    if _is_empty(sections["impression"]):
        return {}, "empty impression"
    try:
        label_values = {lab: int(float(labels[lab])) for lab in ctrate.LABELS}
    except KeyError as err:
        return {}, f"labels table lacks column {err}"
    except ValueError:
        return {}, "non-numeric label value"
    if any(v not in (0, 1) for v in label_values.values()):
        return {}, "label values must be 0 or 1"
    row = {
        "VolumeName": name,
        "split": split,
        "patient": parts["patient"],
        "scan": parts["scan"],
        "recon": parts["recon"],
        "path": str(path),
        "chunk": chunk_of(parts["patient"], n_chunks),
        "sex": {"M": "male", "F": "female"}.get(meta["PatientSex"].strip().upper()),
        "age": parse_age(meta["PatientAge"]),
        "xy_spacing": xy,
        "z_spacing": z,
        "n_slices": n_slices,
        **{f"meta_{c}": meta.get(c) for c in ctrate.METADATA_COLUMNS if c != "VolumeName"},
        **{k: ("" if _is_empty(v) else v) for k, v in sections.items()},
        **label_values,
    }
    return row, ""


def _check_patient_splits(cohort: pd.DataFrame) -> None:
    """No patient in two splits: a leak here would score the generator on its training data."""
    per_patient = cohort.groupby("patient")["split"].nunique()
    leaked = per_patient[per_patient > 1]
    if len(leaked):
        raise ValueError(f"patients in more than one split: {sorted(leaked.index)[:10]}")


def write_cohort(root: str | Path, out_table: str | Path, out_rejects: str | Path, splits=("train", "valid"),
                 n_chunks: int = 1, strict: bool = False) -> pd.DataFrame:
    """Build and write the cohort table and its rejects (Parquet)."""
    cohort, rej = build_cohort(root, splits, n_chunks)
    rejects.check(rej, strict, "cohort building")
    if cohort.empty:
        raise ValueError(f"no usable volume under {root}: {len(rej)} rejected")
    Path(out_table).parent.mkdir(parents=True, exist_ok=True)
    cohort.to_parquet(out_table, index=False)
    rej.to_parquet(out_rejects, index=False)
    return cohort


def rows_for_chunk(cohort_path: str | Path, chunk: int) -> pd.DataFrame:
    """The cohort rows of one chunk, read with a Parquet filter (cheap at 50k rows)."""
    return pd.read_parquet(cohort_path, filters=[("chunk", "==", int(chunk))])


def metadata_row(row: pd.Series | dict) -> dict:
    """The CT-RATE metadata of a cohort row, under its original column names."""
    return {c[5:]: v for c, v in dict(row).items() if c.startswith("meta_")}
