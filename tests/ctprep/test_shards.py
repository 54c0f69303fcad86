"""Shard writing: format, checksums, determinism, atomicity, verification and merging."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds

from ctprep.shards import MEMBERS, ShardError, merge_manifests, verify_manifest, write_shards
from ctprep.volume import Volume


def oblique_affine(spacing=(0.7, 0.8, 2.5), angle_deg=20.0, origin=(-120.0, 35.5, -410.25)):
    """Anisotropic, rotated about z, with i flipped (so the orientation is not RAS)."""
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-spacing[0], spacing[1], spacing[2]])
    aff[:3, 3] = origin
    return aff


def make_samples(n=5, seed=0, prefix="train"):
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        shape = (6 + i, 5, 4 + (i % 2))
        data = rng.integers(-1024, 3000, size=shape, dtype=np.int16)
        vol = Volume.from_3d(data, oblique_affine(origin=(-120.0 + i, 35.5, -410.25)), source=f"{i}.nii.gz")
        vol = vol.new_like(vol.array, op="clip_hu", lo=-1024, hi=3000)
        samples.append(
            {
                "key": f"{prefix}_{i}_a_1",
                "volume": vol,
                "prompt": f"Chest CT {i}: no acute findings. Åke's scan",  # non-ASCII survives
                "prompts": {"findings": f"findings {i}", "impression": f"impression {i}"},
                "meta": {"age": 40 + i, "sex": "F" if i % 2 else "M", "findings": "clear lungs"},
                "labels": (np.arange(18) % (i + 2) == 0).astype(np.uint8),
            }
        )
    return samples


def test_write_shards_layout_manifest_and_checksums(tmp_path):
    samples = make_samples(5)
    manifest = write_shards(samples, tmp_path, "train", shard_size=2, split="train")

    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "train.manifest.json"]
    assert json.loads((tmp_path / "train.manifest.json").read_text()) == manifest
    assert manifest["split"] == "train" and manifest["n_samples"] == 5 and manifest["n_shards"] == 3
    assert [s["n_samples"] for s in manifest["shards"]] == [2, 2, 1]
    assert [k for s in manifest["shards"] for k in s["keys"]] == [s["key"] for s in samples]
    for shard in manifest["shards"]:
        raw = (tmp_path / shard["file"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(raw).hexdigest()
        assert shard["bytes"] == len(raw)
    assert manifest["format"]["volume_dtype"] == "int16"
    assert set(manifest["format"]["members"]) == set(MEMBERS)
    assert manifest["created_by"].startswith("ctprep ")


def test_tar_is_plain_tarfile_with_expected_members(tmp_path):
    samples = make_samples(3)
    write_shards(samples, tmp_path, "val", shard_size=2)
    with tarfile.open(tmp_path / "val-000000.tar") as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        exts = ["affine.npy", "labels.npy", "meta.json", "prompt.txt", "prompts.json", "vol.npy"]
        assert names == [f"{s['key']}.{e}" for s in samples[:2] for e in exts]
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "ctprep", "ctprep")}
        vol = np.load(io.BytesIO(tar.extractfile(f"{samples[1]['key']}.vol.npy").read()))
        meta = json.loads(tar.extractfile(f"{samples[1]['key']}.meta.json").read())
    v = samples[1]["volume"]
    assert vol.dtype == np.int16 and np.array_equal(vol, v.data)
    assert meta["shape"] == list(v.shape) and meta["dtype"] == "int16"
    assert meta["spacing"] == pytest.approx([0.7, 0.8, 2.5])
    assert meta["origin"] == v.origin.tolist()
    assert meta["orientation"] == "".join(v.orientation) != "RAS"  # the flip is recorded
    assert meta["history"] == [{"op": "clip_hu", "lo": -1024, "hi": 3000}]
    assert meta["age"] == 41 and meta["source"] == "1.nii.gz"


def test_stock_webdataset_reader_roundtrip(tmp_path):
    samples = make_samples(5)
    write_shards(samples, tmp_path, "train", shard_size=2)
    urls = [str(p) for p in sorted(tmp_path.glob("train-*.tar"))]
    got = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert [g["__key__"] for g in got] == [s["key"] for s in samples]
    for g, s in zip(got, samples):
        assert g["vol.npy"].dtype == np.int16 and np.array_equal(g["vol.npy"], s["volume"].data)
        assert g["affine.npy"].dtype == np.float64 and np.array_equal(g["affine.npy"], s["volume"].affine)
        assert g["labels.npy"].dtype == np.uint8 and np.array_equal(g["labels.npy"], s["labels"])
        assert g["prompt.txt"] == s["prompt"] and g["prompts.json"] == s["prompts"]


def test_float_volume_is_rounded_and_clipped_to_int16(tmp_path):
    sample = make_samples(1)[0]
    data = np.array([[[-40000.0, -0.6, 0.4, 1.5, 2.5, 99999.0]]], dtype=np.float32)
    sample["volume"] = Volume.from_3d(data, oblique_affine())
    write_shards([sample], tmp_path, "t", shard_size=4)
    (got,) = list(wds.WebDataset(str(tmp_path / "t-000000.tar"), shardshuffle=False).decode())
    assert got["vol.npy"].dtype == np.int16
    assert got["vol.npy"].ravel().tolist() == [-32768, -1, 0, 2, 2, 32767]  # rint: half to even


def test_float32_volume_dtype_is_kept(tmp_path):
    sample = make_samples(1)[0]
    data = np.linspace(-1000.5, 500.25, 24, dtype=np.float32).reshape(2, 3, 4)
    sample["volume"] = Volume.from_3d(data, oblique_affine())
    manifest = write_shards([sample], tmp_path, "t", shard_size=4, volume_dtype="float32")
    (got,) = list(wds.WebDataset(str(tmp_path / "t-000000.tar"), shardshuffle=False).decode())
    assert manifest["format"]["volume_dtype"] == "float32"
    assert got["vol.npy"].dtype == np.float32 and np.array_equal(got["vol.npy"], data)


def test_deterministic_bytes(tmp_path):
    m1 = write_shards(make_samples(5), tmp_path / "a", "train", shard_size=2)
    m2 = write_shards(make_samples(5), tmp_path / "b", "train", shard_size=2)
    assert m1 == m2
    for name in ["train-000000.tar", "train-000001.tar", "train-000002.tar", "train.manifest.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_crash_between_shards_leaves_only_complete_shards_and_no_manifest(tmp_path):
    def crashing():
        for i, s in enumerate(make_samples(5)):
            if i == 3:
                raise RuntimeError("killed")
            yield s

    with pytest.raises(RuntimeError, match="killed"):
        write_shards(crashing(), tmp_path, "train", shard_size=2)
    # shard 0 is complete; the third sample never reached a finished shard
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        assert len(tar.getnames()) == 2 * len(MEMBERS)

    manifest = write_shards(make_samples(5), tmp_path, "train", shard_size=2)
    assert manifest["n_samples"] == 5
    verify_manifest(tmp_path / "train.manifest.json")


def test_crash_inside_a_shard_leaves_no_tar_and_removes_old_outputs(tmp_path, monkeypatch):
    # a previous complete run, plus a temporary left by a SIGKILLed one
    write_shards(make_samples(5), tmp_path, "train", shard_size=1)
    (tmp_path / ".train-000001.tar.k1ll3d.part").write_bytes(b"half a shard")
    other = write_shards(make_samples(2, prefix="other"), tmp_path, "train-c001", shard_size=2)

    real_write = wds.TarWriter.write
    calls = {"n": 0}

    def dying_write(self, obj):
        calls["n"] += 1
        if calls["n"] == 2:  # second sample of the first shard: the tar is half written
            raise OSError("disk full")
        return real_write(self, obj)

    monkeypatch.setattr(wds.TarWriter, "write", dying_write)
    with pytest.raises(OSError, match="disk full"):
        write_shards(make_samples(5), tmp_path, "train", shard_size=2)
    # the old run's shards, manifest and temporaries are gone; no half tar under any name;
    # the other prefix's files are untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "train-c001-000000.tar",
        "train-c001.manifest.json",
    ]
    assert verify_manifest(tmp_path / "train-c001.manifest.json")["n_samples"] == other["n_samples"]

    monkeypatch.setattr(wds.TarWriter, "write", real_write)
    write_shards(make_samples(5), tmp_path, "train", shard_size=2)
    assert verify_manifest(tmp_path / "train.manifest.json")["n_samples"] == 5
    assert not list(tmp_path.glob("*.part"))


def test_verify_catches_flipped_byte_missing_shard_and_wrong_keys(tmp_path):
    write_shards(make_samples(5), tmp_path, "train", shard_size=2, split="train")
    mpath = tmp_path / "train.manifest.json"
    summary = verify_manifest(mpath)
    assert summary["n_samples"] == 5 and summary["n_shards"] == 3 and summary["split"] == "train"

    shard = tmp_path / "train-000001.tar"
    good = shard.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    shard.write_bytes(bytes(bad))
    with pytest.raises(ShardError, match=r"train-000001\.tar sha256"):
        verify_manifest(mpath)
    shard.write_bytes(good)

    manifest = json.loads(mpath.read_text())
    manifest["shards"][0]["keys"][1] = "train_99_a_1"
    (tmp_path / "edited.manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"train-000000\.tar keys"):
        verify_manifest(tmp_path / "edited.manifest.json")

    (tmp_path / "train-000002.tar").unlink()
    with pytest.raises(ShardError, match=r"train-000002\.tar is missing"):
        verify_manifest(mpath)


def test_bad_samples_are_refused(tmp_path):
    s = make_samples(1)[0]
    with pytest.raises(ShardError, match="no dots"):
        write_shards([{**s, "key": "train_1_a_1.nii"}], tmp_path, "t", shard_size=1)
    with pytest.raises(ShardError, match="shape"):
        write_shards([{**s, "labels": np.zeros(17, np.uint8)}], tmp_path, "t", shard_size=1)
    with pytest.raises(ShardError, match="duplicate"):
        write_shards([s, s], tmp_path, "t", shard_size=5)
    assert not (tmp_path / "t.manifest.json").exists()


def test_merge_manifests(tmp_path):
    samples = make_samples(5)
    write_shards(samples[:3], tmp_path / "chunks" / "c000", "train-c000", shard_size=2, split="train")
    write_shards(samples[3:], tmp_path / "chunks" / "c001", "train-c001", shard_size=2, split="train")
    chunk_manifests = [
        tmp_path / "chunks" / "c001" / "train-c001.manifest.json",
        tmp_path / "chunks" / "c000" / "train-c000.manifest.json",
    ]
    out = tmp_path / "train.manifest.json"
    merged = merge_manifests(chunk_manifests, out, "train")
    assert merged["split"] == "train" and merged["n_samples"] == 5 and merged["n_shards"] == 3
    assert [s["file"] for s in merged["shards"]] == [
        "chunks/c000/train-c000-000000.tar",
        "chunks/c000/train-c000-000001.tar",
        "chunks/c001/train-c001-000000.tar",
    ]
    assert [k for s in merged["shards"] for k in s["keys"]] == [s["key"] for s in samples]
    assert verify_manifest(out)["n_samples"] == 5

    # input order does not matter
    first = out.read_bytes()
    merge_manifests(chunk_manifests[::-1], out, "train")
    assert out.read_bytes() == first

    # the same keys in two chunks are refused
    write_shards(samples[:1], tmp_path / "chunks" / "dup", "train-dup", shard_size=2, split="train")
    with pytest.raises(ShardError, match="train_0_a_1"):
        merge_manifests([*chunk_manifests, tmp_path / "chunks/dup/train-dup.manifest.json"], out, "train")
    # a chunk of another split is refused
    write_shards(samples[:1], tmp_path / "chunks" / "v", "valid-c000", shard_size=2, split="valid")
    with pytest.raises(ShardError, match="split"):
        merge_manifests([tmp_path / "chunks/v/valid-c000.manifest.json"], tmp_path / "x.json", "train")
