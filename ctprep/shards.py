"""WebDataset tar shards per split, a manifest with checksums, and its verification.

One sample per volume; each shard ``{prefix}-{n:06d}.tar`` holds, per key (in this order,
which is webdataset's ``TarWriter`` order: sorted extensions):

- ``<key>.affine.npy``   (4, 4) float64, voxel -> RAS mm
- ``<key>.labels.npy``   (18,) uint8, the CT-RATE abnormality labels: 0, 1, or 255 = unknown
- ``<key>.meta.json``    the sample's meta plus the volume's geometry, dtype and history
- ``<key>.prompt.txt``   the prompt used for training, UTF-8
- ``<key>.prompts.json`` every prompt template's text
- ``<key>.vol.b2nd``     the (I, J, K) HU volume, int16 by default, losslessly compressed
  (:mod:`ctprep.codec`: a blosc2 frame of the (K, J, I) array; :func:`decode_volume`)

Format version 2 (version 1 stored ``vol.npy``, 111 MB per CT-RATE volume; now ~32 MB).

Why the care with files:

- **Atomic.** Each shard is written to a ``.part`` temporary beside it and ``os.replace``d when
  closed; the manifest is written last. A killed job leaves complete shards or none, and no
  manifest, so nothing downstream mistakes a partial split for a finished one.
- **Deterministic.** Fixed member mtime, owner and mode, sorted JSON keys, samples in input order,
  fixed codec blocks: the same samples give byte-identical tars and manifest, so checksums mean
  something. The codec has no checksum of its own; the manifest's sha256 per shard is the guard.
- **What changed, by member.** Each shard's entry also records a sha256 per member kind over its
  samples (``member_sha256``): shards written again with other prompts keep their volumes' digest,
  so a training that reads the volumes alone is not rerun for them (:func:`content_digest`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from ctprep.codec import CODEC, CodecError, EncodedVolume, decode_volume, encode_volume, geometry_meta
from ctprep.volume import CANONICAL, Volume, atomic_write_bytes

log = logging.getLogger(__name__)

#: CT-RATE's 18 abnormality labels.
N_LABELS = 18

#: Member extensions and what they hold; written into every manifest and checked by verify.
MEMBERS = {
    "affine.npy": "float64 (4, 4) voxel -> RAS mm, np.save",
    "labels.npy": f"uint8 ({N_LABELS},) abnormality labels: 0 absent, 1 present, 255 unknown (blank in the source), np.save",
    "meta.json": "UTF-8 JSON: sample meta + shape, spacing, origin, orientation, dtype, space, history",
    "prompt.txt": "UTF-8 text: the training prompt",
    "prompts.json": "UTF-8 JSON: {template name: prompt}",
    "vol.b2nd": "(I, J, K) HU in affine axis order, a blosc2 b2nd frame of the (K, J, I) array (format.volume_codec)",
}
#: The member holding the volume, and the webdataset extension its decoder answers to.
VOLUME_MEMBER = "vol.b2nd"
#: ``labels.npy`` value of a label the source left blank (unknown, not negative).
LABEL_UNKNOWN = 255

#: Bump when the member layout changes, so readers can refuse shards they don't understand.
#: 2: the volume is a lossless blosc2 frame (``vol.b2nd``), labels may be 255 = unknown.
FORMAT_VERSION = 2

#: The decoder for ``.decode(...)`` of a ``webdataset.WebDataset`` over these shards: gives
#: ``sample["vol.b2nd"]`` as the (I, J, K) array (the other members use webdataset's defaults).
volume_decoder = wds.handle_extension(VOLUME_MEMBER, decode_volume)

# Keys become tar member name stems; webdataset splits a member name at its first dot.
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# Fixed tar header fields, so identical samples give identical bytes.
_TAR_OWNER = "ctprep"
_TAR_MTIME = 0.0


class ShardError(ValueError):
    """A shard or manifest that does not match; the message names the file."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("ctprep", "ctgen"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "0+unknown"


