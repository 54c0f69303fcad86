"""The demo cohort: a seeded synthetic chest-CT release in CT-RATE's exact layout.

``write_demo_cohort(root, cfg)`` writes volumes, reports, metadata and labels where CT-RATE puts
them, with CT-RATE's traps: NIfTI headers with default geometry (truth is in the metadata), PNMS
files whose slices run feet-to-head, half the volumes already in HU although the metadata still
says ``RescaleIntercept`` -1024/-8192, and optional broken volumes for the rejects table. A
``demo_truth.csv`` beside the release (not part of CT-RATE) records what was drawn, so tests can
re-render any volume from its phantom.

``layout`` says which of CT-RATE's two copies the release holds (see :mod:`ctprep.ctrate`):
``original`` (the default) writes ``<split>/`` with ``hu_fraction`` of the files already in HU,
``fixed`` writes every volume in HU into ``<split>_fixed/``, and ``both`` writes both trees with
a quarter of the volumes only in ``_fixed`` and a quarter only in the original. ``no_chest`` lists
that many clean volumes per split in ``metadata/no_chest_<split>.txt``, and ``blank_labels``
leaves that share of label cells blank (unknown). Left at their defaults, these options write
exactly the files earlier versions wrote.

Every random draw comes from a generator seeded by ``(seed, purpose, split, patient, scan, ...)``,
so a volume does not depend on the others and the same config writes the same bytes.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ctprep.ctrate import (LABELS, LAYOUTS, METADATA_COLUMNS, REPORT_COLUMNS, labels_csv, metadata_csv, no_chest_txt,
                           report_csv, volume_key, volume_relpath)
from ctprep.demo.findings import KIND_OF_LABEL, sample_findings
from ctprep.demo.phantom import Phantom, sample_anatomy
from ctprep.demo.reports import compose_report
from ctprep.geometry import affine_from_ctrate_row
from ctprep.volume import atomic_write_bytes

logger = logging.getLogger(__name__)

DEFAULTS = {
    "seed": 0,
    "n_train_patients": 8,
    "n_valid_patients": 3,
    "max_scans_per_patient": 2,
    "max_recons_per_scan": 2,
    "matrix": 128,
    "slices": [40, 72],
    "fov_mm": [320, 420],
    "z_spacing_mm": [2.5, 5.0],
    "hu_fraction": 0.5,
    "faults": [],
    "layout": "original",
    "no_chest": 0,
    "blank_labels": 0.0,
}
#: What ``layout`` writes: the copies of the release (``both``: some volumes in one copy only).
DEMO_LAYOUTS = ("original", "fixed", "both")
FAULTS = ("truncated_gzip", "nan", "constant", "wrong_dims", "missing_metadata", "missing_report",
          "empty_impression", "bad_list", "path_escape")
ESCAPE_NAME = "../../etc/passwd.nii.gz"
#: Volumes whose files store slices feet-to-head (the metadata's slice 0 is the file's last).
REVERSED_SLICE_MANUFACTURERS = ("PNMS",)
PREVALENCE = (0.15, 0.35)  # range of each label's prevalence among abnormal scans
NORMAL_FRACTION = 0.25  # scans drawn with no finding at all

#: Per manufacturer: models, (kernel, nominal noise HU) for recon 1, 2, ..., metadata intercept,
#: the HU written outside the reconstruction circle (None: the whole square is reconstructed).
SCANNERS = {
    "SIEMENS": {"models": ("SOMATOM Definition Edge", "SOMATOM go.Now"), "kernels": (("Br60f", 22.0), ("Br40d", 12.0)),
                "filter": "FLAT", "intercept": -8192, "pad": -1024.0, "bits": 16},
    "PNMS": {"models": ("NeuViz 16 Classic", "NeuViz 128"), "kernels": (("LUNG", 21.0), ("STANDARD", 11.0)),
             "filter": "BODY", "intercept": -1024, "pad": None, "bits": 12},
    "Philips": {"models": ("Brilliance 64", "Ingenuity CT"), "kernels": (("YA", 23.0), ("B", 12.0)),
                "filter": "B", "intercept": -1024, "pad": None, "bits": 12},
    "GE MEDICAL SYSTEMS": {"models": ("Revolution EVO", "Optima CT660"), "kernels": (("LUNG", 24.0), ("STANDARD", 10.0)),
                           "filter": "BODY FILTER", "intercept": -1024, "pad": -2048.0, "bits": 16},
    "TOSHIBA": {"models": ("Aquilion PRIME", "Aquilion Lightning"), "kernels": (("FC52", 21.0), ("FC07", 11.0)),
                "filter": "LARGE", "intercept": -1024, "pad": -2048.0, "bits": 12},
}
_SPLIT_ID = {"train": 0, "valid": 1}


@dataclass
class _Vol:
    """One planned volume: its rows in every table and what is needed to render it."""

    name: str
    split: str
    phantom: Phantom | None
    meta: dict
    report: dict
    labels: dict
    render: dict  # noise_std, convention, fov_pad_hu, fov_center_ras, fov_radius_mm, noise_seed
    fault: str = ""
    truth: dict = field(default_factory=dict)
    copies: dict = field(default_factory=dict)  # layout -> stored convention of that copy
    blank: list = field(default_factory=list)  # labels whose cells are left blank
    no_chest: bool = False  # listed in metadata/no_chest_<split>.txt


def write_demo_cohort(root: str | Path, cfg: dict, workers: int = 1) -> pd.DataFrame:
    """Write the cohort under ``root`` (the ``dataset/`` folder); return the truth table.

    ``workers`` > 1 renders that many volumes at a time in worker processes; every volume draws from
    its own seeded generators, so the bytes are the same for any ``workers``.
    """
    cfg = {**DEFAULTS, **(cfg or {})}
    bad = [f for f in cfg["faults"] if f not in FAULTS]
    if bad:
        raise ValueError(f"unknown fault kinds {bad}; choose from {list(FAULTS)}")
    if cfg["layout"] not in DEMO_LAYOUTS:
        raise ValueError(f"unknown demo layout {cfg['layout']!r}; choose from {list(DEMO_LAYOUTS)}")
    seed = cfg["seed"]  # numpy's "expected non-negative integer" named no key
    if isinstance(seed, (int, float)) and seed < 0:
        raise ValueError(f"demo.seed must be a non-negative integer, not {seed!r}")
    for key in ("slices", "fov_mm", "z_spacing_mm"):  # [10, 8] was taken, its volumes drawn from an empty range
        if len(cfg[key]) != 2 or cfg[key][0] > cfg[key][1]:
            raise ValueError(f"demo.{key} must be [min, max] with min <= max, not {cfg[key]!r}")
    root = Path(root)
    vols = _plan(cfg)
    _place(vols, cfg)
    logger.info("demo cohort: %d volumes (%d with faults) -> %s", len(vols), sum(bool(v.fault) for v in vols), root)
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        written = (pool.map if pool else map)(_write_volume, [root] * len(vols), vols)  # in order
        for i, (v, (render, copies)) in enumerate(zip(vols, written)):
            v.render, v.copies = render, copies  # as written (a NaN volume is stored in HU): the truth table's source
            if (i + 1) % 10 == 0:
                logger.info("rendered %d/%d volumes", i + 1, len(vols))
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    truth = _write_tables(root, vols, extended=_extended(cfg))
    logger.info("demo cohort written: %d volumes, %d rows of truth", len(vols), len(truth))
    return truth


# --- planning -----------------------------------------------------------------------------------
def _plan(cfg: dict) -> list[_Vol]:
    seed = int(cfg["seed"])
    rng = np.random.default_rng([seed, 0])
    prevalence = {lab: float(rng.uniform(*PREVALENCE)) for lab in LABELS if lab in KIND_OF_LABEL}
    # Manufacturers cycle and HU storage follows a golden-ratio sequence, so even a tiny cohort
    # holds every scanner and both conventions in the configured proportion.
    state = {"scan": int(rng.integers(len(SCANNERS))), "vol": float(rng.random())}
    vols: list[_Vol] = []
    for split, n in (("train", cfg["n_train_patients"]), ("valid", cfg["n_valid_patients"])):
        for pid in range(1, int(n) + 1):
            vols += _plan_patient(cfg, split, pid, prevalence, state, (seed, 1, _SPLIT_ID[split], pid))
        if split == "train":
            for i, fault in enumerate(cfg["faults"]):
                pid = int(cfg["n_train_patients"]) + 1 + i
                one = {**cfg, "max_scans_per_patient": 1, "max_recons_per_scan": 1}
                fv = _plan_patient(one, "train", pid, {}, state, (seed, 5, i))  # no findings
                fv[0].fault = fault
                if fault == "path_escape":
                    fv[0].name = ESCAPE_NAME
                    fv[0].meta["VolumeName"] = fv[0].report["VolumeName"] = ESCAPE_NAME
                vols.append(fv[0])
    return vols


def _extended(cfg: dict) -> bool:
    """Whether the release departs from the original layout (the truth table then says how)."""
    return cfg["layout"] != "original" or int(cfg["no_chest"]) > 0 or float(cfg["blank_labels"]) > 0


def _place(vols: list[_Vol], cfg: dict) -> None:
    """Which copies hold each volume, blank label cells, and the volumes listed as not chest.

    Drawn after planning, from their own seeds, so the volumes themselves do not change.
    """
    for i, v in enumerate(vols):
        original, fixed = {"original": v.render["convention"]}, {"fixed": "hu"}
        if cfg["layout"] == "original":
            v.copies = original
        elif cfg["layout"] == "fixed":
            v.copies = fixed
        else:  # both: users hold partial copies of each tree
            v.copies = {1: fixed, 3: original}.get(i % 4, {**fixed, **original})
        if float(cfg["blank_labels"]) > 0:
            rng = np.random.default_rng([int(cfg["seed"]), 7, i])
            v.blank = [lab for lab in LABELS if rng.random() < float(cfg["blank_labels"])]
    for split in ("train", "valid"):
        clean = [v for v in vols if v.split == split and not v.fault]
        n = min(int(cfg["no_chest"]), len(clean))
        if n:
            rng = np.random.default_rng([int(cfg["seed"]), 6, _SPLIT_ID[split]])
            for k in rng.choice(len(clean), size=n, replace=False):
                clean[int(k)].no_chest = True


def _plan_patient(cfg, split, pid, prevalence, state, key) -> list[_Vol]:
    rng = np.random.default_rng(list(key))
    n_hi, z_hi = int(cfg["slices"][1]), float(cfg["z_spacing_mm"][1])
    patient = {
        "anatomy": sample_anatomy(rng, max_lung_height=(n_hi - 1) * z_hi - 70.0),  # fits the longest scan
        "sex": str(rng.choice(["M", "F"])),
        "age": int(rng.integers(25, 86)),
    }
    day = datetime.date(2018, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 1400)))
    vols = []
    for s in range(int(rng.integers(1, int(cfg["max_scans_per_patient"]) + 1))):
        maker = list(SCANNERS)[state["scan"] % len(SCANNERS)]
        state["scan"] += 1
        scan = f"{split}_{pid}_{chr(ord('a') + s)}"
        srng = np.random.default_rng(list(key) + [s])
        vols += _plan_scan(cfg, scan, split, patient, maker, day, prevalence, srng, state)
        day += datetime.timedelta(days=int(rng.integers(30, 400)))
    return vols


def _plan_scan(cfg, scan, split, patient, maker, day, prevalence, rng, state) -> list[_Vol]:
    """One acquisition: findings, report, and 1..max_recons reconstructions of the same anatomy."""
    sc, m, anatomy = SCANNERS[maker], int(cfg["matrix"]), patient["anatomy"]
    n_lo, n_hi = (int(x) for x in cfg["slices"])
    z_lo, z_hi = (float(x) for x in cfg["z_spacing_mm"])
    f_lo, f_hi = (float(x) for x in cfg["fov_mm"])
    # The reconstruction circle holds the body where the range allows (large patients get cut).
    fov = float(round(rng.uniform(min(max(f_lo, 2 * anatomy.body_axes[0] + 10.0), f_hi), f_hi)))
    sp = round(fov / m, 6)
    rc = [round(float(rng.uniform(-8, 8)), 1), round(float(rng.uniform(-30, 5)), 1)]  # LPS recon centre
    half = (m - 1) / 2.0 * sp
    z_top = round(float(rng.uniform(-250, 150)), 1)
    apex_gap = float(rng.uniform(5, 20))
    cover = apex_gap + anatomy.lung_height + 40.0 + float(rng.uniform(0, 40))  # apices to upper abdomen
    recons = []
    for r in range(int(rng.integers(1, int(cfg["max_recons_per_scan"]) + 1))):
        lo = max(z_lo, cover / (n_hi - 1))
        dz = round(float(rng.uniform(lo, z_hi)) if lo < z_hi else z_hi, 2)
        n = int(np.clip(math.ceil(cover / dz) + 1, n_lo, n_hi))
        kernel, noise = sc["kernels"][r % len(sc["kernels"])]
        recons.append((dz, n, kernel, round(noise * float(rng.uniform(0.9, 1.1)), 1)))
    # Findings are at least half a voxel diagonal thick, so each is hit by a voxel centre.
    min_feature = 0.5 * math.sqrt(2 * sp * sp + max(r[0] for r in recons) ** 2)
    present = [lab for lab in prevalence if rng.random() < prevalence[lab]]
    if rng.random() < NORMAL_FRACTION:  # without this almost no scan would read as normal
        present = []
    centre = [round(-rc[0] + float(rng.uniform(-12, 12)), 2), round(-rc[1] + float(rng.uniform(-15, 10)), 2)]
    p = anatomy.replace(center_ras=centre, z_apex=round(z_top - apex_gap, 2), contrast=bool(rng.random() < 0.3))
    p = Phantom.from_json(sample_findings(p, present, rng, min_feature).to_json())
    labels = {lab: int(any(f["label"] == lab for f in p.pathologies)) for lab in LABELS}
    report = compose_report(p, np.random.default_rng(list(rng.integers(0, 2**32, 2))), recons[0][0])
    common = _scan_metadata(maker, sc, rng, patient, day, fov, rc, z_top, m)
    vols = []
    for r, (dz, n, kernel, noise) in enumerate(recons, start=1):
        name = f"{scan}_{r}.nii.gz"
        hu = (state["vol"] % 1.0) < float(cfg["hu_fraction"])
        state["vol"] += 0.6180339887498949
        meta = {**common, "VolumeName": name, "ConvolutionKernel": kernel,
                "SeriesDescription": f"{'LUNG' if r == 1 else 'MEDIASTINUM'} {dz:g} {kernel}",
                "ImagePositionPatient": _fmt([rc[0] - half, rc[1] - half, z_top]),
                "SliceThickness": dz, "NumberofSlices": n, "ZSpacing": dz, "XYSpacing": _fmt([sp, sp])}
        render = {"noise_std": noise, "convention": "hu" if hu else "raw", "fov_pad_hu": sc["pad"],
                  "fov_center_ras": [-rc[0], -rc[1]], "fov_radius_mm": fov / 2.0,
                  "noise_seed": [int(x) for x in rng.integers(0, 2**32, 2)]}
        meta = {c: meta[c] for c in METADATA_COLUMNS}
        vols.append(_Vol(name, split, p, meta, {"VolumeName": name, **report}, labels, render))
    return vols


def _scan_metadata(maker, sc, rng, patient, day, fov, rc, z_top, m) -> dict:
    """DICOM header fields shared by the reconstructions of one acquisition."""
    kv_ma = int(rng.integers(60, 320))
    t_ms = int(rng.choice([500, 600, 750, 1000]))
    pitch = float(rng.choice([0.8, 1.0, 1.2, 1.375]))
    coll = float(rng.choice([0.5, 0.6, 0.625]))
    total = coll * int(rng.choice([16, 32, 64]))
    return {
        "Manufacturer": maker, "ManufacturerModelName": str(rng.choice(sc["models"])),
        "PatientSex": patient["sex"], "PatientAge": f"{patient['age']:03d}Y", "ReconstructionDiameter": fov,
        "DistanceSourceToDetector": round(float(rng.uniform(940, 1100)), 1),
        "DistanceSourceToPatient": round(float(rng.uniform(540, 620)), 1), "GantryDetectorTilt": 0.0,
        "TableHeight": round(float(rng.uniform(110, 190)), 1), "RotationDirection": "CW",
        "ExposureTime": t_ms, "XRayTubeCurrent": kv_ma, "Exposure": int(kv_ma * t_ms / 1000),
        "FilterType": sc["filter"], "GeneratorPower": int(kv_ma * 120 / 1000),
        "FocalSpots": float(rng.choice([0.7, 1.0, 1.2])),
        "PatientPosition": "HFS", "RevolutionTime": t_ms / 1000.0, "SingleCollimationWidth": coll,
        "TotalCollimationWidth": total, "TableSpeed": round(total * pitch / (t_ms / 1000.0), 2),
        "TableFeedPerRotation": round(total * pitch, 2), "SpiralPitchFactor": pitch,
        "DataCollectionCenterPatient": _fmt([0.0, rc[1], z_top - 150.0]),
        "ReconstructionTargetCenterPatient": _fmt([rc[0], rc[1], z_top - 150.0]),
        "ExposureModulationType": str(rng.choice(["XYZ_EC", "NONE", "Z_EC"])),
        "CTDIvol": round(float(rng.uniform(2.5, 14.0)), 2), "ImageOrientationPatient": "[1, 0, 0, 0, 1, 0]",
        "Rows": m, "Columns": m, "BitsAllocated": 16, "BitsStored": sc["bits"],
        "RescaleIntercept": sc["intercept"], "RescaleSlope": 1, "RescaleType": "HU",
        "StudyDate": int(day.strftime("%Y%m%d")),
    }


def _fmt(values) -> str:
    """CT-RATE's list cells: ``"[-175.5, -190.2, -65.0]"``."""
    return "[" + ", ".join(repr(round(float(x), 6)) for x in values) + "]"


