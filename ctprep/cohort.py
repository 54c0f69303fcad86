"""The cohort table: volumes on disk joined with metadata, reports and labels, one row each.

Every CT-RATE-layout dataset (the real release, the demo cohort, converted DICOM) goes through
this one function. Volumes are found in both layouts (``<split>_fixed/`` and ``<split>/``, see
:mod:`ctprep.ctrate`); where one is in both, ``prefer`` picks the copy, and the row records its
``layout``. A volume that cannot be used lands in the rejects table with its reason; one the
tables list but nobody downloaded is only counted ("not downloaded" in the summary), since
users download subsets. Blank label cells are unknown, not negative: they stay missing (``<NA>``
in a nullable ``Int8`` column).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ctprep import ctrate, geometry, rejects
from ctprep.errors import UserError
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


#: Label cells that mean "unknown" (CT-RATE leaves them blank; other writers spell it out).
MISSING_LABEL = {"", "nan", "na", "n/a", "none", "null"}
#: The cohort table's label dtype: 0, 1 or missing (pandas' nullable integer; Parquet nulls).
LABEL_DTYPE = "Int8"
#: Reject reasons that are deliberate exclusions, not bad input: they never fail a strict run.
EXCLUDED = "not a chest CT"
_NOT_DOWNLOADED = "not downloaded"


@dataclass
class CohortBuild:
    """What :func:`assemble_cohort` found: the table, its rejects, and the counts of the summary."""

    table: pd.DataFrame
    rejects: pd.DataFrame
    summary: dict = field(default_factory=dict)


def _read(path: Path, what: str) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"{what} table not found: {path} (is dataset.root a CT-RATE copy?)")
    try:  # strings throughout: list columns and "Not given." stay exactly as written
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except UnicodeDecodeError as err:  # an Excel re-save in a local code page
        raise UserError(f"{what} table {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except ValueError as err:  # pandas' ParserError (an unterminated quote), EmptyDataError (a 0-byte download)
        raise UserError(f"{what} table {path}: {' '.join(str(err).split())}") from None
    if "VolumeName" not in df.columns:  # a Git LFS pointer, another separator
        raise UserError(f"{what} table {path}: no VolumeName column (columns: {', '.join(map(str, df.columns[:5]))})")
    return df


#: The columns each table must have (checked on its header: a renamed or misspelt column rejected every volume of the
#: split one by one, or, for the findings, left them all empty without a word).
REQUIRED_COLUMNS = {"metadata": ctrate.REQUIRED_METADATA, "report": ctrate.REQUIRED_REPORT_COLUMNS,
                    "labels": ("VolumeName", *ctrate.LABELS)}


def _check_columns(df: pd.DataFrame, path: Path, what: str) -> None:
    """One line naming the table and the required columns its header lacks, with the near misses it has."""
    missing = [c for c in REQUIRED_COLUMNS[what] if c not in df.columns]
    if not missing:
        return
    have = [str(c) for c in df.columns if c not in REQUIRED_COLUMNS[what]]
    near = {c: difflib.get_close_matches(c, have, n=1) for c in missing}
    hints = ", ".join(f"{m[0]!r} for {c!r}" for c, m in near.items() if m)
    raise UserError(f"{what} table {path}: no column {', '.join(map(repr, missing))}"
                    + (f" (found {hints}: renamed?)" if hints else ""))


def _optional_report_columns(df: pd.DataFrame, path: Path) -> None:
    """A report table without a section the cohort can do without is used, but said so once."""
    absent = [c for c in SECTIONS if c not in df.columns]
    if absent:
        logger.warning("report table %s: no column %s; those sections are blank for every volume", path,
                       ", ".join(map(repr, absent)))


def _no_chest(root: Path, split: str) -> tuple[set[str], set[str], Path]:
    """(volume names, scan ids) listed in ``metadata/no_chest_<split>.txt``; empty where it is absent."""
    path = ctrate.no_chest_txt(root, split)
    if not path.is_file():
        return set(), set(), path
    entries = ctrate.read_volume_list(path)
    scans = {s for s in map(ctrate.scan_of_entry, entries) if s}
    return set(entries) - {f"{s}.nii.gz" for s in scans}, scans, path


def build_cohort(root: str | Path, splits=("train", "valid"), n_chunks: int = 1,
                 prefer: str = "fixed") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Join a CT-RATE-layout dataset into (cohort table, rejects table)."""
    built = assemble_cohort(root, splits, n_chunks, prefer)
    return built.table, built.rejects


