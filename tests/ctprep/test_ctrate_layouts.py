"""CT-RATE's two layouts (``<split>_fixed/`` in HU, ``<split>/`` raw), the preference between them,
no-chest lists, blank labels and partial downloads, on demo releases written in each layout.

Voxel values are read back with nibabel and compared with the other copy and the metadata's
intercept; label cells with the CSV as pandas reads it on its own.
"""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from ctprep import ctrate
from ctprep.cohort import assemble_cohort, build_cohort, metadata_row, write_cohort
from ctprep.demo import write_demo_cohort
from ctprep.intensity import to_hu
from ctprep.preprocess import preprocess_volume
from ctprep.rejects import RejectedInput
from ctprep.volume import Volume, VolumeError, load_nifti

BASE = {"seed": 2, "n_train_patients": 4, "n_valid_patients": 2, "matrix": 48, "slices": [20, 24],
        "z_spacing_mm": [6.0, 8.0], "faults": []}
BOTH = {**BASE, "layout": "both", "no_chest": 2, "blank_labels": 0.15}
PRESET = {"mode": "spacing", "spacing": [8.0, 8.0, 8.0], "shape": [32, 32, 24], "clip": [-1000, 1000]}


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    root = tmp_path_factory.mktemp("both") / "dataset"
    return root, write_demo_cohort(root, BOTH).set_index("VolumeName", drop=False)


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fixed") / "dataset"
    cfg = {**BASE, "n_train_patients": 2, "n_valid_patients": 1, "layout": "fixed"}
    return root, write_demo_cohort(root, cfg).set_index("VolumeName", drop=False)


def _copy(root, tmp_path):
    dst = tmp_path / "dataset"
    shutil.copytree(root, dst)
    return dst


def _voxels(path):
    return np.asanyarray(nib.load(path).dataobj).astype(np.float32)


# --- the demo writes both layouts -------------------------------------------------------------------
def test_both_layouts_written_with_partial_copies(both):
    root, truth = both
    assert {"fixed", "original", "fixed+original"} <= set(truth["layouts"])
    for t in truth.itertuples():
        for layout in ctrate.LAYOUTS:
            path = root / ctrate.volume_relpath(t.VolumeName, layout)
            assert path.is_file() == (layout in t.layouts.split("+")), (t.VolumeName, layout)
    assert (root / "train_fixed").is_dir() and (root / "valid_fixed").is_dir()


def test_fixed_copy_holds_the_hu_of_the_original(both):
    """Same volume in both trees: the _fixed file is HU, the original raw (HU - intercept) or HU."""
    root, truth = both
    meta = pd.concat([pd.read_csv(ctrate.metadata_csv(root, s)) for s in ("train", "valid")]).set_index("VolumeName")
    checked = set()
    for t in truth[truth["layouts"] == "fixed+original"].itertuples():
        hu = _voxels(root / t.fixed_path)
        stored = _voxels(root / t.original_path)
        intercept = float(meta.loc[t.VolumeName, "RescaleIntercept"])
        assert intercept in (-1024.0, -8192.0)  # the metadata keeps the scanner's rescale in both releases
        expected = stored + intercept if t.original_convention == "raw" else stored
        np.testing.assert_array_equal(hu, expected)
        assert hu.min() >= -2048 and np.median(hu) < 0  # HU: air and lung below zero
        checked.add(t.original_convention)
    assert checked == {"hu", "raw"}


def test_fixed_layout_writes_only_fixed_hu(fixed):
    root, truth = fixed
    assert not (root / "train").exists() and not (root / "valid").exists()
    assert set(truth["layouts"]) == {"fixed"} and set(truth["stored_convention"]) == {"hu"}
    cohort, rejects = build_cohort(root)
    assert rejects.empty and set(cohort["layout"]) == {"fixed"}
    assert all("_fixed/" in p for p in cohort["path"])


# --- preference and discovery ---------------------------------------------------------------------
@pytest.mark.parametrize("prefer", ["fixed", "original"])
def test_preference_picks_the_copy_and_falls_back(both, prefer):
    root, truth = both
    cohort, _ = build_cohort(root, prefer=prefer)
    other = {"fixed": "original", "original": "fixed"}[prefer]
    assert set(cohort["VolumeName"]) == set(truth.loc[~truth["no_chest"], "VolumeName"])  # every volume, either way
    for rec in cohort.to_dict("records"):
        layouts = truth.loc[rec["VolumeName"], "layouts"]
        assert rec["layouts"] == layouts
        assert rec["layout"] == (prefer if prefer in layouts.split("+") else other)
        assert rec["path"].endswith(truth.loc[rec["VolumeName"], f"{rec['layout']}_path"])
        assert ctrate.layout_of(rec["path"]) == rec["layout"]
    with pytest.raises(ValueError, match="dataset.prefer"):
        build_cohort(root, prefer="newest")
    with pytest.raises(ValueError, match=r"unknown split\(s\) \['validation'\]"):  # the reports' name, not the split's
        build_cohort(root, splits=("train", "validation"))