# --- rendering ----------------------------------------------------------------------------------
def render_hu(p: Phantom, meta: dict, render: dict) -> np.ndarray:
    """HU as the scanner would write them: array[row, column, slice], slice 0 the most superior.

    Each voxel is the phantom at the voxel centre that the metadata's affine gives, plus Gaussian
    noise of the kernel's level; outside the reconstruction circle, the scanner's padding value.
    """
    affine = affine_from_ctrate_row(meta, array_axes=("row", "column", "slice"), slice_direction=-1)
    m, n = int(meta["Rows"]), int(meta["NumberofSlices"])
    r, c = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
    plane = r.reshape(-1, 1) * affine[:3, 0] + c.reshape(-1, 1) * affine[:3, 1] + affine[:3, 3]  # (m*m, 3)
    hu = np.empty((m, m, n), dtype=np.float32)
    for k in range(n):  # one slice at a time: bounded memory, and the phantom skips far structures
        hu[:, :, k] = p.hu_at(plane + k * affine[:3, 2]).reshape(m, m)
    rng = np.random.default_rng(render["noise_seed"])
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(render["noise_std"])
    if render["fov_pad_hu"] is not None:
        fx, fy = render["fov_center_ras"]
        outside = ((plane[:, 0] - fx) ** 2 + (plane[:, 1] - fy) ** 2 > render["fov_radius_mm"] ** 2).reshape(m, m)
        hu[outside] = render["fov_pad_hu"]
    return hu


