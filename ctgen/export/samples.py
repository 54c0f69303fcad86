"""A sampling job's files: one NIfTI + sidecar (+ DICOM series) per (report, repeat), and ``samples.csv``.

Both generator families write through :func:`write_samples`, so their outputs follow one contract:
seeds ``seed + index`` over the (report, repeat) pairs in order (the same seeds for the same
reports in either family, which is what pairs their volumes in the evaluation), file names
``<stem>_s<seed>.nii.gz`` (or ``<id>.nii.gz`` for the VLM3D contract), and one manifest row each.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ctgen.export.dicom import save_synthetic_dicom
from ctgen.export.nifti import save_synthetic_nifti, stored_as
from ctgen.export.sidecar import sidecar_path, write_sidecar
from ctprep.ctrate import volume_key
from ctprep.logs import progress
from ctprep.volume import Volume, atomic_write

logger = logging.getLogger(__name__)

#: generate(request, seed) -> (volume, its sidecar fields, the prompt text recorded in samples.csv)
Generate = Callable[[Any, int], tuple[Volume, dict, str]]


#: The files a sampling run wrote into its folder (absolute paths, one per line), beside ``samples.csv``: not a
#: workflow output, so it outlives Snakemake's removal of the manifest before a rerun (no ``.json``: a glob of the
#: sidecars must not find it).
WRITTEN = ".ctgen-written.txt"


def _last_run(out_dir: Path) -> list[str]:
    """The files an earlier run wrote into ``out_dir`` (or its DICOM folder): its record, else its manifest."""
    record, manifest = out_dir / WRITTEN, out_dir / "samples.csv"
    if record.is_file():
        try:
            return [line for line in record.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError):
            return []
    if manifest.is_file():  # a folder written before the record existed
        try:
            last = pd.read_csv(manifest)
            return [str(v) for c in ("nifti", "sidecar", "dicom") if c in last for v in last[c].dropna()]
        except (ValueError, OSError):
            return []
    return []


def _remove(paths: list[str], out_dir: Path, dicom_dir: str | Path | None, keep: set[str] = frozenset()) -> None:
    """Remove ``paths`` (but ``keep``) that lie inside this run's folders: a run with other seeds left its volumes
    beside the new ones, which a folder-based evaluation would have scored."""
    roots = [out_dir.resolve()] + ([Path(dicom_dir).resolve()] if dicom_dir else [])
    volumes = 0
    for value in paths:
        path = Path(value).resolve()
        if str(path) in keep or not any(path.is_relative_to(r) and path != r for r in roots):
            continue  # kept, or outside this run's folders
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            volumes += path.name.endswith(".nii.gz")
            path.unlink()
    if volumes:  # a folder holds one run's samples: said, as a user splitting a prompts file into one folder loses them
        logger.warning("removed %d volume(s) an earlier run wrote into %s (a folder holds one run's samples: give "
                       "each run its own output folder)", volumes, out_dir)


#: sampling settings that change how fast volumes are made, not their voxels (the workflow leaves them untracked)
SPEED_ONLY = ("sr_batch_size",)


def sample_identity(fields: dict[str, Any]) -> dict[str, Any]:
    """What, beside its request and seed, decides a sample's voxels, from a pipeline's sidecar fields: the settings,
    the weights and files hashes, the code (version and source hash), torch, the device and precision; not the
    prompt, seed, folder or commit (a commit of the documentation changes no voxel)."""
    prov = {k: v for k, v in (fields.get("provenance") or {}).items() if k not in ("seed", "git")}
    out = {k: v for k, v in fields.items() if k not in ("prompt", "report", "seed", "models_dir", "provenance",
                                                        "prompt_given", "text_tokens")}
    if isinstance(out.get("settings"), dict):  # how many slices a batch holds decides the speed, not the voxels:
        out["settings"] = {k: v for k, v in out["settings"].items() if k not in SPEED_ONLY}  # lowered after an OOM
    return {**out, "provenance": prov}


def _resume_key(identity: dict, pid: str, rep: int, seed: int, request: Any, extra: dict) -> str:
    blob = json.dumps({"identity": identity, "id": pid, "repeat": rep, "seed": seed, "request": request, **extra},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _kept(key: str, nifti: Path, dicom: Path | None) -> dict | None:
    """The manifest row of a volume an earlier run wrote at this run's paths for the same resume ``key``, where its
    files are all there (the NIfTI at its recorded size, the DICOM series where one is asked for); else None."""
    side = sidecar_path(nifti)
    try:
        resume = json.loads(side.read_text()).get("resume")
        if (not isinstance(resume, dict) or resume.get("key") != key or not isinstance(resume.get("row"), dict)
                or nifti.stat().st_size != resume.get("nifti_bytes")):
            return None
    except (OSError, ValueError, AttributeError):
        return None
    if dicom is not None and not (dicom.is_dir() and any(dicom.glob("*.dcm"))):
        return None
    # this run's spelling of the paths (the earlier run may have named the folder from another working directory)
    return {**resume["row"], "nifti": str(nifti), "sidecar": str(side), **({"dicom": str(dicom)} if dicom else {})}


def check_file_id(pid: str) -> None:
    """Refuse an id that would name a file outside the output folder (``<id>_s<seed>.nii.gz``, ``<id>.nii.gz``): one
    with a path separator ("site1/p3", "../../x"), "." or "..", or control characters. Anything else a file name
    can hold is kept (spaces, accents: ids from a user's spreadsheet that name files fine)."""
    text = str(pid)
    if (not text.strip() or "/" in text or "\\" in text or text.strip() in (".", "..")
            or any(ord(c) < 32 or ord(c) == 127 for c in text)):
        raise ValueError(f"id {text!r} cannot name a file in the output folder (no '/' or '\\', not '.' or '..', "
                         "no control characters)")


def write_samples(requests: Sequence[tuple[str, Any]], generate: Generate, out_dir: str | Path, *, seed: int = 0,
                  per_prompt: int = 1, dicom_dir: str | Path | None = None, single_out: str | Path | None = None,
                  exact_names: bool = False, orientation: str | None = None, desc: str = "sample",
                  identity: dict[str, Any] | None = None) -> pd.DataFrame:
    """``per_prompt`` volumes per ``(id, request)``; NIfTI + sidecar (+ DICOM); the manifest (``samples.csv``).

    ``exact_names``: each volume is ``<id>.nii.gz`` (one per request) instead of ``<stem>_s<seed>.nii.gz``;
    ``single_out``: the one volume's path (and ``dicom_dir`` its series' folder); ``orientation``: store the voxels
    in this axis order (:func:`~ctgen.export.nifti.stored_as`, the affine following).

    ``identity`` (:func:`sample_identity`): a run killed part-way (a Slurm time limit, a preemption) is resumed:
    a volume the earlier run wrote into ``out_dir`` for the same request, seed and identity is kept, not sampled
    again (sampling is deterministic: it is the volume this run would write); every other file of the earlier run
    is removed once this run is complete.
    """
    if exact_names and per_prompt != 1:
        raise ValueError(f"one volume per prompt is written under the prompt's own name, not {per_prompt}")
    for pid, _ in requests:  # before the first volume, and before anything is removed
        check_file_id(pid)
    last_seed = seed + len(requests) * per_prompt - 1
    if last_seed >= 2**63:  # a sidecar would record a seed that --seed (ctprep.errors.seed_int) refuses to rerun
        raise ValueError(f"seed {seed} for {len(requests) * per_prompt} volumes gives seeds up to {last_seed}, past "
                         f"2**63 - 1: give a seed of at most {2**63 - len(requests) * per_prompt}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last = []
    if not single_out:  # a rerun that dies part-way must not leave the last run's manifest over this run's files
        last = _last_run(out_dir)
        (out_dir / "samples.csv").unlink(missing_ok=True)
        if identity is None:
            _remove(last, out_dir, dicom_dir)
            (out_dir / WRITTEN).unlink(missing_ok=True)
            last = []
        # else the record stays until this run is complete: a run killed again resumes from both
    resume = identity is not None and not single_out
    extra = {"orientation": orientation, "exact_names": exact_names,
             "dicom": str(Path(dicom_dir).resolve()) if dicom_dir else None}
    rows, index, kept = [], 0, set()
    with progress(total=len(requests) * per_prompt, desc=desc, unit="vol") as bar:
        for pid, request in requests:
            for rep in range(per_prompt):
                s = seed + index
                index += 1
                name = pid if exact_names else f"{volume_key(pid)}_s{s}"
                path = Path(single_out) if single_out else out_dir / f"{name}.nii.gz"
                key = _resume_key(identity, pid, rep, s, request, extra) if resume else None
                row = _kept(key, path, Path(dicom_dir) / name if dicom_dir else None) if resume else None
                if row is not None:
                    kept |= {str(Path(row[c]).resolve()) for c in ("nifti", "sidecar", "dicom") if row.get(c)}
                    rows.append(row)
                    bar.update(1)
                    continue
                vol, fields, prompt = generate(request, s)
                vol = stored_as(vol, orientation)
                sidecar = {**fields, "prompt_id": pid, "repeat": rep, "timing_s": vol.meta.get("timing_s")}
                if vol.meta.get("n_nonfinite") is not None:  # NaN/inf the network gave, written as the window's bounds
                    sidecar["n_nonfinite"] = int(vol.meta["n_nonfinite"])
                if vol.meta.get("hu_window") is not None:  # the window the volume was made in: export.hu_range is
                    sidecar["hu_window"] = vol.meta["hu_window"]  # wider, and clipped nothing
                nifti, side = save_synthetic_nifti(vol, path, sidecar)
                row = {"prompt_id": pid, "repeat": rep, "seed": s, "prompt": prompt, "nifti": str(nifti),
                       "sidecar": str(side)}
                if fields.get("prompt_given") is not None:  # the text a structured model's prompt was made of
                    row["prompt_given"] = fields["prompt_given"]
                if dicom_dir:  # from the volume in memory: its float64 affine, not the NIfTI's float32 re-read
                    series = Path(dicom_dir) if single_out else Path(dicom_dir) / name
                    files = save_synthetic_dicom(vol, series, sidecar, overwrite=True, case=name)
                    row["dicom"] = str(Path(files[0]).parent)
                if key is not None:  # once all its files are written: what a resumed run needs to keep them
                    write_sidecar(side, {**json.loads(Path(side).read_text()),
                                         "resume": {"key": key, "row": row, "nifti_bytes": Path(nifti).stat().st_size}})
                if not single_out:  # as each is written: a run killed part-way leaves its files named too
                    with open(out_dir / WRITTEN, "a") as record:
                        record.writelines(f"{Path(row[c]).resolve()}\n" for c in ("nifti", "sidecar", "dicom")
                                          if row.get(c))
                rows.append(row)
                bar.update(1)
    manifest = pd.DataFrame(rows)
    if not single_out:
        if last:  # complete: the earlier run's other files go, and the record names this run's files alone
            mine = {str(Path(r[c]).resolve()) for r in rows for c in ("nifti", "sidecar", "dicom") if r.get(c)}
            _remove(last, out_dir, dicom_dir, keep=mine)
            atomic_write(out_dir / WRITTEN, lambda tmp: Path(tmp).write_text("".join(
                f"{Path(r[c]).resolve()}\n" for r in rows for c in ("nifti", "sidecar", "dicom") if r.get(c))))
        atomic_write(out_dir / "samples.csv", lambda tmp: manifest.to_csv(tmp, index=False))
    if kept:
        logger.info("%d of %d volumes kept from the earlier run in %s (same requests, seeds, weights and settings)",
                    len({r["nifti"] for r in rows if str(Path(r["nifti"]).resolve()) in kept}), len(rows), out_dir)
    return manifest
