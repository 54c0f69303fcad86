"""Lossless volume payloads: one blosc2 ``b2nd`` frame per prepared volume, encoded once.

The ``prep`` rule encodes each volume once and writes the frame to disk; the ``shards`` rule
packs those bytes into the tar shards as they are (no decode, no re-encode); only the training
reader decodes them. The codec is blosc2 (zstd level 1 after a bit shuffle, blocks of whole axial
slices): on a CT-RATE-size volume after the ``spacing`` preset (480x480x240 int16, 110.6 MB
raw) it writes ~32 MB in ~0.2 s and decodes in ~0.07 s on one core, bitwise identical
(benchmarks/prep_scale.py has the comparison with zstd, LZ4 and JPEG-LS/JPEG-XL lossless).
JPEG-LS is ~25% smaller but decodes ten times slower, too slow to feed a GPU from a few workers.

Layout: the frame holds the (I, J, K) volume as a C-ordered (K, J, I) array, which is both the
memory order the resampler writes (i fastest) and the models' (D, H, W): neither side transposes.
:func:`decode_volume` returns the (I, J, K) view of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import blosc2
import nibabel as nib
import numpy as np

from ctprep.volume import Volume

#: The codec, as recorded in every shard manifest (``format.volume_codec``).
CODEC: dict[str, Any] = {
    "container": "b2nd",  # blosc2's NDArray frame: shape and dtype travel with the data
    "codec": "zstd",  # best ratio of blosc2's codecs that still decodes ~1.5 GB/s per core
    "clevel": 1,  # higher levels cost 3x the encode time for <1% smaller frames on CT
    "filter": "bitshuffle",  # HU in int16 keep their entropy in the low bits: ~4% smaller than byte shuffle
    "block": "whole axial slices, about 1 MiB",  # independent blocks: decoding parallelises over slices
    "layout": "stored as the C-ordered (K, J, I) array; decoded as its (I, J, K) view",
}
#: Target bytes per blosc2 block (rounded to whole axial slices).
BLOCK_BYTES = 1 << 20
#: Largest chunk (blosc2 caps a chunk below 2 GiB); a bigger volume spans several chunks.
CHUNK_BYTES = 1 << 30


class CodecError(ValueError):
    """A payload that is not a volume frame this code can read; the message says why."""


def to_dtype(data: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast HU to ``dtype``, rounding and clipping where it is an integer type."""
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if data.dtype.kind == "f":
            data = np.rint(data)
            np.clip(data, info.min, info.max, out=data)  # in place: one temporary, not two
        elif data.dtype != dtype:
            data = np.clip(data, info.min, info.max)
    return data.astype(dtype, copy=False)


def geometry_meta(affine: np.ndarray, shape: tuple[int, ...]) -> dict[str, Any]:
    """Shape, spacing, origin and orientation of a grid, as the shard meta records them."""
    affine = np.asarray(affine, dtype=np.float64)
    return {
        "shape": [int(s) for s in shape],
        "spacing": np.sqrt((affine[:3, :3] ** 2).sum(axis=0)).tolist(),
        "origin": affine[:3, 3].tolist(),
        "orientation": "".join(nib.aff2axcodes(affine)),
    }


@dataclass(frozen=True)
class EncodedVolume:
    """A prepared volume as its encoded payload plus the geometry needed without decoding it."""

    payload: bytes  # the b2nd frame (see the module docstring)
    affine: np.ndarray  # (4, 4) float64, voxel -> RAS mm
    shape: tuple[int, int, int]  # (I, J, K)
    dtype: str  # numpy dtype name of the stored voxels
    meta: dict[str, Any] = field(default_factory=dict)  # the Volume's meta: source, space, history...

    @property
    def orientation(self) -> tuple[str, ...]:
        return tuple(nib.aff2axcodes(self.affine))

    def check(self) -> None:
        """Raise :class:`CodecError` where the frame's header disagrees with shape or dtype (no decode)."""
        shape, dtype = frame_header(self.payload)
        if shape != tuple(reversed(self.shape)) or dtype != np.dtype(self.dtype):
            raise CodecError(
                f"payload holds a {dtype} array of shape {shape}, expected {self.dtype} {tuple(reversed(self.shape))}"
            )

    def meta_json(self) -> str:
        """The meta as a JSON string (the prep table's column)."""
        return json.dumps(self.meta, sort_keys=True)


def _frame_grid(shape_kji: tuple[int, int, int], itemsize: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Chunks and blocks of whole axial slices (fixed here, not guessed from the CPU's caches, so
    the same volume gives the same bytes on every machine)."""
    k, j, i = shape_kji
    slice_bytes = max(1, j * i * itemsize)
    per_block = max(1, min(k, BLOCK_BYTES // slice_bytes))
    per_chunk = max(per_block, min(k, CHUNK_BYTES // slice_bytes) // per_block * per_block)
    return (min(k, per_chunk), j, i), (per_block, j, i)


def encode_array(data_ijk: np.ndarray) -> bytes:
    """The b2nd frame of an (I, J, K) array (stored as (K, J, I), see the module docstring).

    One thread: blosc2's threads store blocks in the order they finish, so a threaded encode
    gives different (equally valid) bytes each time, and shard checksums would change.
    """
    if data_ijk.ndim != 3:
        raise CodecError(f"expected an (I, J, K) array, got shape {data_ijk.shape}")
    kji = np.ascontiguousarray(data_ijk.transpose(2, 1, 0))  # no copy for the resampler's output
    chunks, blocks = _frame_grid(kji.shape, kji.itemsize)
    cparams = blosc2.CParams(
        codec=blosc2.Codec.ZSTD,
        clevel=CODEC["clevel"],
        filters=[blosc2.Filter.BITSHUFFLE],
        typesize=kji.itemsize,
        nthreads=1,
    )
    return blosc2.asarray(kji, chunks=chunks, blocks=blocks, cparams=cparams).to_cframe()


def encode_volume(vol: Volume, dtype: str | np.dtype = "int16") -> EncodedVolume:
    """Round/clip ``vol`` to ``dtype`` and encode it; the geometry and meta ride along unencoded."""
    dt = np.dtype(dtype)
    payload = encode_array(to_dtype(vol.data, dt))
    return EncodedVolume(payload, vol.affine.copy(), vol.shape, dt.name, vol.meta)


def _open(payload: bytes) -> blosc2.NDArray:
    try:
        nd = blosc2.ndarray_from_cframe(payload)
    except Exception as err:  # blosc2 raises RuntimeError/ValueError for anything it can't parse
        raise CodecError(f"not a blosc2 b2nd frame ({len(payload)} bytes): {err}") from err
    if nd.ndim != 3:
        raise CodecError(f"expected a 3D frame, got shape {nd.shape}")
    return nd


def frame_header(payload: bytes) -> tuple[tuple[int, ...], np.dtype]:
    """Stored (K, J, I) shape and dtype of a frame, read from its header without decoding."""
    nd = _open(payload)
    return tuple(int(s) for s in nd.shape), np.dtype(nd.dtype)


def decode_volume(payload: bytes) -> np.ndarray:
    """The (I, J, K) array of a b2nd frame: a view of the decoded C-ordered (K, J, I) array.

    Decoding uses blosc2's thread count (``blosc2.set_nthreads``; ``BLOSC_NTHREADS``); set it to
    1 in data-loader workers that already run one per core.
    """
    nd = _open(payload)
    try:
        kji = nd[()]
    except Exception as err:
        raise CodecError(f"corrupt b2nd frame: {err}") from err
    return kji.transpose(2, 1, 0)
