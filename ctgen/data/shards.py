"""Model-side reading of the ctprep shards (the layout change to (C, D, H, W) is in ``ctgen.data.layout``).

Samples are read with webdataset's stock reader (``webdataset.WebDataset(...).decode()``), so a
training job can swap in its own pipeline stages (node/worker splitting, batching) unchanged.
webdataset 1.x imports without torch: its ``IterableDataset`` base falls back to a stub class
when torch is absent, so this module needs neither torch nor CUDA.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from ctprep.errors import existing_file
from ctprep.shards import VOLUME_MEMBER, ShardError, load_manifest, verify_manifest, volume_decoder

log = logging.getLogger(__name__)

UNKNOWN_LABEL = 255  # a blank label cell in the dataset: unknown, not negative


def shard_urls(manifest_path: str | os.PathLike, keys: set[str] | None = None) -> list[str]:
    """Absolute paths of the manifest's shards, in manifest order; with ``keys``, only those listing one of them."""
    manifest_path = Path(manifest_path)
    manifest = load_manifest(manifest_path)
    return [str((manifest_path.parent / s["file"]).resolve()) for s in manifest["shards"]
            if keys is None or not keys.isdisjoint(s["keys"])]


def iter_samples(
    manifest_path: str | os.PathLike,
    shuffle: bool = False,
    seed: int = 0,
    buffer: int = 8,
    keys: Collection[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Decoded samples of a manifest's shards, in manifest order unless ``shuffle``.

    Each sample: ``{"key", "volume": (I, J, K) array, "affine": (4, 4), "prompt", "prompts",
    "meta", "labels": (18,) uint8}``. With ``shuffle``, shard order and a ``buffer``-sample
    window are shuffled reproducibly from ``seed``; the buffer holds decoded volumes, so it is
    kept small (a 512x512x300 int16 volume is 150 MB).

    ``keys``: only the samples with these keys. Shards that the manifest lists none of them in are
    not opened, and the other samples of a shard are skipped before their volume is decoded
    (a full-size scan is ~150 MB decoded).
    """
    keys = None if keys is None else set(keys)
    urls = shard_urls(manifest_path, keys)  # the manifest read once
    if not urls:
        return  # an empty split, or no shard holds a wanted key; WebDataset would raise on an empty shard list
    if shuffle:
        random.Random(seed).shuffle(urls)
    # shardshuffle=False: shard order is ours (manifest order, or the seeded shuffle above).
    # nodesplitter=None: every process reads every shard (this reader is for evaluation and inspection)
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None)
    if keys is not None:  # on the raw members, ahead of the decoder
        dataset = dataset.select(lambda sample: sample["__key__"] in keys)
    dataset = dataset.decode(volume_decoder)
    if shuffle and buffer > 1:
        dataset = dataset.shuffle(buffer, initial=buffer, seed=seed)
    for sample in dataset:
        yield {
            "key": sample["__key__"],
            "volume": sample[VOLUME_MEMBER],
            "affine": sample["affine.npy"],
            "prompt": sample["prompt.txt"],
            "prompts": sample["prompts.json"],
            "meta": sample["meta.json"],
            "labels": sample["labels.npy"],
        }


def volume_of(sample: dict[str, Any]) -> np.ndarray:
    """The (I, J, K) HU array of a decoded shard sample (its volume member)."""
    return sample[VOLUME_MEMBER]


def labels_of(sample: dict[str, Any]) -> np.ndarray:
    """The (18,) labels of a raw shard sample as float32: 0, 1, or NaN where unknown (stored as 255)."""
    raw = np.asarray(sample["labels.npy"])
    labels = raw.astype(np.float32)
    if raw.dtype == np.uint8:
        labels[raw == UNKNOWN_LABEL] = np.nan
    return labels


def verify_shards_main(argv: list[str] | None = None) -> int:
    """``ctgen verify-shards MANIFEST...``: verify each manifest and print a JSON summary.

    Exit status 0 when every manifest verifies, 1 otherwise (every manifest is still checked).
    """
    parser = argparse.ArgumentParser(prog="ctgen verify-shards", description=verify_shards_main.__doc__)
    parser.add_argument("manifests", nargs="+", type=existing_file, help="manifest JSON files")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    results, errors = [], {}
    per_split: dict[str, int] = {}
    for path in args.manifests:
        try:
            summary = verify_manifest(path)
        except ShardError as err:
            log.error("%s", err)
            errors[str(path)] = str(err)
            continue
        results.append(summary)
        split = summary["split"] or summary["manifest"]
        per_split[split] = per_split.get(split, 0) + summary["n_samples"]
        log.info("%s: %d samples in %d shards", split, summary["n_samples"], summary["n_shards"])
    report = {
        "ok": not errors,
        "samples_per_split": per_split,
        "n_samples": sum(per_split.values()),
        "manifests": results,
        "errors": errors,
    }
    # The summary is the command's output (for scripts to parse), so it goes to stdout.
    sys.stdout.write(json.dumps(report, indent=1, sort_keys=True) + "\n")
    return 0 if not errors else 1
