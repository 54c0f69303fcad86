"""Shard writing: format, checksums, determinism, atomicity, verification and merging."""

from __future__ import annotations

import hashlib
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds

from ctprep.codec import EncodedVolume, decode_volume, encode_volume
from ctprep.shards import (FORMAT_VERSION, LABEL_UNKNOWN, MEMBERS, ShardError, content_digest, load_manifest,
                           merge_manifests, verify_manifest, volume_decoder, write_shards)
from ctprep.volume import Volume, load_nifti


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
        exts = ["affine.npy", "labels.npy", "meta.json", "prompt.txt", "prompts.json", "vol.b2nd"]
        assert names == [f"{s['key']}.{e}" for s in samples[:2] for e in exts]
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "ctprep", "ctprep")}
        vol = decode_volume(tar.extractfile(f"{samples[1]['key']}.vol.b2nd").read())
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
    got = list(wds.WebDataset(urls, shardshuffle=False).decode(volume_decoder))
    assert [g["__key__"] for g in got] == [s["key"] for s in samples]
    for g, s in zip(got, samples):
        assert g["vol.b2nd"].dtype == np.int16 and np.array_equal(g["vol.b2nd"], s["volume"].data)
        assert g["affine.npy"].dtype == np.float64 and np.array_equal(g["affine.npy"], s["volume"].affine)
        assert g["labels.npy"].dtype == np.uint8 and np.array_equal(g["labels.npy"], s["labels"])
        assert g["prompt.txt"] == s["prompt"] and g["prompts.json"] == s["prompts"]


def test_float_volume_is_rounded_and_clipped_to_int16(tmp_path):
    sample = make_samples(1)[0]
    data = np.array([[[-40000.0, -0.6, 0.4, 1.5, 2.5, 99999.0]]], dtype=np.float32)
    sample["volume"] = Volume.from_3d(data, oblique_affine())
    write_shards([sample], tmp_path, "t", shard_size=4)
    (got,) = list(wds.WebDataset(str(tmp_path / "t-000000.tar"), shardshuffle=False).decode(volume_decoder))
    assert got["vol.b2nd"].dtype == np.int16
    assert got["vol.b2nd"].ravel().tolist() == [-32768, -1, 0, 2, 2, 32767]  # rint: half to even


def test_float32_volume_dtype_is_kept(tmp_path):
    sample = make_samples(1)[0]
    data = np.linspace(-1000.5, 500.25, 24, dtype=np.float32).reshape(2, 3, 4)
    sample["volume"] = Volume.from_3d(data, oblique_affine())
    manifest = write_shards([sample], tmp_path, "t", shard_size=4, volume_dtype="float32")
    (got,) = list(wds.WebDataset(str(tmp_path / "t-000000.tar"), shardshuffle=False).decode(volume_decoder))
    assert manifest["format"]["volume_dtype"] == "float32"
    assert got["vol.b2nd"].dtype == np.float32 and np.array_equal(got["vol.b2nd"], data)


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


# --- format 2: the lossless volume codec, packed payloads, unknown labels, version refusal -------
CT_GRID = {"mode": "spacing", "spacing": [1.1, 0.9, 2.0], "shape": [150, 140, 90], "center": "body",
           "clip": [-1000, 1000], "pad_hu": -1024}


def test_volume_codec_is_lossless_on_real_scans_after_the_preset(real_nifti):
    from ctprep.preprocess import preprocess_volume

    vol = preprocess_volume(load_nifti(real_nifti), None, CT_GRID, {"geometry": "header"})
    enc = encode_volume(vol, "int16")
    got = decode_volume(enc.payload)
    # independent reference: numpy's own rounding of the float grid
    ref = np.clip(np.rint(vol.data), -32768, 32767).astype(np.int16)
    assert got.dtype == np.int16 and got.shape == vol.shape
    assert np.array_equal(got, ref)  # bitwise: every voxel, the padding included
    assert got.tobytes(order="A") == ref.tobytes(order="F")
    assert len(enc.payload) < 0.6 * ref.nbytes  # and it compresses (a body-only crop: the hardest case)
    assert enc.payload == encode_volume(vol, "int16").payload  # deterministic bytes


def test_encoded_payloads_are_packed_as_they_are(tmp_path, monkeypatch):
    import ctprep.shards as shards

    samples = make_samples(3)
    encoded = [{**s, "volume": encode_volume(s["volume"])} for s in samples]
    # packing must not decode or re-encode: both are unavailable while it runs
    monkeypatch.setattr(shards, "encode_volume", lambda *a, **k: pytest.fail("re-encoded"))
    write_shards(encoded, tmp_path / "enc", "t", shard_size=2)
    with tarfile.open(tmp_path / "enc" / "t-000000.tar") as tar:
        assert tar.extractfile(f"{samples[0]['key']}.vol.b2nd").read() == encoded[0]["volume"].payload
    monkeypatch.undo()
    # the same tar bytes as encoding the volumes in the writer
    write_shards(samples, tmp_path / "vol", "t", shard_size=2)
    for name in ("t-000000.tar", "t-000001.tar", "t.manifest.json"):
        assert (tmp_path / "enc" / name).read_bytes() == (tmp_path / "vol" / name).read_bytes()


