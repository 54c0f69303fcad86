"""Token-grid arithmetic of the CT-ViT tokenizer, without torch: shared by the model and the geometry check."""

from __future__ import annotations

import math


def token_grid(num_slices: int, height: int, width: int, patch_size: int, temporal_patch_size: int,
               first_slice_separate: bool) -> tuple[int, int, int]:
    """Token grid (t, h, w) of a volume of ``num_slices`` x ``height`` x ``width`` (in-plane sizes multiples of the patch)."""
    if num_slices < 1:
        raise ValueError(f"need at least one slice, got {num_slices}")
    if height % patch_size or width % patch_size:
        raise ValueError(f"in-plane size {height}x{width} is not a multiple of patch_size {patch_size}")
    pt = temporal_patch_size
    t = 1 + math.ceil((num_slices - 1) / pt) if first_slice_separate else math.ceil(num_slices / pt)
    return t, height // patch_size, width // patch_size


def slices_for(t: int, temporal_patch_size: int, first_slice_separate: bool) -> int:
    """Slices a grid of ``t`` time steps decodes to (before cropping)."""
    return 1 + (t - 1) * temporal_patch_size if first_slice_separate else t * temporal_patch_size