# --- encoding ---------------------------------------------------------------------------------
def _jsonable(value: Any, where: str) -> Any:
    """Plain JSON data; NaN becomes null (strict JSON has no NaN, and pandas' missing is NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist(), where)
    if isinstance(value, (np.generic,)):
        return _jsonable(value.item(), where)
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    raise TypeError(f"{where}: {type(value).__name__} is not JSON data")


def _json_bytes(value: Any, where: str) -> bytes:
    return json.dumps(_jsonable(value, where), sort_keys=True, ensure_ascii=False, allow_nan=False).encode()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_labels(labels: Any, key: str) -> np.ndarray:
    """Labels as uint8: 0 and 1 kept, NaN/None (a blank cell: unknown) -> :data:`LABEL_UNKNOWN`."""
    try:
        values = np.asarray(labels, dtype=np.float64)  # None -> NaN
    except (TypeError, ValueError) as err:
        raise ShardError(f"{key}: labels must be numbers 0, 1 or NaN: {err}") from err
    if values.shape != (N_LABELS,):
        raise ShardError(f"{key}: labels must have shape ({N_LABELS},), got {values.shape}")
    unknown = np.isnan(values)
    bad = ~unknown & (values != 0) & (values != 1)
    if bad.any():
        raise ShardError(f"{key}: labels must be 0, 1 or NaN (unknown), got {values[bad].tolist()}")
    return np.where(unknown, LABEL_UNKNOWN, values).astype(np.uint8)


def encode_sample(sample: dict, volume_dtype: str | np.dtype = "int16") -> dict[str, Any]:
    """One sample as webdataset's ``{"__key__": ..., ext: bytes}`` dict, validated.

    ``sample["volume"]`` is a :class:`Volume` (encoded here) or an :class:`EncodedVolume` (the
    ``prep`` rule's payload, packed as it is: its dtype must be ``volume_dtype``).
    """
    key = sample["key"]
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ShardError(f"sample key {key!r} must match {_KEY_RE.pattern} (no dots, no slashes)")
    labels = encode_labels(sample["labels"], key)  # the cheap checks first, then the encode
    prompts = sample["prompts"]
    if not isinstance(sample["prompt"], str) or not all(isinstance(v, str) for v in prompts.values()):
        raise ShardError(f"{key}: prompt and prompts must be strings")
    vol = sample["volume"]
    dtype = np.dtype(volume_dtype)
    if isinstance(vol, Volume):
        vol = encode_volume(vol, dtype)
    elif isinstance(vol, EncodedVolume):
        if np.dtype(vol.dtype) != dtype:
            raise ShardError(f"{key}: encoded volume is {vol.dtype}, the shards store {dtype.name}")
        try:
            vol.check()
        except CodecError as err:
            raise ShardError(f"{key}: {err}") from err
    else:
        raise ShardError(f"{key}: 'volume' must be a ctprep Volume or EncodedVolume, got {type(vol).__name__}")
    if vol.orientation != CANONICAL:
        # Allowed (the affine travels along), but models read (I, J, K) as if it were RAS.
        log.warning("%s: orientation %s is not canonical %s", key, "".join(vol.orientation), CANONICAL)

    # The volume's own geometry wins over anything of the same name in the sample meta:
    # it describes the array actually stored.
    meta = {**sample.get("meta", {}), **vol.meta, **geometry_meta(vol.affine, vol.shape), "dtype": dtype.name}
    return {
        "__key__": key,
        "affine.npy": _npy_bytes(np.asarray(vol.affine, dtype=np.float64)),
        "labels.npy": _npy_bytes(labels),
        "meta.json": _json_bytes(meta, f"{key}.meta"),
        "prompt.txt": sample["prompt"].encode(),
        "prompts.json": _json_bytes(prompts, f"{key}.prompts"),
        VOLUME_MEMBER: vol.payload,
    }


# --- writing ----------------------------------------------------------------------------------
class _HashingFile:
    """A write-only file that hashes what passes through, so shards are not read back to hash."""

    def __init__(self, fh: io.BufferedWriter) -> None:
        self.fh = fh
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.fh.write(data)


def _shard_name(prefix: str, n: int) -> str:
    return f"{prefix}-{n:06d}.tar"


def _clean_previous(out_dir: Path, prefix: str) -> None:
    """Remove this prefix's manifest first (it marks completion), then old shards and temporaries.

    Only exact ``{prefix}-NNNNNN.tar`` names (and their ``.part`` temporaries) are touched, so a
    chunk writing ``train-c001`` beside ``train-c002`` leaves the other's files alone.
    """
    (out_dir / f"{prefix}.manifest.json").unlink(missing_ok=True)
    ours = re.compile(rf"^\.?{re.escape(prefix)}-\d{{6}}\.tar(\.[A-Za-z0-9_]+\.part)?$")
    for path in sorted(out_dir.iterdir()):
        if ours.match(path.name):
            log.info("removing %s from a previous run", path.name)
            path.unlink()


def _write_one_shard(path: Path, encoded: Iterable[dict[str, Any]], seen: set[str]) -> dict[str, Any]:
    """Stream ``encoded`` samples into ``path`` via a ``.part`` temporary; return its manifest entry.

    Samples are written as they arrive, so one volume is in memory at a time, not a shard's worth.
    """
    keys: list[str] = []
    members: dict[str, Any] = {}  # member -> sha256 over the shard's samples (content_digest)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        # mkstemp makes 0600 files; shards are data for other users and jobs to read.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as fh:
            hashing = _HashingFile(fh)
            # webdataset's own writer: member naming and order match what its reader expects.
            # encoder=False: members arrive as bytes we encoded ourselves (sorted JSON, np.save).
            with wds.TarWriter(
                hashing, user=_TAR_OWNER, group=_TAR_OWNER, mtime=_TAR_MTIME, encoder=False
            ) as writer:
                for sample in encoded:
                    key = sample["__key__"]
                    if key in seen:
                        raise ShardError(f"duplicate sample key {key}")
                    seen.add(key)
                    keys.append(key)
                    for ext, data in sample.items():
                        if ext != "__key__":
                            _member_update(members.setdefault(ext, hashlib.sha256()), key, data)
                    writer.write(sample)
            fh.flush()
            os.fsync(fh.fileno())  # the rename must not land before the data does
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {
        "file": path.name,
        "n_samples": len(keys),
        "bytes": hashing.bytes,
        "sha256": hashing.sha256.hexdigest(),
        "keys": keys,
        "member_sha256": {ext: h.hexdigest() for ext, h in sorted(members.items())},
    }


def _member_update(h, key: str, data: bytes) -> None:
    """One sample's member into its member hash: the key and the length delimit it (no two samples' bytes can
    shift into each other)."""
    h.update(f"{key}\0{len(data)}\0".encode())
    h.update(data)


def shard_format(volume_dtype: str | np.dtype = "int16") -> dict[str, Any]:
    """The ``format`` block of a manifest."""
    return {
        "version": FORMAT_VERSION,
        "members": MEMBERS,
        "volume_dtype": np.dtype(volume_dtype).name,
        "volume_layout": "(I, J, K), axes in affine column order",
        "volume_codec": CODEC,
        "label_unknown": LABEL_UNKNOWN,
        "space": "RAS",
    }


def write_shards(
    samples: Iterable[dict],
    out_dir: str | os.PathLike,
    prefix: str,
    shard_size: int,
    volume_dtype: str = "int16",
    split: str | None = None,
) -> dict[str, Any]:
    """Write ``samples`` as ``out_dir/{prefix}-{n:06d}.tar`` shards, then the manifest.

    A sample is ``{"key", "volume": Volume, "prompt", "prompts", "meta", "labels"}`` (see the
    module docstring). Returns the manifest, also written to ``out_dir/{prefix}.manifest.json``.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not prefix or "/" in prefix or "." in prefix:
        raise ValueError(f"prefix {prefix!r} must be a plain name without dots")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clean_previous(out_dir, prefix)

    shards: list[dict[str, Any]] = []
    seen: set[str] = set()
    encoded = (encode_sample(s, volume_dtype) for s in samples)  # lazily: volumes are large
    for n in itertools.count():
        batch = itertools.islice(encoded, shard_size)
        first = next(batch, None)
        if first is None:  # no empty trailing shard
            break
        entry = _write_one_shard(out_dir / _shard_name(prefix, n), itertools.chain([first], batch), seen)
        log.info("wrote %s: %d samples, %.1f MB", entry["file"], entry["n_samples"], entry["bytes"] / 1e6)
        shards.append(entry)

    manifest: dict[str, Any] = {
        **({"split": split} if split is not None else {}),
        "prefix": prefix,
        "shard_size": shard_size,
        "n_samples": sum(s["n_samples"] for s in shards),
        "n_shards": len(shards),
        "shards": shards,
        "format": shard_format(volume_dtype),
        "created_by": f"ctprep {_version()}",
    }
    atomic_write_bytes(out_dir / f"{prefix}.manifest.json", _manifest_bytes(manifest))
    log.info("%s: %d samples in %d shards", prefix, manifest["n_samples"], len(shards))
    return manifest


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def load_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read a manifest, refusing a format version this code does not know."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ShardError(f"unreadable manifest {path}: {err}") from err
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    version = fmt.get("version") if isinstance(fmt, dict) else None
    if isinstance(version, str) and version.startswith("ctgen.derived"):  # ctgen.data.derived's manifests
        raise ShardError(f"{path} lists {fmt.get('kind', 'derived')} shards (what a network computed from volume "
                         "shards), where volume shards are expected")
    if not isinstance(manifest, dict) or not isinstance(fmt, dict):
        raise ShardError(f"{path} is not a shard manifest (no format section)")
    if version != FORMAT_VERSION:
        raise ShardError(
            f"{path}: shard format version {version}, this ctprep reads version {FORMAT_VERSION} only: "
            "rebuild the shards with this version (rerun the shards rules) or read them with the ctprep that wrote them"
        )
    return manifest


