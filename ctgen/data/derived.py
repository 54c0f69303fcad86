"""Derived shards: what a trained network computes from every volume (token grids, reconstructions,
latents), written by chunk jobs beside the volume shards, with the same keys per shard.

A derived shard set mirrors its source: shard ``i`` holds the samples of source shard ``i``, in the
same order, so a training job can read a volume and its derived sample together (the stream's
parallel shard sets) and a chunk job's output depends on its chunk alone. Its manifest has the
source manifest's schema (file, keys, n_samples, bytes, sha256 per shard) plus ``kind``, the
producing model's weight hash (``producer``) and the source shards' sha256 (``source``), so a cache
made by another network, or from other volumes, is refused by name.

Tars are written with webdataset's ``TarWriter`` with a fixed mtime, owner and mode, so the same
inputs give byte-identical shards.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from ctprep.shards import ShardError, sha256_file
from ctprep.volume import atomic_write

log = logging.getLogger(__name__)

FORMAT = "ctgen.derived/1"


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _encode(value: Any) -> bytes:
    if isinstance(value, np.ndarray):
        return _npy(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")


def write_derived(source_manifest: str | os.PathLike, samples: Iterable[dict[str, Any]], out_dir: str | os.PathLike,
                  kind: str, producer: str, members: dict[str, str], stats: Callable[[], dict] | None = None,
                  describe: dict[str, Any] | None = None) -> Path:
    """Write the derived shards of one source (chunk) manifest and their manifest; returns the manifest path.

    ``samples``: dicts ``{"__key__": key, "<name>.npy": array, "<name>.json": data, "<name>.txt": text}`` in the
    source's sample order (every key of every source shard, exactly once). ``members`` documents each
    member (written into the manifest). The manifest is written last, atomically: a killed job leaves none.
    ``stats``: called after the last sample; its dict of additive sums (e.g. latent moments) goes into the
    manifest and is summed over chunks by :func:`merge_derived`. ``describe``: more about the members that a
    reader checks (token shards: the tokenizer's ``codebook_size``), written into the manifest's ``format``.
    """
    from ctprep.shards import load_manifest

    source_path = Path(source_manifest)
    source = load_manifest(source_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    it = iter(samples)
    shards = []
    for s in source["shards"]:
        name = Path(s["file"]).name.replace(".tar", f".{kind}.tar")
        path = out_dir / name
        part = path.with_suffix(".tar.part")
        with open(part, "wb") as fh:
            writer = wds.TarWriter(fh, user="ctgen", group="ctgen", mode=0o444, mtime=0.0)
            for key in s["keys"]:
                sample = next(it, None)
                if sample is None or sample["__key__"] != key:
                    got = None if sample is None else sample["__key__"]
                    raise ShardError(f"{source_path}: derived samples out of step at {key!r} (got {got!r})")
                writer.write({"__key__": key, **{k: _encode(v) for k, v in sample.items() if k != "__key__"}})
            writer.close()
        os.replace(part, path)
        shards.append({"file": name, "keys": list(s["keys"]), "n_samples": len(s["keys"]),
                       "bytes": path.stat().st_size, "sha256": sha256_file(path), "source_sha256": s["sha256"]})
    if next(it, None) is not None:
        raise ShardError(f"{source_path}: more derived samples than the source has")
    fmt = {"kind": kind, "version": FORMAT, "members": members, **(describe or {})}
    manifest = {"format": fmt, "producer": producer,
                "source": {"manifest": source_path.name, "split": source.get("split")},
                "n_samples": sum(s["n_samples"] for s in shards), "n_shards": len(shards), "shards": shards}
    if stats is not None:
        manifest["stats"] = stats()
    stem = source_path.name[:-len(".manifest.json")] if source_path.name.endswith(".manifest.json") else source_path.stem
    out = out_dir / f"{stem}.{kind}.manifest.json"
    atomic_write(out, lambda p: Path(p).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n"))
    log.info("wrote %d %s shards (%d samples) for %s", len(shards), kind, manifest["n_samples"], source_path)
    return out


def load_derived(path: str | os.PathLike) -> dict[str, Any]:
    """A derived manifest; a file of another format is refused by name."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: no such derived-shard manifest")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardError(f"unreadable manifest {path}: {err}") from err
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if not isinstance(fmt, dict) or fmt.get("version") != FORMAT:
        raise ShardError(f"{path} is not a {FORMAT} manifest")
    return meta


def is_derived(path: str | os.PathLike) -> bool:
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    fmt = meta.get("format") if isinstance(meta, dict) else None
    return isinstance(fmt, dict) and fmt.get("version") == FORMAT


def merge_derived(paths: list[str | os.PathLike], out_path: str | os.PathLike) -> dict[str, Any]:
    """One manifest over the chunk manifests ``paths`` (same kind and producer), shard files relative to it."""
    out_path = Path(out_path)
    metas = [(Path(p), load_derived(p)) for p in sorted(map(str, paths))]
    if not metas:
        raise ShardError(f"no derived manifests to merge into {out_path}")
    kinds = {(m["format"]["kind"], m["producer"]) for _, m in metas}
    if len(kinds) != 1:
        raise ShardError(f"cannot merge derived shards of different kinds or networks: {sorted(kinds)}")
    shards = []
    for p, m in metas:
        rel = os.path.relpath(p.parent, out_path.parent)
        shards += [{**s, "file": os.path.join(rel, s["file"])} for s in m["shards"]]
    first = metas[0][1]
    merged = {"format": first["format"], "producer": first["producer"],
              "source": {"manifests": [m["source"]["manifest"] for _, m in metas], "split": first["source"].get("split")},
              "n_samples": sum(s["n_samples"] for s in shards), "n_shards": len(shards), "shards": shards}
    if all("stats" in m for _, m in metas):  # additive sums: the whole split's from its chunks'
        merged["stats"] = {k: sum(m["stats"][k] for _, m in metas) for k in first["stats"]}
    atomic_write(out_path, lambda p: Path(p).write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n"))
    return merged


def producer_of(manifests: list[str | os.PathLike], what: str = "derived shards") -> str:
    """The network that made ``manifests`` (one for all of them; mixing networks is refused)."""
    producers = {load_derived(p)["producer"] for p in manifests}
    if len(producers) != 1:
        raise ShardError(f"{what} made by {'different networks' if producers else 'no network'}: {sorted(producers)}")
    return producers.pop()


def weights_id(weights_dir: str | os.PathLike) -> str:
    """``<folder name>@<sha256 of model.safetensors, 16 hex>``: which network made a derived shard set."""
    weights = Path(weights_dir) / "model.safetensors"
    return f"{Path(weights_dir).name}@{sha256_file(weights)[:16]}"