def test_layout_of_paths():
    assert ctrate.layout_of("/d/train_fixed/train_1/train_1_a/train_1_a_1.nii.gz") == "fixed"
    assert ctrate.layout_of("/d/valid/valid_2/valid_2_b/valid_2_b_1.nii.gz") == "original"
    assert ctrate.layout_of("/d/valid_fixed/valid_2_b_1.nii.gz") == "fixed"  # a flattened copy
    assert ctrate.layout_of("/train/dataset/valid_fixed/valid_2/valid_2_b/valid_2_b_1.nii.gz") == "fixed"
    assert ctrate.layout_of("/d/train_fixed/valid_2_b_1.nii.gz") is None  # not its split's folder
    assert ctrate.layout_of("results/dicom/volumes/train_1_a_1.nii.gz") is None
    assert ctrate.layout_of("/d/train_fixed/x/scan.nii.gz") is None and ctrate.layout_of(None) is None
    assert ctrate.stated_convention("/d/train_fixed/train_1/train_1_a/train_1_a_1.nii.gz") == \
        {"folder": "train_fixed", "convention": "hu"}
    assert ctrate.stated_convention("/d/train/train_1/train_1_a/train_1_a_1.nii.gz") is None


def test_two_files_for_one_volume_in_a_layout_are_refused(both, tmp_path):
    root = _copy(both[0], tmp_path)
    t = both[1]
    name = t.loc[(t["layouts"] == "fixed") & ~t["no_chest"], "VolumeName"].iloc[0]
    flat = root / ctrate.volume_folder(name.split("_")[0], "fixed") / name  # a second, flattened copy
    shutil.copy(root / ctrate.volume_relpath(name, "fixed"), flat)
    _, rejects = build_cohort(root)
    reason = rejects.set_index("VolumeName").loc[name, "reason"]
    assert reason.startswith("2 files for one volume under ") and "_fixed/" in reason


# --- intensity: the folder and the data -------------------------------------------------------------
def test_fixed_volumes_are_not_rescaled(fixed):
    root, truth = fixed
    cohort, _ = build_cohort(root)
    for rec in cohort.to_dict("records"):
        meta = metadata_row(rec)
        slope, intercept = float(meta["RescaleSlope"]), float(meta["RescaleIntercept"])
        out = to_hu(load_nifti(rec["path"]), slope, intercept)
        np.testing.assert_array_equal(out.data, _voxels(rec["path"]))  # as stored: HU, no -1024 shift
        step = out.meta["history"][-1]
        assert (step["convention"], step["folder"], step["folder_convention"]) == ("hu", f"{rec['split']}_fixed", "hu")
        assert intercept != 0  # the metadata's rescale is there, and ignored
    rec = cohort.iloc[0]
    out = preprocess_volume(load_nifti(rec["path"]), metadata_row(rec), PRESET)
    assert out.data.min() >= -1000 and (out.data < -900).mean() > 0.1  # air outside the body, not -2000


