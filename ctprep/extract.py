"""One prepared volume back out of the shards: as arrays, or as a NIfTI file with its affine.

``ctprep extract MANIFEST KEY OUT.nii.gz`` uses it; it reads only the one shard that holds the
key (found in the manifest), after checking that shard's sha256.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from ctprep import ctrate
from ctprep.codec import decode_volume
from ctprep.shards import VOLUME_MEMBER, ShardError, load_manifest, sha256_file
from ctprep.volume import Volume, save_nifti


def read_sample(manifest_path: str | os.PathLike, key: str, check: bool = True) -> dict[str, Any]:
    """One sample of a manifest, decoded: ``{"key", "volume": Volume, "labels", "prompt", "prompts", "meta"}``.

    ``key`` is a sample key or a CT-RATE ``VolumeName`` (``train_1_a_1.nii.gz``), also as its file is named
    (``train_1_a_1_fixed.nii.gz``): the cohort keys every volume by :func:`ctrate.volume_name`, and so does this.
    With ``check`` the shard holding it is hashed against the manifest first (a refused shard is named).
    """
    manifest_path = Path(manifest_path)
    manifest = load_manifest(manifest_path)
    key = ctrate.volume_key(ctrate.volume_name(key))
    shard = next((s for s in manifest["shards"] if key in s["keys"]), None)
    if shard is None:
        raise ShardError(f"{manifest_path.name}: no sample {key!r} in {manifest['n_samples']} samples")
    shard_path = manifest_path.parent / shard["file"]
    if check and sha256_file(shard_path) != shard["sha256"]:
        raise ShardError(f"{manifest_path.name}: shard {shard['file']} does not match its sha256: refusing it")
    members = {}
    with tarfile.open(shard_path, "r:") as tar:
        for ext in manifest["format"]["members"]:
            try:
                members[ext] = tar.extractfile(f"{key}.{ext}").read()
            except KeyError as err:
                raise ShardError(f"{shard['file']}: {key} has no member {ext}") from err
    meta = json.loads(members["meta.json"])
    affine = np.load(io.BytesIO(members["affine.npy"]), allow_pickle=False)
    data = decode_volume(members[VOLUME_MEMBER])
    if list(data.shape) != meta["shape"] or data.dtype.name != meta["dtype"]:
        raise ShardError(f"{shard['file']}: {key} decodes to {data.dtype} {data.shape}, meta says {meta['dtype']} {meta['shape']}")
    return {
        "key": key,
        "volume": Volume.from_3d(data, affine, **{k: v for k, v in meta.items() if k in ("source", "history", "space")}),
        "labels": np.load(io.BytesIO(members["labels.npy"]), allow_pickle=False),
        "prompt": members["prompt.txt"].decode(),
        "prompts": json.loads(members["prompts.json"]),
        "meta": meta,
    }


def extract_nifti(manifest_path: str | os.PathLike, key: str, out: str | os.PathLike, check: bool = True) -> Volume:
    """Write one prepared volume of the shards as NIfTI (stored dtype, its affine as qform and sform)."""
    sample = read_sample(manifest_path, key, check)
    vol = sample["volume"]
    save_nifti(vol, out, dtype=vol.data.dtype, descrip=f"ctprep shard {sample['key']} HU")
    return vol