# --- merging and verifying -----------------------------------------------------------------------
def merge_manifests(
    manifest_paths: Iterable[str | os.PathLike], out_path: str | os.PathLike, split: str
) -> dict[str, Any]:
    """One manifest for ``split`` from several chunk manifests; shard paths become relative to it.

    Shards are listed sorted by path, so the merged manifest does not depend on the order the
    chunk manifests were given (Snakemake's input order is not a contract).
    """
    out_path = Path(out_path)
    out_dir = out_path.parent.resolve()
    shards: list[dict[str, Any]] = []
    sources, prefixes, formats = [], set(), set()
    seen: dict[str, str] = {}
    for mpath in sorted(Path(p).resolve() for p in manifest_paths):
        manifest = load_manifest(mpath)
        if manifest.get("split", split) != split:
            raise ShardError(f"{mpath}: split {manifest['split']!r}, merging {split!r}")
        formats.add(json.dumps(manifest["format"], sort_keys=True))
        prefixes.add(manifest["prefix"])
        sources.append(os.path.relpath(mpath, out_dir))
        for shard in manifest["shards"]:
            shard_path = mpath.parent / shard["file"]
            if not shard_path.is_file():
                raise ShardError(f"{mpath}: shard {shard['file']} is missing")
            for key in shard["keys"]:
                if key in seen:
                    raise ShardError(f"key {key} is in both {seen[key]} and {shard_path}")
                seen[key] = str(shard_path)
            shards.append({**shard, "file": os.path.relpath(shard_path, out_dir)})
    if len(formats) > 1:
        raise ShardError(f"chunk manifests for {split} disagree on the shard format")
    shards.sort(key=lambda s: s["file"])
    merged = {
        "split": split,
        "prefixes": sorted(prefixes),
        "sources": sorted(sources),
        "shard_size": max((s["n_samples"] for s in shards), default=0),
        "n_samples": sum(s["n_samples"] for s in shards),
        "n_shards": len(shards),
        "shards": shards,
        "format": json.loads(formats.pop()) if formats else shard_format(),
        "created_by": f"ctprep {_version()}",
    }
    atomic_write_bytes(out_path, _manifest_bytes(merged))
    log.info(
        "%s: merged %d manifests, %d samples in %d shards",
        split,
        len(sources),
        merged["n_samples"],
        len(shards),
    )
    return merged


