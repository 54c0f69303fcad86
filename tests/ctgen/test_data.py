"""The model-side shard reader, the (C, D, H, W) layout and the verify-shards command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ctgen.data.layout import to_model_layout
from ctgen.data.shards import iter_samples, shard_urls, verify_shards_main
from ctprep.shards import merge_manifests, write_shards
from ctprep.volume import Volume


def make_samples(n=5, seed=1):
    """Random int16 volumes on an anisotropic, rotated and i-flipped grid."""
    rng = np.random.default_rng(seed)
    a = np.deg2rad(15.0)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    samples = []
    for i in range(n):
        aff = np.eye(4)
        aff[:3, :3] = rot @ np.diag([-0.7, 0.8, 2.5])
        aff[:3, 3] = (10.0 * i, -50.0, 200.5)
        data = rng.integers(-1024, 3071, size=(5 + i, 4, 3), dtype=np.int16)
        vol = Volume.from_3d(data, aff, source=f"v{i}.nii.gz")
        vol = vol.new_like(vol.array, op="resample", spacing=[0.7, 0.8, 2.5])
        samples.append(
            {
                "key": f"valid_{i}_a_2",
                "volume": vol,
                "prompt": f"prompt {i}",
                "prompts": {"short": f"s{i}", "report": f"Findings {i}. Impression: normal."},
                "meta": {"age": 60 + i, "manufacturer": "Siemens", "kvp": 120.0, "impression": None},
                "labels": rng.integers(0, 2, size=18).astype(np.uint8),
            }
        )
    return samples


def expected_meta(sample):
    vol = sample["volume"]
    meta = {
        **sample["meta"],
        **vol.meta,
        "shape": list(vol.shape),
        "spacing": vol.spacing.tolist(),
        "origin": vol.origin.tolist(),
        "orientation": "".join(vol.orientation),
        "dtype": "int16",
    }
    return json.loads(json.dumps(meta))


@pytest.fixture
def manifest(tmp_path):
    samples = make_samples(5)
    write_shards(samples, tmp_path / "shards", "valid", shard_size=2, split="valid")
    return tmp_path / "shards" / "valid.manifest.json", samples


def test_shard_urls_are_absolute_and_ordered(manifest):
    path, _ = manifest
    urls = shard_urls(path)
    assert [Path(u).name for u in urls] == ["valid-000000.tar", "valid-000001.tar", "valid-000002.tar"]
    assert all(Path(u).is_absolute() and Path(u).is_file() for u in urls)


def test_iter_samples_roundtrip(manifest):
    path, samples = manifest
    got = list(iter_samples(path))
    assert [g["key"] for g in got] == [s["key"] for s in samples]
    for g, s in zip(got, samples):
        vol = s["volume"]
        assert g["volume"].dtype == np.int16 and g["volume"].shape == vol.shape
        assert np.array_equal(g["volume"], vol.data)
        assert g["affine"].shape == (4, 4) and np.array_equal(g["affine"], vol.affine)
        assert g["prompt"] == s["prompt"] and g["prompts"] == s["prompts"]
        assert g["labels"].dtype == np.uint8 and np.array_equal(g["labels"], s["labels"])
        assert g["meta"] == expected_meta(s)
        assert g["meta"]["history"] == [{"op": "resample", "spacing": [0.7, 0.8, 2.5]}]
    # no torch needed anywhere on the read path: block it in a fresh interpreter and read again
    code = ("import sys; sys.modules['torch'] = None\n"
            "from ctgen.data.shards import iter_samples\n"
            f"print(len(list(iter_samples({str(path)!r}))))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(len(samples))


def test_iter_samples_shuffle_is_seeded(manifest):
    path, samples = manifest
    keys = sorted(s["key"] for s in samples)
    a = [g["key"] for g in iter_samples(path, shuffle=True, seed=3)]
    b = [g["key"] for g in iter_samples(path, shuffle=True, seed=3)]
    orders = {tuple(g["key"] for g in iter_samples(path, shuffle=True, seed=s)) for s in range(6)}
    assert a == b and sorted(a) == keys
    assert len(orders) > 1


def test_iter_samples_through_a_merged_manifest(tmp_path):
    samples = make_samples(5)
    write_shards(samples[:2], tmp_path / "c0", "valid-c0", shard_size=2, split="valid")
    write_shards(samples[2:], tmp_path / "c1", "valid-c1", shard_size=2, split="valid")
    out = tmp_path / "merged" / "valid.manifest.json"
    merge_manifests(
        [tmp_path / "c0/valid-c0.manifest.json", tmp_path / "c1/valid-c1.manifest.json"], out, "valid"
    )
    assert shard_urls(out)[0] == str((tmp_path / "c0" / "valid-c0-000000.tar").resolve())
    assert [g["key"] for g in iter_samples(out)] == [s["key"] for s in samples]


def test_iter_samples_of_some_keys_reads_and_decodes_only_theirs(tmp_path, decoded_keys):
    """The figures job wants a few real scans: it decoded every volume of the split on the way to them."""
    samples = make_samples(5)
    write_shards(samples, tmp_path, "valid", shard_size=2, split="valid")  # shards of keys 0-1, 2-3 and 4
    decoded = decoded_keys
    (tmp_path / "valid-000001.tar").unlink()  # the shard of neither wanted key is not opened
    wanted = [samples[4]["key"], samples[0]["key"]]
    got = list(iter_samples(tmp_path / "valid.manifest.json", keys=wanted))
    assert [g["key"] for g in got] == [samples[0]["key"], samples[4]["key"]]  # manifest order
    assert np.array_equal(got[1]["volume"], samples[4]["volume"].data) and len(decoded) == 2
    assert list(iter_samples(tmp_path / "valid.manifest.json", keys=[])) == []


def _flip(shard: Path, member: str, at: int = 0) -> None:
    """Flip byte ``at`` of a member's data in place, from its end where negative (the shard keeps its size: only a
    checksum can tell)."""
    import tarfile

    with tarfile.open(shard) as tf:
        info = tf.getmember(member)
    data = bytearray(shard.read_bytes())
    data[info.offset_data + at % info.size] ^= 0xFF
    shard.write_bytes(bytes(data))


def _rehash(manifest: Path, shard: Path) -> None:
    """The manifest made to agree with the shard's bytes as they are now (a shard written wrong, not changed later)."""
    from ctprep.shards import sha256_file

    meta = json.loads(manifest.read_text())
    for entry in meta["shards"]:
        if entry["file"] == shard.name:
            entry["sha256"] = sha256_file(shard)
    manifest.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", ["voxels", "prompt", "truncated"])