def test_encoded_payload_that_disagrees_is_refused(tmp_path):
    s = make_samples(1)[0]
    enc = encode_volume(s["volume"])
    wrong_shape = EncodedVolume(enc.payload, enc.affine, (1, 2, 3), enc.dtype, enc.meta)
    with pytest.raises(ShardError, match="shape"):
        write_shards([{**s, "volume": wrong_shape}], tmp_path, "t", shard_size=1)
    with pytest.raises(ShardError, match="encoded volume is int16, the shards store float32"):
        write_shards([{**s, "volume": enc}], tmp_path, "t", shard_size=1, volume_dtype="float32")
    garbage = EncodedVolume(b"not a frame" * 10, enc.affine, enc.shape, enc.dtype, enc.meta)
    with pytest.raises(ShardError, match="not a blosc2 b2nd frame"):
        write_shards([{**s, "volume": garbage}], tmp_path, "t", shard_size=1)


def test_unknown_labels_are_255_and_other_values_are_refused(tmp_path):
    s = make_samples(1)[0]
    labels = np.array([1, 0, np.nan] + [0] * 14 + [1], dtype=np.float64)
    write_shards([{**s, "labels": labels}], tmp_path, "t", shard_size=1)
    (got,) = list(wds.WebDataset(str(tmp_path / "t-000000.tar"), shardshuffle=False).decode(volume_decoder))
    assert got["labels.npy"].dtype == np.uint8
    assert got["labels.npy"].tolist() == [1, 0, LABEL_UNKNOWN] + [0] * 14 + [1]
    assert "255" in MEMBERS["labels.npy"] and load_manifest(tmp_path / "t.manifest.json")["format"]["label_unknown"] == 255
    # None (a blank cell read as an object) is unknown too
    write_shards([{**s, "labels": [None] + [0] * 17}], tmp_path, "t", shard_size=1)
    for bad in ([2] + [0] * 17, [0.5] + [0] * 17, [-1] + [0] * 17, [255] + [0] * 17):
        with pytest.raises(ShardError, match="0, 1 or NaN"):
            write_shards([{**s, "labels": bad}], tmp_path, "t", shard_size=1)


def test_manifest_of_another_format_version_is_refused_with_a_clear_message(tmp_path):
    write_shards(make_samples(1), tmp_path, "t", shard_size=1)
    mpath = tmp_path / "t.manifest.json"
    manifest = json.loads(mpath.read_text())
    assert manifest["format"]["version"] == FORMAT_VERSION == 2
    assert manifest["format"]["volume_codec"]["container"] == "b2nd"
    manifest["format"]["version"] = 1
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"t\.manifest\.json: shard format version 1, this ctprep reads version 2"):
        verify_manifest(mpath)


def test_cheap_verification_checks_sizes_and_indexes_but_not_bytes(tmp_path):
    write_shards(make_samples(4), tmp_path, "train", shard_size=2, split="train")
    mpath = tmp_path / "train.manifest.json"
    assert verify_manifest(mpath, checksums=False)["checksums"] is False
    shard = tmp_path / "train-000001.tar"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # same size, changed bytes: only the full check sees it
    shard.write_bytes(bytes(raw))
    assert verify_manifest(mpath, checksums=False)["n_samples"] == 4
    with pytest.raises(ShardError, match=r"shard train-000001\.tar sha256 .*refusing it"):
        verify_manifest(mpath)
    shard.write_bytes(bytes(raw) + b"\0" * 512)
    with pytest.raises(ShardError, match=r"shard train-000001\.tar has .* bytes"):
        verify_manifest(mpath, checksums=False)