def content_digest(manifest_paths: Iterable[str | os.PathLike], members: Iterable[str]) -> str:
    """sha256 (16 hex) of what a reader of ``members`` gets from the manifests' shards: each shard's keys in order
    and its ``member_sha256`` of those members, manifest by manifest. A training that reads the volumes alone (the
    tokenizer, the autoencoder) sees the same data after the shards were written again with other prompts or
    reports, and this digest says so where the shards' own checksums do not. Shard files, paths and other members
    are not in it. A missing manifest digests to "" (nothing written yet); one whose shards do not record these
    members (written before ``member_sha256``) to its file's sha256, so that anything in it counts.
    """
    members = tuple(sorted(members))
    out = hashlib.sha256()
    for path in manifest_paths:
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            return ""
        out.update(_manifest_content(str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size, members).encode())
    return out.hexdigest()[:16]


@functools.lru_cache(maxsize=16)
def _manifest_content(path: str, inode: int, mtime_ns: int, size: int, members: tuple[str, ...]) -> str:
    """One manifest's part of :func:`content_digest`; inode, mtime and size key the cache (a rewritten manifest is a
    new file: the workflow asks once per rule that reads it)."""
    shards = load_manifest(path)["shards"]
    if not all(m in s.get("member_sha256", {}) for s in shards for m in members):
        return f"file:{sha256_file(path)}"
    text = json.dumps([[s["keys"], [s["member_sha256"][m] for m in members]] for s in shards])
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in blocks."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def tree_digest(root: str | os.PathLike, folders=(".",), suffixes: tuple[str, ...] | None = None) -> str:
    """sha256 (16 hex) of the files under ``root/folder`` for each of ``folders`` (those ending in ``suffixes``;
    all without), by path relative to ``root`` and size: it changes where files were added, removed or
    replaced, which a folder's own mtime does not show (a subfolder filling leaves its parent's mtime alone).
    One ``os.scandir`` walk, no file read; a missing folder counts as empty, a broken link as size -1, and hidden
    files (macOS ``._*`` companions, ``.DS_Store``) not at all. Not the files' dates: a copy of the dataset to
    another disk (cp, rsync without -t) dates every file anew, and the cohort and all after it would rerun; a
    volume replaced by one of exactly the same size is the rare case that goes unseen (``snakemake -R cohort``).
    The string per file is unchanged since the first version, so a finished run's digest stays the same."""
    root = Path(root)
    entries, stack = [], [root / f for f in folders]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                found = list(it)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in found:
            if e.name.startswith("."):
                continue
            if e.is_dir(follow_symlinks=False):
                stack.append(Path(e.path))
            elif suffixes is None or e.name.endswith(suffixes):
                try:  # each entry on its own: a dangling link hid the rest of its folder
                    size = e.stat().st_size
                except OSError:
                    size = -1
                entries.append(f"{os.path.relpath(e.path, root)}:{size}")
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()[:16]