def test_folder_and_data_disagreeing_is_a_reject(both, tmp_path):
    """A raw file in a _fixed folder (a misplaced copy) is refused, naming both readings."""
    root, truth = both
    t = truth[(truth["original_convention"] == "raw") & (truth["layouts"] == "fixed+original")].iloc[0]
    misplaced = tmp_path / ctrate.volume_relpath(t["VolumeName"], "fixed")
    misplaced.parent.mkdir(parents=True)
    shutil.copy(root / t["original_path"], misplaced)
    meta = pd.read_csv(ctrate.metadata_csv(root, t["split"])).set_index("VolumeName").loc[t["VolumeName"]]
    slope, intercept = float(meta["RescaleSlope"]), float(meta["RescaleIntercept"])
    with pytest.raises(VolumeError, match=r"folder (train|valid)_fixed/ holds HU but the data reads as raw"):
        to_hu(load_nifti(misplaced), slope, intercept)
    # the same file where it belongs is rescaled once
    raw = to_hu(load_nifti(root / t["original_path"]), slope, intercept)
    np.testing.assert_array_equal(raw.data, _voxels(root / t["fixed_path"]))
    # a forced convention never contradicts the folder; `hu` agrees with it
    fixed_vol = load_nifti(root / t["fixed_path"])
    with pytest.raises(VolumeError, match="rescale twice"):
        to_hu(fixed_vol, slope, intercept, convention="raw")
    np.testing.assert_array_equal(to_hu(fixed_vol, slope, intercept, convention="hu").data, fixed_vol.data)
    # outside a CT-RATE tree nothing is stated: the data decides, as before
    loose = Volume.from_3d(fixed_vol.data, fixed_vol.affine, source=str(tmp_path / "loose.nii.gz"))
    assert to_hu(loose, slope, intercept).meta["stored_convention"] == "hu"


# --- no-chest lists ----------------------------------------------------------------------------------
def test_no_chest_volumes_are_rejected_with_the_reason(both):
    root, truth = both
    cohort, rejects = build_cohort(root)
    listed = truth[truth["no_chest"]]
    assert set(listed["split"]) == {"train", "valid"} and len(listed[listed["split"] == "train"]) == 2
    # the demo writes the list as a person might: one name without .nii.gz, padded, blank lines
    text = ctrate.no_chest_txt(root, "train").read_text()
    assert "\n\n" in text and any(line.startswith("  ") and ".nii" not in line for line in text.splitlines())
    reasons = rejects.set_index("VolumeName")["reason"]
    for t in listed.itertuples():
        assert reasons[t.VolumeName] == f"not a chest CT (listed in metadata/no_chest_{t.split}.txt)"
        assert t.VolumeName not in set(cohort["VolumeName"])
    assert len(rejects) == len(listed)


def test_no_chest_list_tolerates_real_world_formatting(tmp_path):
    path = tmp_path / "no_chest_train.txt"
    path.write_bytes("\ufeffVolumeName\r\n train_1_a_1.nii.gz \r\n\r\n\"train_2_b_2\"\r\n"
                     "train_fixed/train_3/train_3_a/train_3_a_1_fixed.nii.gz\r\n# a comment\r\ntrain_4_a\r\n".encode())
    entries = ctrate.read_volume_list(path)
    assert entries == ["train_1_a_1.nii.gz", "train_2_b_2.nii.gz", "train_3_a_1.nii.gz", "train_4_a.nii.gz"]
    assert [ctrate.scan_of_entry(e) for e in entries] == [None, None, None, "train_4_a"]


def test_a_scan_listed_as_no_chest_rejects_all_its_reconstructions(both, tmp_path):
    root = _copy(both[0], tmp_path)
    truth = both[1]
    scan = truth.loc[truth["VolumeName"].str.endswith("_2.nii.gz") & ~truth["no_chest"], "VolumeName"].iloc[0][:-9]
    split = scan.split("_")[0]
    ctrate.no_chest_txt(root, split).write_text(f"{scan}\n{split}_999_a_1.nii.gz\n")
    built = assemble_cohort(root)
    cohort, rejects = built.table, built.rejects
    assert built.summary["splits"][split]["no_chest_list"] == {"file": f"no_chest_{split}.txt", "entries": 2,
                                                                "unmatched": 1}
    recons = set(truth.loc[truth["VolumeName"].str.startswith(scan + "_"), "VolumeName"])
    assert len(recons) == 2
    assert recons <= set(rejects.loc[rejects["reason"].str.startswith("not a chest CT"), "VolumeName"])
    assert not recons & set(cohort["VolumeName"])


def test_strict_mode_fails_on_bad_input_not_on_exclusions(both, tmp_path):
    root = _copy(both[0], tmp_path)
    cohort = write_cohort(root, tmp_path / "c.parquet", tmp_path / "r.parquet", strict=True)
    assert len(pd.read_parquet(tmp_path / "r.parquet")) == 4 and len(cohort)  # the no-chest volumes
    labels = ctrate.labels_csv(root, "valid")
    df = pd.read_csv(labels, dtype=str, keep_default_na=False)
    df.loc[df["VolumeName"] == cohort.loc[cohort["split"] == "valid", "VolumeName"].iloc[0], "Emphysema"] = "0.5"
    df.to_csv(labels, index=False)
    with pytest.raises(RejectedInput, match=r"label values must be 0, 1 or blank, not '0.5'"):
        write_cohort(root, tmp_path / "c.parquet", tmp_path / "r.parquet", strict=True)


