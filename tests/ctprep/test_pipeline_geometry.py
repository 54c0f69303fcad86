"""End to end: demo files (default NIfTI headers) + metadata -> preprocessing -> the phantom's anatomy.

The phantom is a function of physical RAS position, so the preprocessed volume must equal the
phantom sampled at the output voxel centres. A left-right or head-feet error cannot pass.
"""

import numpy as np
import pytest

from ctprep.cohort import build_cohort, metadata_row
from ctprep.demo import write_demo_cohort
from ctprep.demo.phantom import Phantom
from ctprep.preprocess import preprocess_volume
from ctprep.volume import load_nifti

CFG = {"seed": 3, "n_train_patients": 4, "n_valid_patients": 1, "max_scans_per_patient": 1,
       "max_recons_per_scan": 1, "matrix": 96, "slices": [30, 40], "z_spacing_mm": [4.0, 6.0], "faults": []}
PRESET = {"mode": "spacing", "spacing": [4.0, 4.0, 6.0], "shape": [96, 96, 64], "center": "body",
          "clip": [-1000, 1000], "antialias": False}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "dataset"
    truth = write_demo_cohort(root, CFG)
    cohort, rejects = build_cohort(root, n_chunks=1)
    assert rejects.empty
    return cohort, truth.set_index("VolumeName")


def _compare(out, phantom):
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in out.shape], indexing="ij"), -1).reshape(-1, 3)
    ras = ijk @ out.affine[:3, :3].T + out.affine[:3, 3]
    expected = np.clip(phantom.hu_at(ras), -1000, 1000).reshape(out.shape)
    return expected


def test_preprocessed_volumes_match_the_phantom_in_world_space(demo):
    cohort, truth = demo
    seen = set()
    for rec in cohort.to_dict("records"):
        t = truth.loc[rec["VolumeName"]]
        out = preprocess_volume(load_nifti(rec["path"]), metadata_row(rec), PRESET)
        expected = _compare(out, Phantom.from_json(t["phantom"]))
        body = (expected > -900) & (out.data > -1000)  # tissue, and inside the scanned range
        assert body.mean() > 0.05
        err = np.abs(out.data - expected)[body]
        # noise (<= 25 HU) and partial volume at tissue edges; a flipped axis gives hundreds of HU
        assert np.median(err) < 25, (rec["VolumeName"], np.median(err))
        for axis in range(3):  # the same comparison with any axis mirrored fails clearly
            mirrored = np.abs(out.data - np.flip(expected, axis))[body]
            assert np.mean(mirrored) > 1.5 * np.mean(err) + 10, (rec["VolumeName"], axis)
        seen.add((t["stored_convention"], bool(t["reversed_slices"])))
    assert {c for c, _ in seen} == {"hu", "raw"}  # both intensity conventions went through


def test_pnms_and_intercepts_are_decided_per_volume(demo):
    cohort, truth = demo
    for rec in cohort.to_dict("records"):
        out = preprocess_volume(load_nifti(rec["path"]), metadata_row(rec), PRESET)
        hist = {h["op"]: h for h in out.meta["history"]}
        t = truth.loc[rec["VolumeName"]]
        assert hist["to_hu"]["convention"] == t["stored_convention"]
        assert hist["geometry"]["reversed_slices"] == bool(t["reversed_slices"])


def test_default_demo_conventions_all_detected(tmp_path, repo_config):
    """Regression: raw-stored -2048 padding reads as air-like -1024 under the wrong mapping."""
    import yaml

    from ctprep.intensity import to_hu

    cfg = {**yaml.safe_load(repo_config.read_text())["demo"], "faults": []}
    truth = write_demo_cohort(tmp_path / "dataset", cfg).set_index("VolumeName")
    cohort, _ = build_cohort(tmp_path / "dataset")
    for rec in cohort.to_dict("records"):
        meta = metadata_row(rec)
        vol = to_hu(load_nifti(rec["path"]), float(meta["RescaleSlope"]), float(meta["RescaleIntercept"]))
        assert vol.meta["stored_convention"] == truth.loc[rec["VolumeName"], "stored_convention"], rec["VolumeName"]
