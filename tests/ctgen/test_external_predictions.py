"""Predictions written by other tools: a folder of loose ``<stem>.nii.gz`` files for ``ctgen evaluate`` and
``ctgen vlm3d-score``.

Volumes are small synthetic chest phantoms (air, lungs, fat, soft tissue, bone in HU) written with nibabel in
the conventions other tools use: float32 HU, uint16 with an intercept, LPS or permuted axes, qform only, a 4D
file with a singleton axis, oblique affines; and the usual mistakes: normalised or raw stored values, NaN
voxels, corrupt files, stems that match nothing. The evaluation runs with a models folder that holds only the
grid (no feature network: the HU checks are computed, the network groups are listed as not computed).
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
import logging

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from ctgen.cli import main as ctgen_main
from ctgen.jobs import evaluate
from ctgen.jobs.pairing import Grid, read_nifti, read_prediction
from ctgen.jobs.vlm3d import score_vlm3d
from ctgen.metrics.vlm3d import volume_proxy
from ctgen.metrics.vlm3d.contract import hu_problem
from ctprep.errors import UserError
from ctprep.volume import VolumeError

from tests.ctgen.tiny import WINDOW

SPACING = (4.0, 4.0, 8.0)
SHAPE = (32, 32, 16)  # (I, J, K) voxels along R, A, S
GRID = Grid(SPACING, SHAPE, tuple(float(w) for w in WINDOW))
AFFINE = np.diag([*SPACING, 1.0])
AFFINE[:3, 3] = -np.array(SPACING) * (np.array(SHAPE) - 1) / 2  # centred on the origin
SETTINGS = {"bootstrap": 20, "bootstrap_frechet": 10}
STEMS = [f"valid_{i}_a_1" for i in range(1, 7)]


def phantom(seed: int = 0, shape=SHAPE) -> np.ndarray:
    """(I, J, K) float32 HU: an elliptic body (soft tissue) with a fat rim, two lungs and a spine, in air."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    hu = np.full(shape, -1000.0)
    body = (i / 0.85) ** 2 + (j / 0.65) ** 2 < 1
    hu[body] = -100.0  # fat rim
    hu[(i / 0.75) ** 2 + (j / 0.55) ** 2 < 1] = 40.0
    for side in (-1, 1):
        hu[((i - side * 0.35) / 0.25) ** 2 + (j / 0.35) ** 2 + (k / 0.9) ** 2 < 1] = -850.0
    hu[(i / 0.08) ** 2 + ((j + 0.45) / 0.08) ** 2 < 1] = 700.0  # spine
    return (hu + rng.normal(0, 10, shape) * body).astype(np.float32)