def assemble_cohort(root: str | Path, splits=("train", "valid"), n_chunks: int = 1,
                    prefer: str = "fixed") -> CohortBuild:
    """Join a CT-RATE-layout dataset into the cohort table, its rejects and the summary counts."""
    if prefer not in ctrate.LAYOUTS:
        raise ValueError(f"dataset.prefer must be one of {list(ctrate.LAYOUTS)}, not {prefer!r}")
    unknown = [s for s in splits if s not in ctrate.SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}: CT-RATE's are {list(ctrate.SPLITS)}")
    root = Path(root).resolve()
    rows: list[dict] = []
    bad: list[dict] = []
    summary = {"root": str(root), "prefer": prefer, "splits": {}}
    for split in splits:
        paths = {"metadata": ctrate.metadata_csv(root, split), "report": ctrate.report_csv(root, split),
                 "labels": ctrate.labels_csv(root, split)}
        tables = {kind: _read(path, kind) for kind, path in paths.items()}
        for kind, df in tables.items():
            _check_columns(df, paths[kind], kind)
        _optional_report_columns(tables["report"], paths["report"])
        files = ctrate.discover(root, split)
        no_chest = _no_chest(root, split)
        indexed: dict[str, dict[str, dict]] = {}
        split_bad: list[dict] = []
        duplicated: dict[str, list[str]] = {}  # volume -> the tables that list it in rows that differ
        for kind in tables:
            df = tables[kind]
            df["VolumeName"] = df["VolumeName"].map(ctrate.volume_name)  # the disk's key (discover's)
            exact = df.duplicated()
            if exact.any():  # a row repeated exactly says nothing new: kept once
                logger.info("%s: %d rows repeat another row exactly; each kept once", paths[kind], exact.sum())
                tables[kind] = df = df[~exact]
            dupes = set(df["VolumeName"][df["VolumeName"].duplicated()])
            for name in dupes:
                duplicated.setdefault(name, []).append(kind)
            indexed[kind] = {r["VolumeName"]: r for r in df.to_dict("records") if r["VolumeName"] not in dupes}
        listed = set().union(*(set(df["VolumeName"]) for df in tables.values()))
        split_rows, not_downloaded = [], 0
        for name in sorted(set(files) | listed):
            row, reason = _join(root, split, name, files, indexed, duplicated, no_chest, n_chunks, prefer)
            if reason == _NOT_DOWNLOADED:
                not_downloaded += 1
            elif reason:
                split_bad.append({"VolumeName": name, "split": split, "stage": "cohort", "reason": reason,
                                  "layout": row.get("layout")})
            else:
                split_rows.append(row)
        summary["splits"][split] = _split_summary(files, listed, split_rows, split_bad, not_downloaded, no_chest)
        _log_split(split, summary["splits"][split])
        rows += split_rows
        bad += split_bad
    cohort = pd.DataFrame(rows)
    rej = rejects.frame(bad).drop_duplicates().reset_index(drop=True)
    if len(cohort):
        cohort = cohort.astype({lab: LABEL_DTYPE for lab in ctrate.LABELS})
        cohort = cohort.sort_values(["split", "VolumeName"], kind="stable").reset_index(drop=True)
        _check_patient_splits(cohort)
    summary["total"] = {k: sum(s[k] for s in summary["splits"].values())
                        for k in ("listed", "on_disk", "not_downloaded", "in_cohort", "rejected")}
    logger.info("cohort: %d volumes, %d rejected, %d listed but not downloaded",
                len(cohort), len(rej), summary["total"]["not_downloaded"])
    return CohortBuild(cohort, rej, summary)


