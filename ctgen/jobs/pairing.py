"""What the evaluation scores against what: predictions matched to ground truth by stem, read one by one.

Predictions (``--generated``) are a folder of NIfTI files (any depth; a file's stem is its name
without ``.nii``/``.nii.gz`` and CT-RATE's ``_fixed``) or a sampling manifest (``samples.csv``:
``prompt_id`` is the stem, several repeats per stem allowed). Ground truth (``--real``) is a folder of
NIfTI files or shard manifests (the workflow's evaluation split; the stem is the sample key).

Nothing is dropped silently: a prediction with no ground truth, ground truth with no prediction, a
duplicate stem, an unreadable file, a volume that is not 3D or holds NaN/inf each becomes a row of
the skipped table (stem, side, path, reason), and the record of every metric states the ``n`` it was
computed on. Volumes are read one at a time and brought to the feature networks' grid (the prep
preset's spacing and shape, canonical RAS, the HU window): a volume already on it is used as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ctgen.data.layout import to_model_layout
from ctprep.ctrate import LABELS, canonical_name, volume_key
from ctprep.errors import UserError, read_json
from ctprep.volume import Volume, VolumeError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class BadVolume(ValueError):
    """A volume that cannot be scored (unreadable, not 3D, NaN/inf): it goes to the skipped table."""


def generator_specs(models_dir: str | Path, spec: str | Path | None = None) -> list[Path]:
    """The generator specs there are, in the order they are read: ``spec``, then ``models_dir``'s
    ``cascade.json``, then its ``latent_flow.json`` (each records the grid and the text side)."""
    from ctgen.pipelines.latent_flow import SPEC  # here, not at the top: they load MONAI
    from ctgen.pipelines.text_to_ct import CASCADE

    paths = ([Path(spec)] if spec else []) + [Path(models_dir) / CASCADE, Path(models_dir) / SPEC]
    return [p for p in paths if p.is_file()]


@dataclass(frozen=True)
class Prediction:
    """One generated volume to score."""

    stem: str  # the ground-truth stem it is scored against
    path: str
    seed: int | None = None  # from samples.csv, where known
    repeat: int = 0  # index among the predictions of the same stem
    prompt: str | None = None  # the prompt that produced it (samples.csv), where known


@dataclass(frozen=True)
class Skip:
    """A row of the skipped table."""

    stem: str
    side: str  # "generated" or "real"
    path: str
    reason: str


@dataclass(frozen=True)
class Grid:
    """The feature networks' grid: the prep preset the models were trained on (a generator spec's ``grid``)."""

    spacing: tuple[float, float, float]  # mm along R, A, S
    shape: tuple[int, int, int]  # voxels along R, A, S
    clip: tuple[float, float]  # HU window, mapped to [-1, 1]

    @classmethod
    def from_spec(cls, path: str | Path) -> Grid:
        """From a generator spec (cascade.json, latent_flow.json): the grid of the shards the models trained on."""
        spec = read_json(path, "sampling spec")
        if not isinstance(spec.get("grid"), dict):
            raise UserError(f"{path} is not a sampling spec (cascade.json or latent_flow.json): it has no grid")
        g = spec["grid"]
        return cls(tuple(map(float, g["spacing"])), tuple(map(int, g["shape"])), tuple(map(float, g["clip"])))

    @classmethod
    def from_models(cls, models_dir: str | Path) -> Grid:
        """From the generator spec in ``models_dir`` (cascade.json, else latent_flow.json: both record the grid
        of the shards the feature networks were trained on)."""
        found = generator_specs(models_dir)
        if found:
            return cls.from_spec(found[0])
        raise UserError(f"--models {models_dir}: no cascade.json or latent_flow.json, which records the grid "
                        "(spacing, shape, HU window) the feature networks were trained on")

    def preset(self) -> dict:
        """A ``spacing`` prep preset for :func:`ctprep.preprocess.to_target_grid`."""
        return {"mode": "spacing", "spacing": list(self.spacing), "shape": list(self.shape), "center": "body",
                "pad_hu": -1024, "clip": list(self.clip), "interpolation": "linear", "antialias": True}


def nifti_stem(path: str | Path) -> str:
    """``.../valid_1_a_1_fixed.nii.gz`` -> ``valid_1_a_1``: the stem that matches predictions to ground truth."""
    return volume_key(canonical_name(Path(path).name))


def _fixed_first(path: Path) -> tuple[bool, Path]:
    """Sort key: a file under a ``<split>_fixed`` folder first (CT-RATE's current release, in HU, beside the first
    release's raw ``<split>/`` copy of the same volumes), then path order."""
    return (not any(part.endswith("_fixed") for part in path.parts), path)


def find_niftis(folder: Path, side: str) -> tuple[dict[str, Path], list[Skip]]:
    """{stem: path} of the NIfTI files under ``folder``; a second file of one stem is skipped, named (a CT-RATE
    root's ``valid_fixed/`` copy is the one used)."""
    found: dict[str, Path] = {}
    skipped = []
    for path in sorted((p for p in folder.rglob("*") if p.name.endswith(NIFTI_SUFFIXES) and p.is_file()),
                       key=_fixed_first):
        stem = nifti_stem(path)
        if stem in found:
            skipped.append(Skip(stem, side, str(path), f"duplicate stem: {found[stem]} is used"))
        else:
            found[stem] = path
    return found, skipped


def read_predictions(source: str | Path) -> tuple[list[Prediction], list[Skip]]:
    """The predictions of a folder of NIfTI files or of a sampling manifest (samples.csv)."""
    source = Path(source)
    if source.is_dir():
        found, skipped = find_niftis(source, "generated")
        if not found:
            raise UserError(f"--generated {source}: no .nii or .nii.gz file in it")
        return [Prediction(stem, str(path)) for stem, path in found.items()], skipped
    if source.suffix != ".csv" or not source.is_file():
        raise UserError(f"--generated {source}: not a folder of NIfTI files nor a sampling manifest (samples.csv)")
    table = pd.read_csv(source, dtype={"prompt_id": str})
    missing = {"nifti", "prompt_id"} - set(table.columns)
    if missing:
        raise UserError(f"{source} is not a sampling manifest (samples.csv): no {sorted(missing)} column")
    out, seen = [], {}
    for row in table.itertuples(index=False):
        path = Path(row.nifti)
        if not path.is_absolute():
            # relative to the manifest's folder first: ctgen writes the path it was given (relative to the folder it
            # ran in), and from another working directory the same relative path can name another run's file
            path = next((p for p in (source.parent / path, source.parent / path.name) if p.exists()),
                        path if path.exists() else source.parent / path.name)
        seed, stem = getattr(row, "seed", None), volume_key(str(row.prompt_id))
        # a hand-made manifest without a repeat column: the repeats of a stem counted in order, as ctgen numbers them
        # (the row number made two manifests of the same reports pair no volume of one with the other's)
        seen[stem] = seen.get(stem, -1) + 1
        out.append(Prediction(stem, str(path), None if pd.isna(seed) else int(seed),
                              int(getattr(row, "repeat", seen[stem])), getattr(row, "prompt", None)))
    if not out:
        raise UserError(f"{source} lists no volumes")
    return out, []


@dataclass
class Pairing:
    """Predictions grouped by ground-truth stem (in the ground truth's order), and what has no partner."""

    pairs: dict[str, list[Prediction]]
    extra: list[Prediction]  # no ground truth with its stem
    missing: list[str]  # ground truth with no prediction

    def skips(self, real_path: dict[str, str]) -> list[Skip]:
        return ([Skip(p.stem, "generated", p.path, "no ground truth with this stem") for p in self.extra]
                + [Skip(s, "real", real_path.get(s, ""), "no prediction with this stem") for s in self.missing])


def pair(predictions: list[Prediction], real_stems: list[str]) -> Pairing:
    by_stem: dict[str, list[Prediction]] = {}
    for p in predictions:
        by_stem.setdefault(p.stem, []).append(p)
    known = set(real_stems)
    pairs = {s: by_stem[s] for s in real_stems if s in by_stem}
    extra = [p for p in predictions if p.stem not in known]
    missing = [s for s in real_stems if s not in by_stem]
    if not pairs:
        raise UserError(f"no prediction matches a ground-truth stem: predictions {sorted(by_stem)[:5]}..., "
                        f"ground truth {real_stems[:5]}...")
    return Pairing(pairs, extra, missing)


def skipped_table(skips: list[Skip]) -> pd.DataFrame:
    return pd.DataFrame([asdict(s) for s in skips], columns=["stem", "side", "path", "reason"])


# --- reading one volume ----------------------------------------------------------------------------------


def on_grid(vol: Volume, grid: Grid, name: str) -> tuple[np.ndarray, bool]:
    """A volume -> ((D, H, W) float32 HU on ``grid``, clipped to its window; whether it was resampled)."""
    from ctprep.geometry import reorient
    from ctprep.preprocess import to_target_grid

    if not np.isfinite(vol.array).all():
        raise BadVolume(f"{name} holds NaN or inf voxels")
    vol = reorient(vol)
    # reorient only flips and permutes axes: an oblique affine (rotated axes, as from a tilted gantry or
    # another tool's resampling) with the grid's shape and spacing is still not on the grid, and using its
    # voxels as they are would drop the rotation; it is resampled like any other grid
    axis_aligned = np.allclose(vol.affine[:3, :3], np.diag(vol.spacing), atol=1e-3 * float(min(vol.spacing)))
    resampled = not (axis_aligned and vol.shape == grid.shape and np.allclose(vol.spacing, grid.spacing, rtol=1e-3))
    if resampled:
        vol = to_target_grid(vol, grid.preset())
    hu = to_model_layout(np.asarray(vol.data, dtype=np.float32))[0]  # (D, H, W)
    if not hu.flags.writeable:  # a float32 file already on the grid is a read-only view of the file's bytes:
        hu = hu.copy()  # clipping it in place raised "output array is read-only" and ended the whole run
    return np.clip(hu, *grid.clip, out=hu), resampled


def _load(path: str | Path) -> Volume:
    from ctprep.volume import load_nifti

    try:
        return load_nifti(path)
    except (VolumeError, OSError) as err:
        raise BadVolume(str(err)) from None


def read_nifti(path: str | Path, grid: Grid) -> tuple[np.ndarray, bool]:
    """A NIfTI file (HU) on ``grid``; :class:`BadVolume` names what is wrong with it."""
    return on_grid(_load(path), grid, Path(path).name)


def read_ground_truth(path: str | Path, grid: Grid) -> tuple[np.ndarray, bool]:
    """:func:`read_nifti` for a ground-truth file, which must read as HU: one that does not (CT-RATE's first
    release stores HU + 1024) raises :class:`BadVolume` with the reason, so that it is skipped and named rather than
    scored as HU."""
    from ctgen.metrics.hu import not_hu

    vol = _load(path)
    problem = not_hu(vol.data)
    if problem:
        raise BadVolume(f"{Path(path).name}: {problem}")
    return on_grid(vol, grid, Path(path).name)


#: A prediction whose field of view along some axis is under half or over twice the grid's is named: its header
#: spacing is likely not the truth (another tool's identity affine, 1 mm voxels), and resampled it would be scored as
#: a chest of another size
EXTENT_RATIO = 2.0


def extent_problem(vol: Volume, grid: Grid) -> str | None:
    """Why the volume's physical extent does not fit the grid's (None where it does): along R, A, S, the extent
    ``|affine| @ shape`` (any orientation, obliques included) against the grid's ``spacing * shape``."""
    extent = np.abs(np.asarray(vol.affine, dtype=np.float64)[:3, :3]) @ np.asarray(vol.shape[:3], dtype=np.float64)
    target = np.asarray(grid.spacing) * np.asarray(grid.shape)
    ratio = extent / target
    if np.all((ratio >= 1 / EXTENT_RATIO) & (ratio <= EXTENT_RATIO)):
        return None
    fmt = lambda a: " x ".join(f"{v:.0f}" for v in a)  # noqa: E731
    return (f"field of view {fmt(extent)} mm (R, A, S) against the grid's {fmt(target)} mm: is the header's "
            "voxel spacing the truth?")


def read_prediction(path: str | Path, grid: Grid) -> tuple[np.ndarray, bool, str | None, str | None]:
    """:func:`read_nifti`, why the file's values do not read as HU and why its field of view does not fit the grid
    (each None where it does).

    Other tools often write normalised ([0, 1], [-1, 1]) or raw stored values (0..4095, no intercept); read as
    HU and clipped to the window they would be scored silently. Others write an identity affine (1 mm voxels) or
    none: resampled by that spacing, the volume is a chest of another size. They are scored all the same (a few
    bad volumes need not void a run), and the reasons go to per_volume.csv and the metrics' flags.
    """
    from ctgen.metrics.hu import not_hu

    vol = _load(path)
    if vol.meta.get("header_qform_code") == 0 == vol.meta.get("header_sform_code"):  # no orientation at all
        log.warning("%s: no orientation in the header (qform_code and sform_code are 0): read as nibabel does "
                    "(L-A-S axes from the voxel sizes), which mirrors left and right if the tool meant R-A-S", path)
    hu, resampled = on_grid(vol, grid, Path(path).name)  # NaN/inf raise BadVolume first
    return hu, resampled, not_hu(vol.data), extent_problem(vol, grid)


# --- ground truth ------------------------------------------------------------------------------------------


class RealSet:
    """Ground-truth volumes by stem, with the texts and labels stored beside them (shards) where any."""

    def __init__(self, sources: list[str | Path]):
        self.manifests = [Path(s) for s in sources if str(s).endswith(".json")]
        folders = [Path(s) for s in sources if Path(s).is_dir()]
        bad = [str(s) for s in sources if Path(s) not in (*self.manifests, *folders)]
        if bad or (self.manifests and folders) or len(folders) > 1:
            raise UserError(f"--real: give shard manifests (.json) or one folder of NIfTI files, not {list(map(str, sources))}")
        for m in self.manifests:
            if not m.is_file():
                raise UserError(f"--real: {m} does not exist")
        self.paths: dict[str, str] = {}
        self.skipped: list[Skip] = []
        if folders:
            found, self.skipped = find_niftis(folders[0], "real")
            if not found:
                raise UserError(f"--real {folders[0]}: no .nii or .nii.gz file in it")
            self.paths = {k: str(v) for k, v in found.items()}
        else:
            from ctgen.data.stream import load_shards
            from ctprep.shards import ShardError

            try:  # refuses a sample listed twice: it would be read, and scored, once per manifest
                shards = load_shards([str(m) for m in self.manifests])
            except ShardError as err:
                raise UserError(f"--real: {err}") from err
            for shard in shards:
                self.paths.update({k: shard.url for k in shard.keys})
        self.stems = list(self.paths)

    def texts(self, template: str | None) -> dict[str, str]:
        """{stem: report text} stored in the shards (the ``template`` prompt where the shards hold it, else the main
        prompt); {} for a folder."""
        from ctgen.data.stream import load_shards, member_values

        if not self.manifests:
            return {}
        shards = load_shards([str(m) for m in self.manifests])
        main = dict(member_values(shards, "prompt.txt"))
        if template:
            held = dict(member_values(shards, "prompts.json"))
            if any(template in prompts for prompts in held.values()):
                # a volume whose report/metadata lacks a field of the template has no such prompt: its main prompt
                # is another template's text, so it has none here (the caller's own text, if any, stands)
                return {key: prompts[template] for key, prompts in held.items() if template in prompts}
        return main

    def labels(self) -> dict[str, np.ndarray]:
        """{stem: (18,) float32 labels, NaN unknown} stored in the shards; {} for a folder."""
        from ctgen.data.shards import labels_of
        from ctgen.data.stream import load_shards, member_values

        if not self.manifests:
            return {}
        shards = load_shards([str(m) for m in self.manifests])
        return {k: labels_of({"labels.npy": v}) for k, v in member_values(shards, "labels.npy")}

    def read(self, wanted: set[str], grid: Grid) -> Iterator[tuple[str, np.ndarray | BadVolume, bool]]:
        """(stem, (D, H, W) HU on the grid or the BadVolume, resampled) of each wanted stem, in this set's order."""
        if not self.manifests:
            for stem in self.stems:
                if stem in wanted:
                    try:
                        yield stem, *read_ground_truth(self.paths[stem], grid)
                    except BadVolume as err:
                        yield stem, err, False
            return
        from ctgen.data.shards import volume_of
        from ctgen.data.stream import iter_raw_samples

        for key, raw in iter_raw_samples(list(self.manifests), wanted):
            try:
                yield key, *on_grid(Volume.from_3d(volume_of(raw), raw["affine.npy"]), grid, key)
            except BadVolume as err:
                yield key, err, False


# --- texts and labels from files ----------------------------------------------------------------------------


def read_reports(path: str | Path, template: str | None, rendering: dict | None = None) -> dict[str, str]:
    """{stem: text} of a reports file (text per line, CSV or JSONL of prompts or CT-RATE-style reports, the
    latter rendered with ``template`` and ``rendering``: :func:`ctgen.jobs.sample.read_prompts`)."""
    from ctgen.jobs.sample import read_prompts

    return {nifti_stem(f"{i}.nii.gz") if not str(i).endswith(NIFTI_SUFFIXES) else nifti_stem(i): text
            for i, text in read_prompts(path, template, rendering)}


def read_labels(path: str | Path) -> dict[str, np.ndarray]:
    """{stem: (18,) float32} from a CT-RATE-style label table (VolumeName + one column per label; blank = unknown)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--labels {path} does not exist")
    table = pd.read_csv(path)
    name = next((c for c in ("VolumeName", "id", "stem") if c in table.columns), None)
    missing = [label for label in LABELS if label not in table.columns]
    if name is None or missing:
        raise UserError(f"{path}: a label table needs a VolumeName column and the 18 CT-RATE label columns; "
                        f"missing {([] if name else ['VolumeName']) + missing}")
    values = table[list(LABELS)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float32)
    # a cell that is neither blank nor a number ("yes") is a mistake, not an unknown label
    blank = table[list(LABELS)].isna().to_numpy() | table[list(LABELS)].astype(str).apply(
        lambda c: c.str.strip().eq("")).to_numpy()
    bad = (np.isnan(values) & ~blank) | (~np.isnan(values) & (values != 0) & (values != 1))
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise UserError(f"{path}: row {row + 2} holds a label that is not 0, 1 or blank")
    return {nifti_stem(f"{n}.nii.gz" if not str(n).endswith(NIFTI_SUFFIXES) else n): values[i]
            for i, n in enumerate(table[name].astype(str))}