def save(path, data, affine=AFFINE, dtype=np.int16, slope=None, inter=None, qform=1, sform=1, cls=nib.Nifti1Image):
    img = cls(np.asarray(data).astype(dtype), affine)
    img.header.set_qform(affine if qform else None, code=qform)
    img.header.set_sform(affine if sform else None, code=sform)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Ground truth (int16 HU) and the plain predictions (the same volumes with other noise), one file per stem."""
    root = tmp_path_factory.mktemp("external")
    (root / "gt").mkdir()
    (root / "models").mkdir()
    (root / "models" / "cascade.json").write_text(json.dumps({"grid": {"spacing": list(SPACING), "shape": list(SHAPE),
                                                                       "clip": list(WINDOW)}}))
    for n, stem in enumerate(STEMS):
        save(root / "gt" / f"{stem}.nii.gz", np.rint(phantom(n)))
    return root


def predictions(tmp_path, how=None):
    """A predictions folder: every stem as int16 HU, ``how`` ({stem: writer(path_without_suffix)}) replacing some."""
    out = tmp_path / "preds"
    out.mkdir()
    for n, stem in enumerate(STEMS):
        if how and stem in how:
            how[stem](out / stem)
        else:
            save(out / f"{stem}.nii.gz", np.rint(phantom(100 + n)))
    return out


def run(folders, preds, tmp_path, **kw):
    return evaluate.evaluate(preds, [folders / "gt"], folders / "models", tmp_path / "out", SETTINGS, device="cpu", **kw)


# --- geometry and storage conventions: the same image however it is written ------------------------------


def test_float32_hu_on_the_grid_is_read_and_scored(folders, tmp_path):
    """A float32 file already on the grid used to end the run with 'output array is read-only'."""
    hu = np.rint(phantom(3))
    save(tmp_path / "f.nii.gz", hu, dtype=np.float32)
    save(tmp_path / "i.nii.gz", hu)
    got, resampled = read_nifti(tmp_path / "f.nii.gz", GRID)
    assert not resampled and np.array_equal(got, read_nifti(tmp_path / "i.nii.gz", GRID)[0])
    got[0, 0, 0] = 0  # writable: the caller owns it
    preds = predictions(tmp_path, {s: (lambda p, n=n: save(p.with_suffix(".nii.gz"), phantom(100 + n), dtype=np.float32))
                                   for n, s in enumerate(STEMS)})
    summary = run(folders, preds, tmp_path)
    assert summary["n"]["scored"] == 6 and summary["n"]["predictions_not_hu"] == 0


@pytest.mark.parametrize("variant", ["lps", "transposed", "qform_only", "sform_only", "uint16_intercept",
                                     "int8_slope_intercept", "4d_singleton", "nifti2", "uncompressed", "float64"])
def test_other_conventions_give_the_same_grid(tmp_path, variant):
    hu = np.rint(phantom(1))
    reference = read_nifti(save(tmp_path / "ref.nii.gz", hu), GRID)[0]
    path = tmp_path / "v.nii.gz"
    if variant == "lps":  # array axes towards L, P, S with the matching affine: the same image
        flip = AFFINE.copy()
        flip[:3, :2] *= -1
        flip[:3, 3] = AFFINE[:3, :3] @ [SHAPE[0] - 1, SHAPE[1] - 1, 0] + AFFINE[:3, 3]
        save(path, hu[::-1, ::-1], flip)
    elif variant == "transposed":  # axes stored S, A, R
        save(path, hu.transpose(2, 1, 0), AFFINE[:, [2, 1, 0, 3]])
    elif variant == "qform_only":
        save(path, hu, sform=0)
    elif variant == "sform_only":
        save(path, hu, qform=0)
    elif variant == "uint16_intercept":  # stored HU + 1024, scl_inter -1024
        save(path, hu + 1024, dtype=np.uint16, slope=1.0, inter=-1024.0)
    elif variant == "int8_slope_intercept":  # coarse, but HU through the header's scaling
        save(path, np.rint((hu + 1000) / 10 - 100), dtype=np.int8, slope=10.0, inter=0.0)
    elif variant == "4d_singleton":
        save(path, hu[..., None])
    elif variant == "nifti2":
        save(path, hu, cls=nib.Nifti2Image)
    elif variant == "uncompressed":
        path = save(tmp_path / "v.nii", hu)
    elif variant == "float64":
        save(path, hu, dtype=np.float64)
    got, resampled, problem, extent = read_prediction(path, GRID)
    assert not resampled and problem is None and extent is None
    tol = 10 if variant == "int8_slope_intercept" else 0
    np.testing.assert_allclose(got, reference, atol=tol)


def test_other_shapes_and_spacings_are_resampled_to_the_grid(tmp_path):
    hu = phantom(2)
    fine = torch.nn.functional.interpolate(torch.from_numpy(hu)[None, None], scale_factor=2, mode="trilinear",
                                           align_corners=False)[0, 0].numpy()
    affine = AFFINE.copy()
    affine[:3, :3] /= 2
    affine[:3, 3] -= np.array(SPACING) / 4  # the fine voxels' centres cover the same field of view
    got, resampled = read_nifti(save(tmp_path / "fine.nii.gz", fine, affine), GRID)
    reference = read_nifti(save(tmp_path / "ref.nii.gz", hu), GRID)[0]
    assert resampled and got.shape == reference.shape
    assert np.median(np.abs(got - reference)) < 10  # the same anatomy, up to interpolation at the edges
    body, body_ref = got > -500, reference > -500
    assert (body & body_ref).sum() / (body | body_ref).sum() > 0.9  # in the same place


def test_an_oblique_affine_is_resampled_not_used_as_is(tmp_path):
    """A rotated affine with the grid's shape and spacing used to be taken as on the grid: the rotation was lost."""
    hu = np.full(SHAPE, -1000.0, np.float32)
    i, j, k = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    hu[((i - 15.5) ** 2 + (j - 15.5) ** 2 < 12 ** 2)] = 40.0  # a round body along S, symmetric about the axis
    hu[(i >= 25) & (i <= 26) & (j >= 15) & (j <= 16)] = 900.0  # a bright rod centred 40 mm to the right
    centre = AFFINE[:3, :3] @ ((np.array(SHAPE) - 1) / 2) + AFFINE[:3, 3]
    angle = np.deg2rad(60)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    shift, back = np.eye(4), np.eye(4)
    shift[:3, 3], back[:3, 3] = centre, -centre
    got, resampled = read_nifti(save(tmp_path / "oblique.nii.gz", hu, shift @ rot @ back @ AFFINE), GRID)
    assert resampled
    d, h, w = np.unravel_index(np.argmax(got), got.shape)  # (D, H, W) = (S, A, R) voxels of the grid
    offset = (np.array([w, h]) - (np.array(SHAPE[:2]) - 1) / 2) * np.array(SPACING[:2])  # mm from the centre
    expected = 40 * np.array([np.cos(angle), np.sin(angle)])  # the rod turned by 60 degrees about S
    assert np.linalg.norm(offset - expected) < 2 * SPACING[0], (offset, expected)


