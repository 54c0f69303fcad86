"""The VLM3D 2026 submission contract: the prompts file, case stems, and pairing predictions with ground truth.

Facts from forithmus/VLM3D-Dockers (2026 ``ct_challenges/``):

* ``ctgen_example_docker/README.md``: the algorithm reads ``/input/prompts.json``, "a JSON array of
  ``{"input_image_name", "report"}`` objects", and writes one loose ``<input_image_name>.nii.gz`` per entry
  to ``/output``;
* ``ctgen_evaluation/evaluate_fvd.py`` / ``evaluate_clip.py`` / ``evaluation.py``: volumes are the files
  ending in ``.nii.gz``, ``.nii`` or ``.mha`` (case-insensitive); the *case stem* is the name with that
  extension removed; each prediction is paired with the ground truth of the same stem; predictions are
  taken in sorted order of their file names (that order makes the FVD chunks).

Where the evaluation code is silent or lenient we are strict, and say so: a prediction without ground truth
is an error (the code would fail on a missing ``.mha``), a prediction without a report is an error (the
code scores it against the empty string), two files with one stem are an error.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctprep.errors import read_text
from ctprep.volume import Volume, VolumeError, load_nifti

log = logging.getLogger(__name__)

VOLUME_EXTS = (".nii.gz", ".nii", ".mha")  # the evaluation's _VOL_EXTS
#: A stem that is safe as a file name on every platform: letters, digits, ``_``, ``-``, ``.`` (not first).
SAFE_STEM = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")


def case_stem(name: str | os.PathLike) -> str:
    """``train_1_a_1.nii.gz`` -> ``train_1_a_1``: the file name without a volume extension; a name without one is
    the stem as it is (``case.001``: the challenge strips only its volume extensions when it pairs files)."""
    n = Path(name).name
    for ext in VOLUME_EXTS:
        if n.lower().endswith(ext):
            return n[: -len(ext)]
    return n


def is_volume(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(VOLUME_EXTS)


def list_volumes(folder: str | os.PathLike, what: str) -> dict[str, Path]:
    """{case stem: path} of the volume files directly in ``folder`` (as the evaluation's ``iterdir``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(20, f"{what} folder not found", str(folder))
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not is_volume(path):
            continue
        stem = case_stem(path)
        if stem in out:
            raise ValueError(f"{what} folder {folder} holds two volumes of case {stem!r}: {out[stem].name}, {path.name}")
        out[stem] = path
    if not out:
        raise ValueError(f"{what} folder {folder} holds no volumes (.nii.gz, .nii or .mha)")
    return out


@dataclass(frozen=True)
class Pair:
    """One prediction and its ground truth."""

    stem: str
    generated: Path
    real: Path


@dataclass(frozen=True)
class Pairing:
    """Predictions paired with ground truth by stem, in the evaluation's order (sorted prediction file names)."""

    pairs: tuple[Pair, ...]
    real_without_prediction: tuple[str, ...]  # ground-truth stems nobody predicted (not scored)

    @property
    def stems(self) -> list[str]:
        return [p.stem for p in self.pairs]


def pair_volumes(generated_dir: str | os.PathLike, real_dir: str | os.PathLike) -> Pairing:
    """Pair by case stem; a prediction without ground truth is an error naming the first stems."""
    gen = list_volumes(generated_dir, "generated")
    real = list_volumes(real_dir, "real (ground-truth)")
    missing = sorted(set(gen) - set(real))
    if missing:
        raise ValueError(f"{len(missing)} generated volume(s) have no ground truth of the same stem in {real_dir}: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    extra = tuple(sorted(set(real) - set(gen)))
    if extra:
        log.warning("%d ground-truth volume(s) have no prediction and are not scored: %s%s", len(extra),
                    ", ".join(extra[:5]), " ..." if len(extra) > 5 else "")
    order = sorted(gen, key=lambda s: gen[s].name)  # sorted(iterdir()) of the prediction folder
    return Pairing(tuple(Pair(s, gen[s], real[s]) for s in order), extra)


def read_prompts_json(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(input_image_name, report) pairs of a 2026 ``prompts.json``, checked entry by entry.

    The file must be a JSON list of objects with a non-empty string ``report`` and a string
    ``input_image_name`` that is a safe file stem (a trailing ``.nii.gz``/``.nii``/``.mha`` is dropped, as
    the evaluation matches by stem), unique over the file. Any problem is one ``ValueError`` line naming the
    file and the entry.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "prompts file not found", str(path))
    try:
        data = json.loads(read_text(path))  # a BOM (Notepad, PowerShell) is dropped; a non-UTF-8 file is named
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err.msg} at line {err.lineno}); the VLM3D prompts file is a JSON "
                         f'list of {{"input_image_name": ..., "report": ...}} objects') from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a JSON list of {{\"input_image_name\", \"report\"}} objects is expected, "
                         f"not a {type(data).__name__}")
    if not data:
        raise ValueError(f"{path}: the prompts list is empty")
    out, seen = [], {}
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is a {type(entry).__name__}, not an object with input_image_name and report")
        unknown = sorted(set(entry) - {"input_image_name", "report"})
        missing = [k for k in ("input_image_name", "report") if k not in entry]
        if missing:
            raise ValueError(f"{where} has no {' or '.join(missing)}" + (f" (it has {unknown})" if unknown else ""))
        name, report = entry["input_image_name"], entry["report"]
        if not isinstance(name, str) or not isinstance(report, str):
            raise ValueError(f"{where}: input_image_name and report must be strings")
        stem = case_stem(name.strip())
        if "/" in name or "\\" in name or not SAFE_STEM.match(stem) or stem in (".", ".."):
            raise ValueError(f"{where}: input_image_name {name!r} is not a safe file name (letters, digits, _ - .)")
        if not report.strip():
            raise ValueError(f"{where} ({stem}): the report is empty")
        if stem in seen:
            raise ValueError(f"{where}: input_image_name {stem!r} repeats entry {seen[stem]}")
        if unknown:
            log.warning("%s: unknown keys %s ignored", where, unknown)
        seen[stem] = i
        out.append((stem, report))
    return out


def load_volume(path: str | os.PathLike) -> Volume:
    """A NIfTI through :func:`ctprep.volume.load_nifti`, an ``.mha`` through SimpleITK; affine in RAS."""
    path = Path(path)
    if path.name.lower().endswith(".mha"):
        import SimpleITK as sitk

        from ctprep.resample import affine_of_sitk

        try:
            img = sitk.ReadImage(str(path))
        except RuntimeError as err:  # SimpleITK's one type for a corrupt or truncated file: a VolumeError, named
            raise VolumeError(f"unreadable MHA {path.name}: {str(err).strip().splitlines()[-1]}") from None
        data = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # (z, y, x) -> (i, j, k)
        return Volume.from_3d(np.asarray(data), affine_of_sitk(img), source=str(path))
    return load_nifti(path)


def volume_problems(path: str | os.PathLike) -> tuple[str | None, str | None]:
    """(why the file cannot be scored, why its values do not read as HU), each None where all is well; one read.

    A file that does not load (corrupt or truncated gzip, not a NIfTI, not 3D), holds NaN/inf voxels or has
    sheared voxel axes (a gantry tilt: the evaluation's SimpleITK reader refuses it, and the 2.5D FID needs a
    rectilinear grid) is unusable: every protocol would stop on it (or its NaN features would void every
    record), so it is named and its pair left out. Values that load but do not read as HU: see
    :func:`ctgen.metrics.hu.not_hu`.
    """
    from ctgen.metrics.hu import not_hu
    from ctgen.metrics.vlm3d.geometry import sheared

    try:
        vol = load_volume(path)
    except (VolumeError, OSError) as err:  # load_nifti names the problem; a vanished file is an OSError
        return f"unreadable: {err}", None
    if sheared(vol.affine):
        return ("sheared voxel axes (a gantry tilt in the header): SimpleITK, the evaluation's reader, refuses it "
                "and the 2.5D FID needs a rectilinear grid"), None
    data = vol.data
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        return "holds NaN or inf voxels", None
    return None, not_hu(data)


def hu_problem(path: str | os.PathLike) -> str | None:
    """Why a volume's values do not read as HU, in one line; None where they do (:func:`ctgen.metrics.hu.not_hu`).

    Every protocol clips and windows in HU, so a generator's output in [-1, 1] or [0, 1], or raw stored
    values that need CT-RATE's -1024 intercept, would be scored as if they were HU and give numbers that
    mean nothing. A file that cannot be read at all raises :class:`VolumeError` naming why.
    """
    unusable, why = volume_problems(path)
    if unusable:
        raise VolumeError(f"{Path(path).name}: {unusable}")
    return why


def check_pairs(pairs: Sequence[Pair]) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """({stem: {side: why it does not read as HU}}, {stem: {side: why it cannot be scored}}), one volume at a time."""
    problems: dict[str, dict[str, str]] = {}
    unusable: dict[str, dict[str, str]] = {}
    for pair in pairs:
        for side in ("generated", "real"):
            bad, why = volume_problems(getattr(pair, side))
            if bad:
                unusable.setdefault(pair.stem, {})[side] = bad
            elif why:
                problems.setdefault(pair.stem, {})[side] = why
    return problems, unusable