def _split_summary(files: dict, listed: set, rows: list[dict], bad: list[dict], not_downloaded: int,
                   no_chest: tuple[set, set, Path]) -> dict:
    """Counts of one split: what the tables list, what is on disk per layout, where each volume went."""
    names, scans, path = no_chest
    known = listed | set(files)
    known_scans = {ctrate.volume_key(n).rsplit("_", 1)[0] for n in known}  # once: per scan id it was quadratic
    unmatched = sorted(names - known) + sorted(scans - known_scans)
    if unmatched:
        logger.warning("%s: %d entries name no volume of the tables or the disk (first: %s)", path.name,
                       len(unmatched), ", ".join(unmatched[:5]))
    return {
        "listed": len(listed),
        "on_disk": len(files),
        "on_disk_by_layout": {**{lay: sum(lay in c for c in files.values()) for lay in ctrate.LAYOUTS},
                              "both": sum(len(c) > 1 for c in files.values())},
        "not_downloaded": not_downloaded,
        "in_cohort": len(rows),
        "in_cohort_by_layout": {lay: sum(r["layout"] == lay for r in rows) for lay in ctrate.LAYOUTS},
        "rejected": len(bad),
        "rejected_by_reason": dict(sorted(Counter(b["reason"].split(":")[0] for b in bad).items())),
        "rejected_by_layout": dict(sorted(Counter(b.get("layout") or "none" for b in bad).items())),
        "no_chest_list": {"file": path.name if path.is_file() else None, "entries": len(names) + len(scans),
                          "unmatched": len(unmatched)},
        "labels_missing": {"volumes": sum(any(pd.isna(r[lab]) for lab in ctrate.LABELS) for r in rows),
                           "cells": sum(pd.isna(r[lab]) for r in rows for lab in ctrate.LABELS)},
    }


def _log_split(split: str, s: dict) -> None:
    by = s["on_disk_by_layout"]
    logger.info("%s: %d listed in the tables, %d on disk (%d in %s, %d in %s, %d in both), %d not downloaded, "
                "%d in the cohort, %d rejected %s", split, s["listed"], s["on_disk"], by["fixed"],
                ctrate.volume_folder(split, "fixed"), by["original"], ctrate.volume_folder(split, "original"),
                by["both"], s["not_downloaded"], s["in_cohort"], s["rejected"], s["rejected_by_reason"] or "")
    if s["labels_missing"]["cells"]:
        logger.info("%s: %d volumes have blank (unknown) labels, %d cells in all; kept as missing, not 0",
                    split, s["labels_missing"]["volumes"], s["labels_missing"]["cells"])