def test_a_header_without_orientation_is_read_with_a_warning(tmp_path, caplog):
    img = nib.Nifti1Image(np.rint(phantom(1)).astype(np.int16), None)
    img.header.set_zooms(SPACING)
    nib.save(img, tmp_path / "codes0.nii.gz")
    with caplog.at_level(logging.WARNING, logger="ctgen.jobs.pairing"):
        read_prediction(tmp_path / "codes0.nii.gz", GRID)
    assert "no orientation in the header" in caplog.text


# --- intensities that are not HU: scored, but named and flagged -----------------------------------------------


def test_values_that_are_not_hu_are_named_counted_and_flag_the_metrics(folders, tmp_path, caplog):
    hu = {s: np.rint(phantom(100 + n)) for n, s in enumerate(STEMS)}
    writers = {
        STEMS[0]: lambda p: save(p.with_suffix(".nii.gz"), np.clip(hu[STEMS[0]], -1000, 1000) / 1000, dtype=np.float32),
        STEMS[1]: lambda p: save(p.with_suffix(".nii.gz"), (np.clip(hu[STEMS[1]], -1000, 1000) + 1000) / 2000,
                                 dtype=np.float32),
        STEMS[2]: lambda p: save(p.with_suffix(".nii.gz"), np.clip(hu[STEMS[2]] + 1024, 0, 4095)),  # no intercept
        STEMS[3]: lambda p: save(p.with_suffix(".nii.gz"), hu[STEMS[3]] + 1024, dtype=np.uint16, slope=1.0,
                                 inter=-1024.0),  # HU through the header: fine
    }
    with caplog.at_level(logging.WARNING, logger="ctgen.jobs.evaluate"):
        summary = run(folders, predictions(tmp_path, writers), tmp_path)
    pv = pd.read_csv(tmp_path / "out" / "per_volume.csv", keep_default_na=False).set_index("prompt_id")["hu_problem"]
    assert "normalised values, not HU" in pv[STEMS[0]] and "normalised values, not HU" in pv[STEMS[1]]
    assert "1024 lower" in pv[STEMS[2]]
    assert (pv[STEMS[3:]] == "").all()
    assert summary["n"]["predictions_not_hu"] == 3 and summary["n"]["scored"] == 6
    note = "3 of 6 predictions hold values that do not read as HU"
    for m in summary["metrics"]:
        assert (note in (m["flag"] or "")) == (".real" not in m["name"]), m["name"]
    assert any(m["name"] == "hu.flagged_share" for m in summary["metrics"])
    assert caplog.text.count("normalised values, not HU") == 2 and caplog.text.count("1024 lower") == 1  # warned
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["n"]["predictions_not_hu"] == 3


