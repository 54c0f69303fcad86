"""The grid a trained generator writes: the prep preset's shape and HU window, and a spacing that is true.

A ``spacing`` preset fixes the voxel size, so every training volume had it and so do the samples.
A ``resize`` preset (GenerateCT's 128 x 128 x 201) fixes the shape instead: each volume keeps its
own spacing (extent / shape, recorded in its shard), and a sample has no single true one. The
generator then writes the median spacing of its training volumes, and every sample says so
(``spacing_source``), rather than pretending a spacing the models never saw.
"""

from __future__ import annotations

import numpy as np

from ctgen.data.stream import load_shards, member_values


def resolved_preset(preset: dict, manifests: list[str]) -> dict:
    """``preset`` with ``spacing`` (mm, x y z) and ``spacing_source`` set; resize presets read the training shards."""
    if preset.get("mode", "spacing") != "resize":
        return {**preset, "spacing_source": "the prep preset's fixed spacing (every training volume had it)"}
    spacings = [np.sqrt((np.asarray(aff, dtype=np.float64)[:3, :3] ** 2).sum(0))
                # unhashed: a spec job after training, whose streams hashed these shards (see member_values)
                for _, aff in member_values(load_shards(manifests), "affine.npy", verify=False)]
    if not spacings:
        raise ValueError(f"no training volumes in {manifests} to take the spacing of a resize preset from")
    median = np.median(np.stack(spacings), axis=0)
    return {**preset, "spacing": [round(float(v), 6) for v in median],
            "spacing_source": f"the median spacing of the {len(spacings)} training volumes: the resize preset "
                              f"gives each volume its own (extent / shape), so no single spacing is true"}
