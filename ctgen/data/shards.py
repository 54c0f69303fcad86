"""Model-side reading of the ctprep shards (the layout change to (C, D, H, W) is in ``ctgen.data.layout``).

Samples are read with webdataset's stock stages (``tarfile_to_samples``, ``select``, ``decode``,
``shuffle`` in a ``DataPipeline``), behind one of ours on the shard list: each shard is hashed against
its manifest as the reader reaches it (the volume codec has no checksum: a flipped byte decoded to
wrong voxels without a word), and a failing read raises :class:`ShardError` naming the shard and sample.
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
from ctprep.shards import VOLUME_MEMBER, ShardError, load_manifest, sha256_file, verify_manifest, volume_decoder

log = logging.getLogger(__name__)

UNKNOWN_LABEL = 255  # a blank label cell in the dataset: unknown, not negative


def shard_urls(manifest_path: str | os.PathLike, keys: set[str] | None = None) -> list[str]:
    """Absolute paths of the manifest's shards, in manifest order; with ``keys``, only those listing one of them."""
    return list(_listed(manifest_path, keys))


def _listed(manifest_path: str | os.PathLike, keys: set[str] | None = None) -> dict[str, str]:
    """{absolute shard path: its sha256} of :func:`shard_urls`."""
    manifest_path = Path(manifest_path)
    manifest = load_manifest(manifest_path)
    return {str((manifest_path.parent / s["file"]).resolve()): s["sha256"] for s in manifest["shards"]
            if keys is None or not keys.isdisjoint(s["keys"])}


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
    checksums = _listed(manifest_path, keys)  # the manifest read once
    urls = list(checksums)
    if not urls:
        return  # an empty split, or no shard holds a wanted key; webdataset would raise on an empty shard list
    if shuffle:
        random.Random(seed).shuffle(urls)
    where: dict[str, str | None] = {"url": urls[0], "key": None}

    def hashed(src):
        """Each shard hashed as the reader reaches it (once: the whole file; a shard never reached is not read)."""
        for item in src:
            where["url"], where["key"] = item["url"], None
            if sha256_file(item["url"]) != checksums[item["url"]]:
                raise ShardError(f"{item['url']} does not match its checksum in {manifest_path}: the file changed "
                                 "after it was written (re-create the shards, or restore the file)")
            yield item

    def noted(sample):
        where["key"] = sample["__key__"]
        return sample

    # shard order is ours (manifest order, or the seeded shuffle above), and every process reads every shard (no node
    # or worker split: this reader is for evaluation and inspection)
    stages = [wds.SimpleShardList(urls), hashed, wds.tarfile_to_samples(), wds.map(noted)]
    if keys is not None:  # on the raw members, ahead of the decoder
        stages.append(wds.select(lambda sample: sample["__key__"] in keys))
    stages.append(wds.decode(volume_decoder))
    if shuffle and buffer > 1:
        stages.append(wds.shuffle(buffer, initial=buffer, seed=seed))
    samples = iter(wds.DataPipeline(*stages))
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            return
        except ShardError:
            raise
        except wds.autodecode.DecodingError as err:  # its own message is empty: the cause is the one to tell
            cause = err.__cause__
            raise ShardError(f"{err.url}: sample {err.key!r}, member {err.k!r} does not decode: "
                             f"{type(cause).__name__}: {cause}") from err
        except Exception as err:  # a read failure of the tar itself (the file went after it was hashed)
            after = f"after sample {where['key']!r}" if where["key"] else "at its start"
            raise ShardError(f"{where['url']}: reading failed {after}: {type(err).__name__}: {err}") from err
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