def test_a_field_of_view_that_does_not_fit_the_grid_is_named_counted_and_flags_the_metrics(folders, tmp_path):
    """Another tool's identity affine (1 mm voxels) makes a 128 mm chest 32 mm wide: scored, but said."""
    writers = {STEMS[0]: lambda p: save(p.with_suffix(".nii.gz"), np.rint(phantom(100)), affine=np.eye(4))}
    summary = run(folders, predictions(tmp_path, writers), tmp_path)
    pv = pd.read_csv(tmp_path / "out" / "per_volume.csv", keep_default_na=False).set_index("prompt_id")
    assert "field of view 32 x 32 x 16 mm (R, A, S) against the grid's 128 x 128 x 128 mm" in \
        pv.loc[STEMS[0], "extent_problem"]
    assert (pv.loc[STEMS[1:], "extent_problem"] == "").all() and (pv["hu_problem"] == "").all()
    assert summary["n"]["predictions_off_extent"] == 1 and summary["n"]["scored"] == 6
    note = "1 of 6 predictions have a field of view that does not fit the grid"
    for m in summary["metrics"]:
        assert (note in (m["flag"] or "")) == (".real" not in m["name"]), m["name"]


def test_hu_predictions_carry_no_hu_flag(folders, tmp_path):
    summary = run(folders, predictions(tmp_path), tmp_path)
    assert summary["n"]["predictions_not_hu"] == 0
    assert not any("do not read as HU" in (m["flag"] or "") for m in summary["metrics"])


# --- broken files and pairing mistakes ---------------------------------------------------------------------


