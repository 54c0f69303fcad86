"""The JSON sidecar written beside every synthetic volume: what made it, and where it lies.

It holds the caller's dict (prompt, seed, settings, checkpoint hashes, config hash, code
version) unchanged at the top level, plus ``"synthetic": true``, the geometry of the written
grid (shape, spacing, origin, orientation, the full RAS affine) and how the file was written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ctprep import __version__
from ctprep.volume import Volume, atomic_write_bytes

#: Keys the export layer writes itself; a caller's sidecar may not set them.
RESERVED = ("synthetic", "geometry", "export")


def geometry(vol: Volume) -> dict[str, Any]:
    """Shape, spacing, origin, orientation and affine of ``vol``, in RAS mm, as plain JSON data."""
    return {
        "space": "RAS",
        "array_axes": ["i", "j", "k"],
        "shape": list(vol.shape),
        "spacing": [float(s) for s in vol.spacing],
        "origin": [float(o) for o in vol.origin],
        "orientation": "".join(vol.orientation),
        "affine": vol.affine.tolist(),
    }


def _jsonable(value: Any) -> Any:
    """NumPy scalars/arrays and paths as plain JSON values (anything else fails loudly in json)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"sidecar value of type {type(value).__name__} is not JSON-serialisable: {value!r}")


def build_sidecar(vol: Volume, sidecar: dict[str, Any], export: dict[str, Any]) -> dict[str, Any]:
    """The sidecar dict: the caller's keys, ``synthetic``, ``geometry``, ``export`` and the history."""
    clash = [k for k in RESERVED if k in sidecar]
    if clash:
        raise ValueError(f"sidecar keys {clash} are reserved for the export layer")
    return {
        **sidecar,
        "synthetic": True,
        "geometry": geometry(vol),
        "export": {"ctgen_version": __version__, **export, "history": vol.meta.get("history", [])},
    }


def sidecar_path(path: str | os.PathLike) -> Path:
    """``<dir>/<name>.json`` for ``<dir>/<name>.nii.gz`` or ``<dir>/<name>.nii``."""
    path = Path(path)
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".json")
    return path.with_suffix(".json")


def to_json(content: dict[str, Any], indent: int | None = 2) -> str:
    """``content`` as JSON text (NumPy values and paths converted, anything else refused)."""
    return json.dumps(content, indent=indent, ensure_ascii=False, default=_jsonable)


def write_sidecar(path: str | os.PathLike, content: dict[str, Any]) -> Path:
    """Write ``content`` as indented UTF-8 JSON at ``path``, atomically; returns the path."""
    payload = to_json(content) + "\n"
    atomic_write_bytes(path, payload.encode("utf-8"))
    return Path(path)