# --- blank labels --------------------------------------------------------------------------------------
def test_blank_labels_stay_missing_through_the_table(both, tmp_path):
    root, truth = both
    write_cohort(root, tmp_path / "c.parquet", tmp_path / "r.parquet")
    cohort = pd.read_parquet(tmp_path / "c.parquet")
    assert all(str(cohort[lab].dtype) == "Int8" for lab in ctrate.LABELS)
    csv = pd.concat([pd.read_csv(ctrate.labels_csv(root, s)) for s in ("train", "valid")]).set_index("VolumeName")
    n_blank = 0
    for rec in cohort.to_dict("records"):
        t = truth.loc[rec["VolumeName"]]
        blank, present = set(json.loads(t["blank_labels"])), set(json.loads(t["labels"]))
        for lab in ctrate.LABELS:
            if lab in blank:
                assert pd.isna(rec[lab]) and np.isnan(csv.loc[rec["VolumeName"], lab])
                n_blank += 1
            else:
                assert rec[lab] == int(lab in present) == csv.loc[rec["VolumeName"], lab]
    assert n_blank > 10
    # Parquet holds real nulls, not zeros
    nulls = sum(pq.read_table(tmp_path / "c.parquet", columns=[lab]).column(0).null_count for lab in ctrate.LABELS)
    assert nulls == n_blank


# --- partial downloads ---------------------------------------------------------------------------------
def test_not_downloaded_is_counted_not_rejected(both, tmp_path):
    root = _copy(both[0], tmp_path)
    truth = both[1]
    ok = truth[~truth["no_chest"] & (truth["split"] == "train")]
    gone = ok.loc[ok["layouts"] == "fixed+original", "VolumeName"].iloc[0]  # neither copy downloaded
    half = ok.loc[ok["layouts"] == "fixed+original", "VolumeName"].iloc[1]  # only the original copy
    broken = ok.loc[ok["layouts"] == "fixed", "VolumeName"].iloc[0]  # on disk but truncated
    for layout in ctrate.LAYOUTS:
        (root / ctrate.volume_relpath(gone, layout)).unlink()
    (root / ctrate.volume_relpath(half, "fixed")).unlink()
    path = root / ctrate.volume_relpath(broken, "fixed")
    path.write_bytes(path.read_bytes()[:1000])
    shutil.rmtree(root / "valid")  # the whole original valid tree: its volumes only there are not downloaded
    valid_gone = set(truth.loc[(truth["split"] == "valid") & (truth["layouts"] == "original"), "VolumeName"])
    assert valid_gone

    summary_path = tmp_path / "summary.json"
    cohort = write_cohort(root, tmp_path / "c.parquet", tmp_path / "r.parquet", out_summary=summary_path)
    rejects = pd.read_parquet(tmp_path / "r.parquet")
    assert not ({gone} | valid_gone) & (set(cohort["VolumeName"]) | set(rejects["VolumeName"]))
    by_name = cohort.set_index("VolumeName")
    assert by_name.loc[half, "layout"] == "original" and by_name.loc[half, "layouts"] == "original"
    assert broken in by_name.index  # a broken file is found when read (preprocessing), and rejected there
    with pytest.raises(VolumeError):
        load_nifti(by_name.loc[broken, "path"])
    summary = json.loads(summary_path.read_text())
    train, valid = summary["splits"]["train"], summary["splits"]["valid"]
    assert train["not_downloaded"] == 1 and valid["not_downloaded"] == len(valid_gone)
    assert train["listed"] == (truth["split"] == "train").sum() == train["on_disk"] + 1
    assert train["in_cohort"] + train["rejected"] + train["not_downloaded"] == train["listed"]
    assert valid["on_disk_by_layout"]["original"] == 0
    assert train["rejected_by_reason"] == {"not a chest CT (listed in metadata/no_chest_train.txt)": 2}
    train_rows = cohort[cohort["split"] == "train"]
    assert train["in_cohort_by_layout"]["original"] == (train_rows["layout"] == "original").sum() >= 2
    assert summary["total"]["not_downloaded"] == 1 + len(valid_gone) and summary["prefer"] == "fixed"
    assert train["labels_missing"]["cells"] == train_rows[list(ctrate.LABELS)].isna().to_numpy().sum() > 0