def _join(root: Path, split: str, name: str, files: dict, indexed: dict, duplicated: dict, no_chest: tuple,
          n_chunks: int, prefer: str) -> tuple[dict, str]:
    try:
        parts = ctrate.parse_volume_name(name)
    except ValueError as err:
        return {}, f"invalid VolumeName: {err}"
    if parts["split"] != split:
        return {}, f"VolumeName belongs to split {parts['split']} but is listed under {split}"
    copies = files.get(name, {})
    if not copies:  # listed, but this copy of CT-RATE does not hold it: counted, not an error
        return {}, _NOT_DOWNLOADED
    layout = prefer if prefer in copies else next(lay for lay in ctrate.LAYOUTS if lay in copies)
    where = {"layout": layout}
    if len(copies[layout]) > 1:
        folder = root / ctrate.volume_folder(split, layout)
        found = ", ".join(str(p.relative_to(folder)) for p in copies[layout])
        return where, f"{len(copies[layout])} files for one volume under {folder.name}/: {found}"
    path = copies[layout][0]  # found by walking the layout folder (symlinked folders are not followed)
    names, scans, list_path = no_chest
    if name in names or parts["scan"] in scans:
        return where, f"{EXCLUDED} (listed in metadata/{list_path.name})"
    if name in duplicated:  # after the exclusion, which strict mode lets pass; one reject naming every table
        return where, f"duplicate {' and '.join(duplicated[name])} rows that differ"
    for kind in ("metadata", "report", "labels"):
        if name not in indexed[kind]:
            return where, f"missing {kind} row"
    # every column read is there: the tables' headers were checked before the join (_check_columns)
    meta, report, labels = indexed["metadata"][name], indexed["report"][name], indexed["labels"][name]
    try:
        geometry.parse_list(meta["ImagePositionPatient"], 3, "ImagePositionPatient")
        geometry.parse_list(meta["ImageOrientationPatient"], 6, "ImageOrientationPatient")
        xy = geometry.parse_list(meta["XYSpacing"], 2, "XYSpacing")
        z, slope, intercept, n_slices = (_number(meta, c) for c in ("ZSpacing", "RescaleSlope", "RescaleIntercept",
                                                                    "NumberofSlices"))
    except (VolumeError, ValueError) as err:
        return where, f"bad metadata: {err}"
    if not (np.isfinite(n_slices) and n_slices >= 1 and n_slices == int(n_slices)):  # int(inf) raised and stopped all
        return where, f"bad metadata: NumberofSlices {meta['NumberofSlices']!r} is not a positive whole number"
    n_slices = int(n_slices)
    if not (np.isfinite([z, slope, intercept]).all() and z > 0 and slope != 0):
        return where, f"bad metadata: ZSpacing {z}, RescaleSlope {slope}, RescaleIntercept {intercept}"
    if min(xy) <= 0:
        return where, f"bad metadata: XYSpacing {meta['XYSpacing']!r} is not positive"
    sections = {SECTIONS[c]: str(report.get(c, "")).strip() for c in SECTIONS}
    if ctrate.is_blank_section(sections["impression"]):
        return where, "empty impression"
    label_values, reason = _labels(labels)
    if reason:
        return where, reason
    row = {
        "VolumeName": name,
        "split": split,
        "patient": parts["patient"],
        "scan": parts["scan"],
        "recon": parts["recon"],
        "path": str(path),
        "file_bytes": path.stat().st_size,  # a file replaced at the same path (a corrected download) prepares again
        "layout": layout,
        "layouts": "+".join(lay for lay in ctrate.LAYOUTS if lay in copies),
        "chunk": chunk_of(parts["patient"], n_chunks),
        "sex": {"M": "male", "F": "female"}.get(meta["PatientSex"].strip().upper()),
        "age": parse_age(meta["PatientAge"]),
        "xy_spacing": xy,
        "z_spacing": z,
        "n_slices": n_slices,
        **{f"meta_{c}": meta.get(c) for c in ctrate.METADATA_COLUMNS if c != "VolumeName"},
        **{k: ("" if ctrate.is_blank_section(v) else v) for k, v in sections.items()},
        **label_values,
    }
    return row, ""


def _number(meta: dict, column: str) -> float:
    """A number of the metadata row; a cell that is none names its column (float('') says only "''")."""
    try:
        return float(meta[column])
    except (TypeError, ValueError):
        raise ValueError(f"{column} {meta[column]!r} is not a number") from None


def _labels(labels: dict) -> tuple[dict, str]:
    """The 18 labels as 0, 1 or ``pd.NA`` (a blank cell: unknown, never negative); or a reject reason."""
    out = {}
    for lab in ctrate.LABELS:  # every one a column: the header was checked before the join
        text = str(labels[lab]).strip()
        if text.lower() in MISSING_LABEL:
            out[lab] = pd.NA
            continue
        try:
            value = float(text)
        except ValueError:
            return {}, f"non-numeric label value {text!r} ({lab})"
        if value not in (0.0, 1.0):
            return {}, f"label values must be 0, 1 or blank, not {text!r} ({lab})"
        out[lab] = int(value)
    return out, ""


def _check_patient_splits(cohort: pd.DataFrame) -> None:
    """No patient in two splits: a leak here would score the generator on its training data."""
    per_patient = cohort.groupby("patient")["split"].nunique()
    leaked = per_patient[per_patient > 1]
    if len(leaked):
        raise ValueError(f"patients in more than one split: {sorted(leaked.index)[:10]}")