def test_iter_samples_refuses_a_changed_shard_and_names_it(manifest, damage):
    """The volume codec has no checksum: a flipped byte came back as wrong voxels without a word, one in a prompt as
    webdataset's DecodingError with an empty message, a truncated shard as a tarfile ReadError."""
    from ctprep.shards import ShardError

    path, samples = manifest
    shard = path.parent / "valid-000001.tar"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-1536])
    else:
        _flip(shard, f"{samples[2]['key']}.{'vol.b2nd' if damage == 'voxels' else 'prompt.txt'}", at=-1 if damage == "voxels" else 0)
    with pytest.raises(ShardError, match=r"valid-000001\.tar does not match its checksum") as err:
        list(iter_samples(path))
    assert "\n" not in str(err.value)


def test_iter_samples_names_the_shard_sample_and_member_that_do_not_decode(manifest):
    from ctprep.shards import ShardError

    path, samples = manifest
    shard = path.parent / "valid-000001.tar"
    _flip(shard, f"{samples[3]['key']}.prompt.txt")  # no longer UTF-8
    _rehash(path, shard)
    with pytest.raises(ShardError, match=rf"valid-000001\.tar: sample '{samples[3]['key']}', member 'prompt.txt' "
                                         "does not decode: UnicodeDecodeError"):
        list(iter_samples(path))


def test_iter_samples_hashes_each_shard_it_opens_once_and_no_other(manifest, monkeypatch):
    from ctgen.data import shards

    path, samples = manifest
    hashed, sha256_file = [], shards.sha256_file
    monkeypatch.setattr(shards, "sha256_file", lambda p: hashed.append(Path(p).name) or sha256_file(p))
    assert [g["key"] for g in iter_samples(path, keys=[samples[4]["key"], samples[0]["key"]])] == \
        [samples[0]["key"], samples[4]["key"]]
    assert hashed == ["valid-000000.tar", "valid-000002.tar"]
    hashed.clear()
    assert next(iter_samples(path))["key"] == samples[0]["key"]  # a look at one sample hashes its shard, not the split
    assert hashed == ["valid-000000.tar"]


def test_empty_split(tmp_path):
    write_shards([], tmp_path, "test", shard_size=2)
    assert list(iter_samples(tmp_path / "test.manifest.json")) == []


def test_to_model_layout_axes():
    vol = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # (I, J, K)
    out = to_model_layout(vol)
    assert out.shape == (1, 4, 3, 2)  # (C, D=K, H=J, W=I)
    assert out.flags["C_CONTIGUOUS"]
    i, j, k = 1, 2, 3
    assert out[0, k, j, i] == vol[i, j, k]
    with pytest.raises(ValueError):
        to_model_layout(vol[None])


def test_verify_shards_main(manifest, tmp_path, capsys):
    path, _ = manifest
    write_shards(make_samples(2), tmp_path / "t", "train", shard_size=5, split="train")
    train = tmp_path / "t" / "train.manifest.json"
    assert verify_shards_main([str(path), str(train)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["ok"] and report["samples_per_split"] == {"valid": 5, "train": 2} and report["n_samples"] == 7
    )

    shard = tmp_path / "shards" / "valid-000002.tar"
    shard.write_bytes(shard.read_bytes()[:-1024])
    assert verify_shards_main([str(path), str(train)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and report["samples_per_split"] == {"train": 2}
    assert "valid-000002.tar" in report["errors"][str(path)]


def test_hu_unit_maps_on_an_asymmetric_window():
    """Every window of the other tests was [-1000, 1000], where the centre term is 0: a map without it passed."""
    import torch

    from ctgen.data.layout import hu_to_unit, unit_to_hu

    window = (-800.0, 400.0)
    hu = torch.tensor([-3000.0, -800.0, -200.0, 0.0, 400.0, 2000.0])
    unit = hu_to_unit(hu, window)
    expected = (np.clip(hu.numpy(), -800, 400) - (-200.0)) / 600.0  # centre -200, half-width 600
    np.testing.assert_allclose(unit.numpy(), expected, atol=1e-6)
    assert unit[2] == 0.0 and unit[1] == -1.0 and unit[4] == 1.0
    np.testing.assert_allclose(unit_to_hu(unit, window).numpy(), np.clip(hu.numpy(), -800, 400), atol=1e-3)