def test_prep_and_shard_chunk_pack_the_prepared_payloads_as_they_are(tmp_path, data_dir):
    """The chain the workflow runs: prep encodes each real scan once, shards copies those bytes;
    a blank label cell becomes 255 in labels.npy and null in the meta."""
    import pandas as pd

    from ctprep import ctrate
    from ctprep.chunks import prep_chunk, shard_chunk
    from ctprep.cohort import SECTIONS
    from ctprep.preprocess import preprocess_volume

    rows, prompts = [], []
    for n, name in enumerate(["pulmonary_report_ct_cropped.nii.gz", "example_ct_sm.nii.gz"], start=1):
        vname = f"train_{n}_a_1.nii.gz"
        labels = {lab: float(i % 2) for i, lab in enumerate(ctrate.LABELS)}
        labels[ctrate.LABELS[2]] = np.nan
        rows.append({"VolumeName": vname, "split": "train", "patient": f"train_{n}", "path": str(data_dir / name),
                     "chunk": 0, "sex": "male", "age": 50 + n, **{v: f"{v} {n}" for v in SECTIONS.values()}, **labels})
        # the second volume lacks a field of the "short" template: the prompts rule left its cell empty
        prompts.append({"VolumeName": vname, "split": "train", "short": f"prompt {n}" if n == 1 else None,
                        "structured": f"finding {n}"})
    pd.DataFrame(rows).to_parquet(tmp_path / "cohort.parquet")
    pd.DataFrame(prompts).to_parquet(tmp_path / "prompts.parquet")
    preset = {"mode": "spacing", "spacing": [4.0, 4.0, 6.0], "shape": [48, 40, 32], "clip": [-1000, 1000]}
    prep_chunk(tmp_path / "cohort.parquet", 0, preset, {"geometry": "header"}, tmp_path / "prep",
                       tmp_path / "prep.parquet", tmp_path / "rejects.parquet")
    assert sorted(p.name for p in (tmp_path / "prep").iterdir()) == ["train_1_a_1.b2nd", "train_2_a_1.b2nd"]
    manifest = shard_chunk(tmp_path / "prep.parquet", tmp_path / "cohort.parquet", tmp_path / "prompts.parquet",
                           "train", 0, tmp_path / "shards", shard_size=8, prompt_key="short")
    assert manifest["n_samples"] == 2 and verify_manifest(tmp_path / "shards/train-c000.manifest.json")
    got = list(wds.WebDataset(str(tmp_path / "shards/train-c000-000000.tar"), shardshuffle=False).decode(volume_decoder))
    with tarfile.open(tmp_path / "shards/train-c000-000000.tar") as tar:
        for row, g in zip(rows, got):
            key = g["__key__"]
            assert key == row["VolumeName"].split(".nii")[0]
            assert tar.extractfile(f"{key}.vol.b2nd").read() == (tmp_path / "prep" / f"{key}.b2nd").read_bytes()
            # what prep stored is the preset's HU of the scan, rounded, with its affine
            ref = preprocess_volume(load_nifti(row["path"]), None, preset, {"geometry": "header"})
            assert g["vol.b2nd"].dtype == np.int16 and np.array_equal(g["vol.b2nd"], np.rint(ref.data).astype(np.int16))
            np.testing.assert_array_equal(g["affine.npy"], ref.affine)
            assert g["labels.npy"].tolist() == [0, 1, LABEL_UNKNOWN] + [i % 2 for i in range(3, 18)]
            assert g["meta.json"]["labels"][ctrate.LABELS[2]] is None
            assert g["meta.json"]["source"] == row["path"] and g["meta.json"]["dtype"] == "int16"
            assert [h["op"] for h in g["meta.json"]["history"]][-2:] == ["resample", "clip"]
    # an empty cell is left out of prompts.json, and the main prompt falls back to the structured prompt
    assert [g["prompts.json"] for g in got] == [{"short": "prompt 1", "structured": "finding 1"},
                                                {"structured": "finding 2"}]
    assert [g["prompt.txt"] for g in got] == ["prompt 1", "finding 2"]
    # with no prompt to fall back to, a one-line error before anything is written
    pd.DataFrame(prompts).drop(columns="structured").to_parquet(tmp_path / "prompts.parquet")
    with pytest.raises(ValueError, match=r"1 volume\(s\) have no 'short' prompt \(first: train_2_a_1.nii.gz\)"):
        shard_chunk(tmp_path / "prep.parquet", tmp_path / "cohort.parquet", tmp_path / "prompts.parquet",
                    "train", 0, tmp_path / "shards2", shard_size=8, prompt_key="short")
    assert not (tmp_path / "shards2").exists()
    # a chunk without a volume of the split: an empty manifest (pandas 3 kept the empty check's string dtype, and ~
    # on it failed every such chunk of the demo)
    pd.DataFrame(prompts).to_parquet(tmp_path / "prompts.parquet")
    assert shard_chunk(tmp_path / "prep.parquet", tmp_path / "cohort.parquet", tmp_path / "prompts.parquet",
                       "valid", 0, tmp_path / "shards3", shard_size=8, prompt_key="short")["n_samples"] == 0


