"""Getting a prepared volume back out of the shards as NIfTI (``ctprep extract``)."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from ctprep.extract import read_sample
from ctprep.preprocess import preprocess_volume
from ctprep.shards import ShardError, write_shards
from ctprep.volume import Volume, load_nifti

# anisotropic, not centred at the origin: the affine has to come back exactly
GRID = {"mode": "spacing", "spacing": [1.25, 1.5, 2.5], "shape": [96, 80, 60], "center": "body",
        "clip": [-1000, 1000], "pad_hu": -1024}


@pytest.fixture
def shards(tmp_path, data_dir):
    """Two real scans preprocessed and sharded; one more with an oblique, flipped affine."""
    samples = []
    for i, name in enumerate(["pulmonary_report_ct_cropped.nii.gz", "example_ct.nii.gz"]):
        vol = preprocess_volume(load_nifti(data_dir / name), None, GRID, {"geometry": "header"})
        samples.append(vol)
    src = load_nifti(data_dir / "example_ct_sm.nii.gz")
    a = np.deg2rad(17.0)
    rot = np.eye(4)
    rot[:3, :3] = [[np.cos(a), 0, np.sin(a)], [0, -1, 0], [-np.sin(a), 0, np.cos(a)]]  # j flipped, tilted
    samples.append(Volume(np.asarray(src.array).astype(np.int16), rot @ src.affine, src.meta))
    records = [{"key": f"valid_{i + 1}_a_1", "volume": v, "prompt": f"p{i}", "prompts": {"t": f"p{i}"},
                "meta": {"VolumeName": f"valid_{i + 1}_a_1.nii.gz"}, "labels": [np.nan] + [i % 2] * 17}
               for i, v in enumerate(samples)]
    write_shards(records, tmp_path / "shards", "valid", shard_size=2, split="valid")
    return tmp_path / "shards" / "valid.manifest.json", records


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ctprep.cli", "extract", *map(str, args)],
                          capture_output=True, text=True)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_extract_writes_the_shard_volume_with_its_affine(shards, tmp_path, index):
    manifest, records = shards
    rec = records[index]
    out = tmp_path / f"{rec['key']}.nii.gz"
    res = _cli(manifest, rec["key"], out)
    assert res.returncode == 0, res.stderr
    # read back with nibabel, compared with what went into the shard
    img = nib.load(out)
    vol = rec["volume"]
    # NIfTI-1 stores the sform in float32: equal to ~1e-6 mm (the shard keeps float64, exactly)
    np.testing.assert_allclose(img.affine, vol.affine, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(read_sample(manifest, rec["key"])["volume"].affine, vol.affine)
    assert img.header.get_sform(coded=True)[1] == 1 and img.header.get_qform(coded=True)[1] == 1
    data = np.asanyarray(img.dataobj)
    assert data.dtype == np.int16
    np.testing.assert_array_equal(data, np.clip(np.rint(vol.data), -32768, 32767).astype(np.int16))
    assert nib.aff2axcodes(img.affine) == vol.orientation


def test_extract_by_volume_name_and_read_sample(shards, tmp_path):
    manifest, records = shards
    out = tmp_path / "by_name.nii"
    assert _cli(manifest, "valid_2_a_1.nii.gz", out).returncode == 0
    np.testing.assert_allclose(nib.load(out).affine, records[1]["volume"].affine, rtol=0, atol=1e-4)
    got = read_sample(manifest, "valid_2_a_1")
    for spelt in ("valid_2_a_1_fixed.nii.gz", "valid_2_a_1_fixed", " valid_2_a_1.nii "):  # as the files are named
        assert read_sample(manifest, spelt)["key"] == "valid_2_a_1"
    assert got["labels"].tolist() == [255] + [1] * 17
    assert got["meta"]["VolumeName"] == "valid_2_a_1.nii.gz" and got["prompt"] == "p1"
    assert [h["op"] for h in got["volume"].meta["history"]] == [h["op"] for h in records[1]["volume"].meta["history"]]


def test_extract_refuses_a_changed_shard_and_an_unknown_key(shards, tmp_path):
    manifest, _ = shards
    shard = manifest.parent / "valid-000001.tar"
    raw = bytearray(shard.read_bytes())
    raw[700] ^= 0xFF
    shard.write_bytes(bytes(raw))
    res = _cli(manifest, "valid_3_a_1", tmp_path / "x.nii.gz")
    assert res.returncode == 2 and "valid-000001.tar does not match its sha256" in res.stderr
    errors = [line for line in res.stderr.splitlines() if not line.startswith("INFO")]
    assert len(errors) == 1 and "Traceback" not in res.stderr  # one line, no traceback
    assert not (tmp_path / "x.nii.gz").exists()
    with pytest.raises(ShardError, match="no sample 'valid_9_a_1'"):
        read_sample(manifest, "valid_9_a_1")