def _stored(v: _Vol, hu: np.ndarray) -> np.ndarray:
    """HU -> the values in the file: raw = HU - intercept (slope 1), int16, PNMS slices reversed."""
    data = hu if v.render["convention"] == "hu" else hu - np.float32(v.meta["RescaleIntercept"])
    data = np.clip(np.rint(data), -32768, 32767).astype(np.int16)
    if v.meta["Manufacturer"] in REVERSED_SLICE_MANUFACTURERS:
        data = data[:, :, ::-1]
    return np.ascontiguousarray(data)


def _nifti_gz(data: np.ndarray) -> bytes:
    """Gzipped NIfTI with CT-RATE's untrustworthy default header: identity affine, unit pixdim.

    gzip's header carries a timestamp; ``mtime=0`` keeps the bytes identical between runs.
    """
    from isal import igzip

    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_qform(np.eye(4), code=1)
    img.header.set_sform(np.eye(4), code=1)
    return igzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _write_volume(root: Path, v: _Vol) -> tuple[dict, dict]:
    """Write each copy of ``v``: rendered once, stored in each copy's convention; return (render, copies)
    as written, which a worker process cannot change in the caller's ``v``."""
    if v.fault == "path_escape":
        return v.render, v.copies
    paths = {layout: root / volume_relpath(v.name, layout) for layout in v.copies}
    if v.fault == "constant":
        m, n = int(v.meta["Rows"]), int(v.meta["NumberofSlices"])
        payload = _nifti_gz(np.full((m, m, n), -1024, dtype=np.int16))
        for path in paths.values():
            atomic_write_bytes(path, payload)
        return v.render, v.copies
    hu = render_hu(v.phantom, v.meta, v.render)
    if v.fault == "nan":
        data = hu.copy()
        m = data.shape[0]
        data[m // 4 : m // 2, m // 4 : m // 2, :] = np.nan
        v.render["convention"] = "hu"
        v.copies = dict.fromkeys(v.copies, "hu")
        payload = _nifti_gz(data.astype(np.float32))
        for path in paths.values():
            atomic_write_bytes(path, payload)
        return v.render, v.copies
    for layout in v.copies:
        data = _stored(v, hu)
        if layout == "fixed" and v.render["convention"] == "raw":
            # the _fixed release converted the original files: stored integers + intercept, exactly
            data = np.clip(data.astype(np.int32) + int(v.meta["RescaleIntercept"]), -32768, 32767).astype(np.int16)
        if v.fault == "wrong_dims":
            data = np.ascontiguousarray(data[:, :, data.shape[2] // 2])  # a single 2D slice
        payload = _nifti_gz(data)
        if v.fault == "truncated_gzip":
            payload = payload[: len(payload) // 2]
        atomic_write_bytes(paths[layout], payload)
    return v.render, v.copies


# --- tables -------------------------------------------------------------------------------------
def _write_tables(root: Path, vols: list[_Vol], extended: bool = False) -> pd.DataFrame:
    for split in ("train", "valid"):
        sv = [v for v in vols if v.split == split]
        meta = []
        for v in sv:
            if v.fault == "missing_metadata":
                continue
            row = dict(v.meta)
            if v.fault == "bad_list":
                row["ImagePositionPatient"] = "[1.0, abc]"
            meta.append(row)
        reports = []
        for v in sv:
            if v.fault == "missing_report":
                continue
            row = dict(v.report)
            if v.fault == "empty_impression":
                row["Findings_EN"] = row["Impressions_EN"] = ""
            reports.append(row)
        labels = [{"VolumeName": v.name, **{lab: "" if lab in v.blank else v.labels.get(lab, 0) for lab in LABELS}}
                  for v in sv]
        _csv(metadata_csv(root, split), meta, METADATA_COLUMNS)
        _csv(report_csv(root, split), reports, REPORT_COLUMNS)
        _csv(labels_csv(root, split), labels, ("VolumeName",) + LABELS)
        listed = [v.name for v in sv if v.no_chest]
        if listed:  # as a person writes such a list: some names without .nii.gz, stray spaces, blank lines
            lines = [name if k % 2 == 0 else f"  {volume_key(name)} " for k, name in enumerate(listed)]
            atomic_write_bytes(no_chest_txt(root, split), ("\n\n".join(lines) + "\n").encode())
    truth = pd.DataFrame([_truth_row(v, extended) for v in vols])
    atomic_write_bytes(root / "demo_truth.csv", truth.to_csv(index=False).encode())
    return truth


def _csv(path: Path, rows: list[dict], columns) -> None:
    atomic_write_bytes(path, pd.DataFrame(rows, columns=list(columns)).to_csv(index=False).encode())


def _truth_row(v: _Vol, extended: bool = False) -> dict:
    """What was drawn for ``v``; ``path`` and ``stored_convention`` describe the ``_fixed`` copy where
    there is one. ``extended`` adds the copies, blank labels and the no-chest mark."""
    p = v.phantom
    pick = "fixed" if "fixed" in v.copies else "original"
    escaped = v.fault == "path_escape"
    row = {
        "VolumeName": v.name,
        "split": v.split,
        "path": "" if escaped else volume_relpath(v.name, pick).as_posix(),
        "stored_convention": v.copies.get(pick, v.render["convention"]),
        "RescaleIntercept": v.meta["RescaleIntercept"],
        "Manufacturer": v.meta["Manufacturer"],
        "reversed_slices": v.meta["Manufacturer"] in REVERSED_SLICE_MANUFACTURERS,
        "n_slices": v.meta["NumberofSlices"],
        "matrix": v.meta["Rows"],
        "xy_spacing": json.loads(v.meta["XYSpacing"])[0],
        "z_spacing": v.meta["ZSpacing"],
        "noise_std": v.render["noise_std"],
        "fov_pad_hu": v.render["fov_pad_hu"],
        "fov_center_ras": json.dumps(v.render["fov_center_ras"]),
        "fov_radius_mm": v.render["fov_radius_mm"],
        "contrast": p.contrast,
        "labels": json.dumps([lab for lab in LABELS if v.labels.get(lab)]),
        "pathologies": json.dumps(p.pathologies, sort_keys=True),
        "phantom": p.to_json(),
        "fault": v.fault,
    }
    if extended:
        row.update({
            "layouts": "+".join(lay for lay in LAYOUTS if lay in v.copies),
            **{f"{lay}_path": "" if escaped or lay not in v.copies else volume_relpath(v.name, lay).as_posix()
               for lay in LAYOUTS},
            "original_convention": v.copies.get("original", ""),
            "blank_labels": json.dumps(v.blank),
            "no_chest": v.no_chest,
        })
    return row