def write_cohort(root: str | Path, out_table: str | Path, out_rejects: str | Path, splits=("train", "valid"),
                 n_chunks: int = 1, strict: bool = False, prefer: str = "fixed",
                 out_summary: str | Path | None = None) -> pd.DataFrame:
    """Build and write the cohort table and its rejects (Parquet), and the summary counts (JSON).

    Strict mode fails on bad input, not on deliberate exclusions (volumes listed as not chest).
    """
    built = assemble_cohort(root, splits, n_chunks, prefer)
    cohort, rej = built.table, built.rejects
    # the rejects and the summary first, for `ctprep cohort` by hand (a failed Snakemake job's outputs are
    # removed: the errors below point to the log, which lists every reject)
    Path(out_rejects).parent.mkdir(parents=True, exist_ok=True)
    rej.to_parquet(out_rejects, index=False)
    if out_summary is not None:
        write_summary(built.summary, out_summary)
    excluded = rej["reason"].str.startswith(EXCLUDED)
    for r in rej[excluded].itertuples(index=False):
        logger.info("excluded %s: %s", r.VolumeName, r.reason)
    rejects.check(rej[~excluded], strict, "cohort building")
    if cohort.empty:
        t = built.summary["total"]
        folders = ", ".join(f"{ctrate.volume_folder(s, lay)}/" for s in splits for lay in ctrate.LAYOUTS)
        reasons = sum((Counter(s["rejected_by_reason"]) for s in built.summary["splits"].values()), Counter())
        top = "; ".join(f"{n} {reason}" for reason, n in reasons.most_common(3))
        raise ValueError(f"no usable volume under {root}: {t['on_disk']} found on disk (in {folders}), "
                         f"{t['listed']} listed in the tables, {len(rej)} rejected"
                         + (f" ({top}; the log lists each reject)" if top else ""))
    Path(out_table).parent.mkdir(parents=True, exist_ok=True)
    cohort.to_parquet(out_table, index=False)
    return cohort


def write_summary(summary: dict, path: str | Path) -> None:
    """The summary counts as JSON."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(summary, indent=2) + "\n")


def rows_for_chunk(cohort_path: str | Path, chunk: int) -> pd.DataFrame:
    """The cohort rows of one chunk, read with a Parquet filter (cheap at 50k rows)."""
    return pd.read_parquet(cohort_path, filters=[("chunk", "==", int(chunk))])


def metadata_row(row: pd.Series | dict) -> dict:
    """The CT-RATE metadata of a cohort row, under its original column names."""
    return {c[5:]: v for c, v in dict(row).items() if c.startswith("meta_")}


def prep_rows(cohort_path: str | Path, chunk: int) -> pd.DataFrame:
    """The cohort rows of ``chunk`` with the columns preprocessing reads: name, split, file and CT-RATE metadata.

    :func:`chunk_digest` hashes exactly these, so a cohort rerun prepares again only the chunks whose volumes or
    metadata changed (a report or label correction, or a volume downloaded into another chunk, prepares nothing).
    """
    return prep_rows_of(rows_for_chunk(cohort_path, chunk))


def prep_rows_of(rows: pd.DataFrame) -> pd.DataFrame:
    """The columns of cohort rows that preprocessing reads (see :func:`prep_rows`), with the file's size: the
    file's content is what prep reads of ``path``, and its size is what the cohort's rerun trigger compares."""
    own = [c for c in ("VolumeName", "split", "path", "file_bytes") if c in rows.columns]
    return rows[[*own, *sorted(c for c in rows.columns if c.startswith("meta_"))]]


def chunk_digest(cohort_path: str | Path, chunk: int) -> str:
    """A digest of what ``prep`` reads of one chunk (:func:`prep_rows`): the workflow's prep param, so that a cohort
    rerun that leaves a chunk's rows as they were reruns no preparation of it. Read once per cohort file."""
    stat = Path(cohort_path).stat()
    return _chunk_digests(str(cohort_path), stat.st_ino, stat.st_mtime_ns, stat.st_size).get(int(chunk), "empty")


@functools.lru_cache(maxsize=4)
def _chunk_digests(path: str, inode: int, mtime_ns: int, size: int) -> dict[int, str]:
    """Every chunk's digest of one cohort file. Inode, mtime and size key the cache: a rerun writes the file anew
    (Snakemake removes a job's outputs first: a new inode, where a coarse clock may leave the mtime and a
    same-sized table the size as they were)."""
    table = pd.read_parquet(path)
    out = {}
    for chunk, rows in table.groupby("chunk"):
        rows = prep_rows_of(rows).sort_values("VolumeName")
        # JSON of the rows (sorted keys, every missing cell null): stable across pandas versions, which
        # hash_pandas_object is not (nor is NaN vs None for a missing cell)
        rows = rows.astype(object).where(rows.notna(), None)
        text = json.dumps(rows.to_dict("records"), sort_keys=True, default=str)
        out[int(chunk)] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return out