def test_nothing_downloaded_is_a_clear_error(both, tmp_path):
    root = _copy(both[0], tmp_path)
    for split in ("train", "valid"):
        for layout in ctrate.LAYOUTS:
            shutil.rmtree(root / ctrate.volume_folder(split, layout))
    built = assemble_cohort(root)
    assert built.table.empty and built.rejects.empty and built.summary["total"]["not_downloaded"] == len(both[1])
    with pytest.raises(ValueError, match=r"no usable volume .*: 0 found on disk \(in train_fixed/, train/"):
        write_cohort(root, tmp_path / "c.parquet", tmp_path / "r.parquet")


def test_the_cohort_command_reads_the_configs_dataset_choices(both, tmp_path, monkeypatch):
    """`ctprep cohort --config` makes the workflow's choices: dataset.prefer and dataset.splits (flags override)."""
    import yaml

    from ctprep.cli import main

    root, truth = both
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"prep": {"n_chunks": 2}, "dataset": {"prefer": "original", "splits": ["train"]}}))
    assert main(["cohort", str(root), str(tmp_path / "c.parquet"), str(tmp_path / "r.parquet"), "--config",
                 str(config)]) == 0
    cohort = pd.read_parquet(tmp_path / "c.parquet")
    assert set(cohort["split"]) == {"train"}
    both_trees = cohort[cohort["layouts"] == "fixed+original"]
    assert len(both_trees) and set(both_trees["layout"]) == {"original"}
    assert main(["cohort", str(root), str(tmp_path / "c2.parquet"), str(tmp_path / "r2.parquet"), "--config",
                 str(config), "--prefer", "fixed", "--splits", "train", "valid"]) == 0
    cohort = pd.read_parquet(tmp_path / "c2.parquet")
    assert set(cohort["split"]) == {"train", "valid"}
    assert set(cohort.loc[cohort["layouts"] == "fixed+original", "layout"]) == {"fixed"}
    config.write_text(yaml.safe_dump({"prep": {"n_chunks": 0}}))
    assert main(["cohort", str(root), str(tmp_path / "c3.parquet"), str(tmp_path / "r3.parquet"), "--config",
                 str(config)]) == 2  # a one-line mistake, not a ZeroDivisionError


def test_hidden_companion_files_are_no_volumes(fixed, tmp_path):
    """macOS leaves ``._<name>`` beside each file copied to exFAT: each became an "invalid VolumeName" reject. Hidden
    folders hold no volumes either."""
    root = _copy(fixed[0], tmp_path)
    expected = build_cohort(root)
    for path in list((root / "train_fixed").rglob("*.nii.gz")):
        (path.parent / ("._" + path.name)).write_bytes(b"\0" * 4096)
        # rsync's partial copy of a transfer under way: the volumes digest skips it, so the cohort must too (a
        # "2 files for one volume" reject that the transfer's end did not rerun)
        (path.parent / ".~tmp~").mkdir(exist_ok=True)
        (path.parent / ".~tmp~" / path.name).write_bytes(b"\0" * 16)
    cohort, rejects = build_cohort(root)
    assert cohort.equals(expected[0]) and rejects.equals(expected[1])


def test_no_chest_list_under_either_split_spelling_and_with_nii_entries(fixed, tmp_path):
    """``no_chest_validation.txt`` (the reports' spelling of the split) was ignored without a word; an entry
    ``<name>.nii`` matched no ``<name>.nii.gz`` volume."""
    root = _copy(fixed[0], tmp_path)
    cohort = build_cohort(root)[0]
    train = cohort.loc[cohort["split"] == "train", "VolumeName"].iloc[0]
    valid = cohort.loc[cohort["split"] == "valid", "VolumeName"].iloc[0]
    ctrate.no_chest_txt(root, "train").write_text(train[:-3] + "\n")
    (root / "metadata" / "no_chest_validation.txt").write_text(valid + "\n")
    assert ctrate.no_chest_txt(root, "valid").name == "no_chest_validation.txt"
    reasons = build_cohort(root)[1].set_index("VolumeName")["reason"]
    assert reasons[train] == "not a chest CT (listed in metadata/no_chest_train.txt)"
    assert reasons[valid] == "not a chest CT (listed in metadata/no_chest_validation.txt)"
    (root / "metadata" / "no_chest_valid.txt").write_text(valid + "\n")
    with pytest.raises(ValueError, match="two no-chest lists for split valid: .*no_chest_valid.txt and .*keep one"):
        build_cohort(root)