def _tar_keys(path: Path) -> dict[str, list[str]]:
    """Member extensions per key, in file order, split the way webdataset splits them."""
    keys: dict[str, list[str]] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                raise ShardError(f"{path.name}: unexpected non-file member {member.name}")
            key, _, ext = member.name.partition(".")
            keys.setdefault(key, []).append(ext)
    return keys


def verify_manifest(path: str | os.PathLike, checksums: bool = True) -> dict[str, Any]:
    """Check every shard of a manifest: present, its size, its sha256, its keys and members.

    Raises :class:`ShardError` naming the first bad shard (and the manifest); returns a summary
    otherwise. ``checksums=False`` is the cheap check (sizes and tar indexes, no hashing: seconds
    at any scale, where hashing reads every byte, ~1.7 TB for CT-RATE).
    """
    path = Path(path)
    manifest = load_manifest(path)
    try:
        return _verify(path, manifest, checksums)
    except (KeyError, TypeError, AttributeError) as err:  # a hand-edited or foreign manifest: named, the batch goes on
        raise ShardError(f"{path.name}: malformed manifest (missing or wrong {err})") from err


def _verify(path: Path, manifest: dict[str, Any], checksums: bool) -> dict[str, Any]:
    expected_members = sorted(manifest["format"]["members"])
    total, total_bytes = 0, 0
    for shard in manifest["shards"]:
        shard_path = path.parent / shard["file"]
        name = shard["file"]
        if not shard_path.is_file():
            raise ShardError(f"{path.name}: shard {name} is missing")
        size = shard_path.stat().st_size
        if size != shard["bytes"]:
            raise ShardError(f"{path.name}: shard {name} has {size} bytes, manifest says {shard['bytes']}: refusing it")
        if checksums:
            digest = sha256_file(shard_path)
            if digest != shard["sha256"]:
                raise ShardError(
                    f"{path.name}: shard {name} sha256 {digest} != manifest {shard['sha256']}: "
                    "the shard changed after it was written; refusing it (rerun the shards rule)"
                )
        try:
            members = _tar_keys(shard_path)
        except tarfile.TarError as err:
            raise ShardError(f"{path.name}: shard {name} is not a readable tar: {err}") from err
        if list(members) != shard["keys"] or len(shard["keys"]) != shard["n_samples"]:
            raise ShardError(f"{path.name}: shard {name} keys {list(members)} != manifest {shard['keys']}")
        for key, exts in members.items():
            if sorted(exts) != expected_members:
                raise ShardError(
                    f"{path.name}: shard {name} key {key} has members {exts}, expected {expected_members}"
                )
        total += shard["n_samples"]
        total_bytes += size
    if total != manifest["n_samples"]:
        raise ShardError(f"{path.name}: shards hold {total} samples, manifest says {manifest['n_samples']}")
    summary = {
        "manifest": str(path),
        "split": manifest.get("split"),
        "n_shards": len(manifest["shards"]),
        "n_samples": total,
        "bytes": total_bytes,
        "checksums": checksums,
    }
    log.info("verified %s%s: %d samples in %d shards", path.name, "" if checksums else " (sizes only)",
             total, summary["n_shards"])
    return summary