def truncated(p):
    """A .nii.gz cut in half."""
    good = save(p.with_suffix(".nii.gz"), phantom(7)).read_bytes()
    p.with_suffix(".nii.gz").write_bytes(good[: len(good) // 2])


def nan(p):
    """A float32 volume with one NaN voxel."""
    data = phantom(8)
    data[3, 3, 3] = np.nan
    save(p.with_suffix(".nii.gz"), data, dtype=np.float32)


def test_broken_files_are_skipped_named_and_counted_while_the_rest_is_scored(folders, tmp_path):
    writers = {STEMS[0]: truncated, STEMS[1]: lambda p: p.with_suffix(".nii.gz").write_text("not a NIfTI\n"),
               STEMS[2]: lambda p: p.with_suffix(".nii.gz").write_bytes(gzip.compress(b"x" * 400)), STEMS[3]: nan,
               STEMS[4]: lambda p: save(p.with_suffix(".nii.gz"), phantom(9)[None])}  # (1, I, J, K): not 3D
    preds = predictions(tmp_path, writers)
    (preds / "notes.txt").write_text("not a volume: ignored\n")
    summary = run(folders, preds, tmp_path)
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv").set_index(["stem", "side"])["reason"]
    assert "truncated" in skipped[(STEMS[0], "generated")]
    assert "unreadable NIfTI" in skipped[(STEMS[1], "generated")] and "unreadable NIfTI" in skipped[(STEMS[2], "generated")]
    assert "NaN" in skipped[(STEMS[3], "generated")] and "3D" in skipped[(STEMS[4], "generated")]
    assert summary["n"]["scored"] == 1 and summary["n"]["skipped_predictions"] == 5
    assert all(m["n"] <= 1 for m in summary["metrics"] if ".generated" in m["name"])


def test_pairing_mistakes(folders, tmp_path, capsys):
    preds = predictions(tmp_path)
    (preds / f"{STEMS[0]}.nii.gz").unlink()  # ground truth nobody predicted
    save(preds / "case_xyz.nii.gz", phantom(1))  # a prediction with no ground truth
    save(preds / f"{STEMS[1]}.nii", phantom(1))  # a second file of one stem
    summary = run(folders, preds, tmp_path)
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv").set_index(["stem", "side"])["reason"]
    assert skipped[(STEMS[0], "real")] == "no prediction with this stem"
    assert skipped[("case_xyz", "generated")] == "no ground truth with this stem"
    assert "duplicate stem" in skipped[(STEMS[1], "generated")]
    assert summary["n"]["scored"] == 5 and summary["n"]["skipped_ground_truth"] == 1
    # nothing to score: one line, exit status 2
    args = ["evaluate", "--real", str(folders / "gt"), "--models", str(folders / "models"), "--out",
            str(tmp_path / "cli"), "--device", "cpu"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "nomatch").mkdir()
    save(tmp_path / "nomatch" / "other.nii.gz", phantom(1))
    for folder, words in (("empty", "no .nii or .nii.gz file"), ("nomatch", "no prediction matches a ground-truth stem")):
        capsys.readouterr()
        assert ctgen_main([*args, "--generated", str(tmp_path / folder)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err


def test_ground_truth_that_is_not_hu_is_skipped_and_named_not_scored(folders, tmp_path):
    """Ground truth stored as HU + 1024 without an intercept (CT-RATE's first release) is not scored as HU."""
    gt = tmp_path / "gt"
    shutil.copytree(folders / "gt", gt)
    save(gt / f"{STEMS[0]}.nii.gz", np.clip(np.rint(phantom(0)) + 1024, 0, 4095), dtype=np.uint16)
    summary = evaluate.evaluate(predictions(tmp_path), [gt], folders / "models", tmp_path / "out", SETTINGS,
                                device="cpu")
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv").set_index(["stem", "side"])["reason"]
    assert "1024 lower" in skipped[(STEMS[0], "real")]
    assert skipped[(STEMS[0], "generated")] == "its ground truth was skipped"
    assert summary["n"]["scored"] == 5 and summary["n"]["skipped_ground_truth"] == 1
    # none reads as HU: one line that says why, and the table written for the rest
    for n, stem in enumerate(STEMS):
        save(gt / f"{stem}.nii.gz", np.clip(np.rint(phantom(n)) + 1024, 0, 4095), dtype=np.uint16)
    (tmp_path / "b").mkdir()
    with pytest.raises(UserError, match=r"all 6 were skipped \(first: valid_1_a_1: .*1024 lower") as err:
        evaluate.evaluate(predictions(tmp_path / "b"), [gt], folders / "models", tmp_path / "none", SETTINGS,
                          device="cpu")
    assert "\n" not in str(err.value) and len(pd.read_csv(tmp_path / "none" / "skipped.csv")) == 12


def test_a_ctrate_root_scores_the_fixed_release_not_the_raw_copy(folders, tmp_path):
    """A download root holding valid/ (raw, first release) and valid_fixed/ (HU): the HU copy is the ground truth."""
    root = tmp_path / "dataset"
    for n, stem in enumerate(STEMS):
        pid = stem.rsplit("_", 2)[0]
        for split, shift in (("valid", 1024), ("valid_fixed", 0)):
            folder = root / split / pid / stem.rsplit("_", 1)[0]
            folder.mkdir(parents=True, exist_ok=True)
            save(folder / f"{stem}.nii.gz", np.clip(np.rint(phantom(n)) + shift, -1024, 4095))
    summary = evaluate.evaluate(predictions(tmp_path), [root], folders / "models", tmp_path / "out", SETTINGS,
                                device="cpu")
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert summary["n"]["scored"] == 6 and summary["n"]["skipped_ground_truth"] == 6  # the raw copies, named:
    assert skipped["path"].str.contains("/valid/").all() and skipped["reason"].str.contains("valid_fixed").all()


def test_a_samples_manifests_relative_paths_are_its_own_from_any_folder(tmp_path, monkeypatch):
    """ctgen writes samples.csv with the paths it was given; read from another run's folder, the same relative path
    named that run's file."""
    from ctgen.jobs.pairing import read_predictions

    for run_dir in ("runA", "runB"):
        (tmp_path / run_dir / "samples").mkdir(parents=True)
        save(tmp_path / run_dir / "samples" / "x_s0.nii.gz", phantom(1))
    pd.DataFrame({"prompt_id": ["x"], "nifti": ["samples/x_s0.nii.gz"], "seed": [0]}).to_csv(
        tmp_path / "runA" / "samples" / "samples.csv", index=False)
    monkeypatch.chdir(tmp_path / "runB")
    [pred], _ = read_predictions(tmp_path / "runA" / "samples" / "samples.csv")
    assert Path(pred.path).resolve() == (tmp_path / "runA" / "samples" / "x_s0.nii.gz").resolve()


def test_a_hand_made_manifest_numbers_each_stems_repeats_from_0(tmp_path):
    """Without a repeat column, the repeats of a stem are counted in order (ctgen's numbering), so that two such
    manifests of the same reports pair volume by volume; the row number gave x's second volume repeat 2 here and 1
    in a manifest listing the stems in another order."""
    from ctgen.jobs.pairing import read_predictions

    rows = [("x", "x_a"), ("y", "y_a"), ("x", "x_b"), ("y", "y_b")]
    for name, order in (("one.csv", rows), ("two.csv", sorted(rows))):
        pd.DataFrame({"prompt_id": [r[0] for r in order], "nifti": [f"{r[1]}.nii.gz" for r in order]}).to_csv(
            tmp_path / name, index=False)
    one, _ = read_predictions(tmp_path / "one.csv")
    two, _ = read_predictions(tmp_path / "two.csv")
    key = {p.stem + "/" + str(p.repeat): Path(p.path).name for p in one}
    assert key == {p.stem + "/" + str(p.repeat): Path(p.path).name for p in two} == {
        "x/0": "x_a.nii.gz", "x/1": "x_b.nii.gz", "y/0": "y_a.nii.gz", "y/1": "y_b.nii.gz"}


# --- vlm3d-score ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pooled():
    """A fixed feature 'network' for the FVD protocol: 2 x 2 x 2 average pooling of the windowed volume."""
    return volume_proxy(lambda x: F.adaptive_avg_pool3d(x, 2).flatten(1), "avgpool:test")


def test_vlm3d_skips_broken_pairs_names_and_counts_them(folders, tmp_path, pooled):
    preds = predictions(tmp_path, {STEMS[0]: truncated, STEMS[1]: nan,
                                   STEMS[2]: lambda p: p.with_suffix(".nii.gz").write_text("not a NIfTI\n")})
    with pytest.raises(VolumeError, match="truncated"):  # a ValueError naming the file, not an EOFError
        hu_problem(preds / f"{STEMS[0]}.nii.gz")
    summary = score_vlm3d(preds, folders / "gt", proxies={"fvd": pooled}, out_dir=tmp_path / "out",
                          grids={"fvd_shape": (8, 16, 16)})
    assert summary["n_pairs"] == 3 and summary["n_skipped_pairs"] == 3 and summary["stems"] == STEMS[3:]
    skipped = summary["skipped_pairs"]
    assert "truncated" in skipped[STEMS[0]]["generated"] and "NaN" in skipped[STEMS[1]]["generated"]
    assert "unreadable" in skipped[STEMS[2]]["generated"]
    records = summary["records"]["vlm3d-2026"]
    assert records and all("3 of 6 pairs not scored" in r["flag"] for r in records)
    assert json.loads((tmp_path / "out" / "vlm3d.json").read_text())["n_skipped_pairs"] == 3


def test_vlm3d_counts_hu_problems_of_scored_pairs_only(folders, tmp_path, pooled):
    """A pair left out for an unreadable prediction is not scored: its raw (not HU) scan neither stops the run as
    'no real volume reads as HU' nor flags the records of the pairs that are scored."""
    gt = tmp_path / "gt"
    shutil.copytree(folders / "gt", gt)
    save(gt / f"{STEMS[0]}.nii.gz", np.rint(phantom(0)) + 1024)  # raw stored values, as a raw CT-RATE copy
    for stem in STEMS[1:]:
        (gt / f"{stem}.nii.gz").unlink()
    save(gt / f"{STEMS[1]}.nii.gz", np.rint(phantom(1)))
    preds = predictions(tmp_path, {STEMS[0]: truncated})
    for stem in STEMS[2:]:
        (preds / f"{stem}.nii.gz").unlink()
    summary = score_vlm3d(preds, gt, proxies={"fvd": pooled}, grids={"fvd_shape": (8, 16, 16)})
    assert summary["stems"] == [STEMS[1]] and summary["hu_problems"] == {} and list(summary["skipped_pairs"]) == [STEMS[0]]
    assert all("read as HU" not in (r["flag"] or "") for r in summary["records"]["vlm3d-2026"])


def test_vlm3d_with_no_readable_pair_is_one_user_error(folders, tmp_path, pooled):
    preds = tmp_path / "preds"
    preds.mkdir()
    (preds / f"{STEMS[0]}.nii.gz").write_bytes(gzip.compress(b"broken"))
    with pytest.raises(UserError, match=f"no pair can be scored.*{STEMS[0]}"):
        score_vlm3d(preds, folders / "gt", proxies={"fvd": pooled}, grids={"fvd_shape": (8, 16, 16)})


def test_vlm3d_reads_float32_and_scaled_predictions_as_hu(folders, tmp_path, pooled):
    writers = {STEMS[0]: lambda p: save(p.with_suffix(".nii.gz"), phantom(100), dtype=np.float32),
               STEMS[1]: lambda p: save(p.with_suffix(".nii.gz"), np.rint(phantom(101)) + 1024, dtype=np.uint16,
                                        slope=1.0, inter=-1024.0),
               STEMS[2]: lambda p: save(p.with_suffix(".nii.gz"), np.clip(np.rint(phantom(102)) + 1024, 0, 4095))}
    summary = score_vlm3d(predictions(tmp_path, writers), folders / "gt", proxies={"fvd": pooled},
                          grids={"fvd_shape": (8, 16, 16)})
    assert list(summary["hu_problems"]) == [STEMS[2]] and "1024 lower" in summary["hu_problems"][STEMS[2]]["generated"]
    assert summary["n_pairs"] == 6 and summary["n_skipped_pairs"] == 0


def test_a_ground_truth_in_two_manifests_is_one_mistake_not_two_scores(cohort):
    from ctgen.jobs.pairing import RealSet

    assert len(RealSet([cohort["manifest"]]).stems) > 0
    with pytest.raises(UserError, match="is in more than one shard manifest"):
        RealSet([cohort["manifest"], cohort["manifest"]])


def test_ground_truth_padding_is_air_on_the_evaluation_grid(data_dir):
    """A real scan's padding outside the scan circle (-3024 HU) is set to air before the evaluation resamples it,
    as prep does for the training data: it gave the real side a dark rim (747 HU at most) the generated side lacks."""
    from ctgen.jobs.pairing import on_grid
    from ctprep.volume import Volume, load_nifti

    vol = load_nifti(data_dir / "example_ct_sm.nii.gz")
    a = vol.array.astype(np.int16)
    x, y = np.meshgrid(np.arange(a.shape[1]), np.arange(a.shape[2]), indexing="ij")
    outside = (x - a.shape[1] / 2) ** 2 + (y - a.shape[2] / 2) ** 2 > (0.42 * min(a.shape[1:3])) ** 2
    padded, air = a.copy(), a.copy()
    padded[:, outside], air[:, outside] = -3024, -1024
    grid = Grid(spacing=(2.5, 2.5, 4.0), shape=(150, 128, 24), clip=(-1000.0, 1000.0))  # the whole scan circle
    got, resampled = on_grid(Volume(padded, vol.affine, vol.meta), grid, "padded")
    want, _ = on_grid(Volume(air, vol.affine, vol.meta), grid, "air")
    assert resampled and np.array_equal(got, want)