def test_a_malformed_manifest_is_named_and_the_others_are_still_checked(tmp_path, capsys):
    """A manifest with a shard lacking its sha256 stopped `verify-shards` with a KeyError before the next one."""
    import json as _json

    from ctgen.data.shards import verify_shards_main

    write_shards(make_samples(), tmp_path, "train", shard_size=2, split="train")
    good = tmp_path / "train.manifest.json"
    bad = _json.loads(good.read_text())
    del bad["shards"][0]["sha256"]
    (tmp_path / "bad.json").write_text(_json.dumps(bad))
    code = verify_shards_main([str(tmp_path / "bad.json"), str(good)])
    report = _json.loads(capsys.readouterr().out)
    assert code == 1 and report["errors"] == {str(tmp_path / "bad.json"): "bad.json: malformed manifest (missing or "
                                                                            "wrong 'sha256')"}
    assert report["n_samples"] == 5  # the good one was still checked


def test_tree_digest_sees_past_a_broken_link_and_not_file_dates(tmp_path):
    """A dangling link's stat ended the walk of its folder (a new volume there changed nothing). File dates are not
    digested: a copy of the dataset to another disk would rerun the cohort and everything after it."""
    import os

    from ctprep.shards import tree_digest

    d = tmp_path / "train_fixed" / "train_1" / "train_1_a"
    d.mkdir(parents=True)
    (d / "train_1_a_0.nii.gz").symlink_to(tmp_path / "nowhere")
    (d / "train_1_a_1.nii.gz").write_bytes(b"abc")

    def digest():
        return tree_digest(tmp_path, ["train_fixed"], (".nii.gz",))

    before = digest()
    (d / "train_1_a_2.nii.gz").write_bytes(b"abcd")
    added = digest()
    assert added != before
    os.utime(d / "train_1_a_1.nii.gz", ns=(1, 10**18))  # re-dated (a copy): the same digest
    assert digest() == added
    (d / "train_1_a_1.nii.gz").write_bytes(b"wxyz")  # replaced by another size
    assert digest() != added
    replaced = digest()
    (d / "._train_1_a_1.nii.gz").write_bytes(b"\0" * 4096)  # a macOS companion file is no volume
    assert digest() == replaced


def test_member_digests_tell_what_changed_and_content_digest_weighs_only_the_members_read(tmp_path):
    """Each shard records a sha256 per member kind (recomputed here from the tar's members, by key and length);
    shards written again with other prompts keep the volumes' digest, other labels change the labels' digest, and
    another shard size (another sample order) every digest; the tar checksums change in every case."""
    def written(name, samples, size=2):
        write_shards(samples, tmp_path / name, "train", shard_size=size, split="train")
        return tmp_path / name / "train.manifest.json"

    base = written("base", make_samples(5))
    manifest = load_manifest(base)
    for shard in manifest["shards"]:
        recomputed = {}
        with tarfile.open(base.parent / shard["file"]) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                recomputed.setdefault(ext, hashlib.sha256()).update(f"{key}\0{len(data)}\0".encode() + data)
        assert shard["member_sha256"] == {ext: h.hexdigest() for ext, h in recomputed.items()}
        assert set(shard["member_sha256"]) == set(MEMBERS)

    prompts = [{**s, "prompt": s["prompt"] + " Corrected.", "prompts": {"findings": "other"}} for s in make_samples(5)]
    labels = make_samples(5)
    labels[3]["labels"] = 1 - labels[3]["labels"]
    reprompted, relabelled, resized = written("prompts", prompts), written("labels", labels), written("size", make_samples(5), 3)
    vol, both = ("vol.b2nd",), ("vol.b2nd", "labels.npy")
    digest = {p: (content_digest([p], vol), content_digest([p], both)) for p in (base, reprompted, relabelled, resized)}
    assert digest[reprompted] == digest[base]
    assert digest[relabelled][0] == digest[base][0] and digest[relabelled][1] != digest[base][1]
    assert digest[resized][0] != digest[base][0] and digest[resized][1] != digest[base][1]
    assert len({json.dumps(load_manifest(p)["shards"][1]["sha256"]) for p in (base, reprompted, relabelled)}) == 3
    # the shards' files and paths are not in it (a moved results folder retrains nothing); manifest order is
    moved = tmp_path / "moved"
    (base.parent).rename(moved)
    assert content_digest([moved / "train.manifest.json"], vol) == digest[base][0]
    assert content_digest([moved / "train.manifest.json", resized], vol) != content_digest(
        [resized, moved / "train.manifest.json"], vol)
    # nothing written yet: ""; a manifest from before member digests: its file's sha256, so anything counts
    assert content_digest([tmp_path / "none.json", relabelled], vol) == ""
    old = json.loads(relabelled.read_text())
    for shard in old["shards"]:
        del shard["member_sha256"]
    legacy = tmp_path / "legacy.json"
    legacy.write_text(json.dumps(old))
    first = content_digest([legacy], vol)
    old["shards"][0]["sha256"] = "0" * 64
    legacy.write_text(json.dumps(old) + " ")  # another size: no stale cached answer
    assert first not in ("", content_digest([legacy], vol))
