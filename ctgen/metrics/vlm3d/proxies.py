"""Adapters that let the workflow's own networks stand in for the published backbones (proxy runs).

Each protocol hands its extractor a fixed tensor (:mod:`ctgen.metrics.vlm3d.protocol`); a network trained in
the workflow wants its own input: (B, 1, D, H, W) in [-1, 1] over an HU window, at the grid it was trained
on. These wrappers convert, and nothing else: the protocol's geometry and arithmetic stay as they are.

* :func:`volume_proxy` for FVD_CTNet and the CLIP image side: HU volume (B, D, H, W) -> window -> optional
  trilinear resize -> ``fn(B, 1, D', H', W')``;
* :func:`slice_proxy` for the 2.5D FID: the protocol's (B, 3, h, w) slices (channel 0 is the volume's
  min-max value minus 0.406) -> [-1, 1] -> optional resize -> ``fn(B, 1, h', w')``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ctgen.metrics.vlm3d.fid25d import CHANNEL_MEAN
from ctgen.metrics.vlm3d.protocol import Extractor


def volume_proxy(fn: Callable[[torch.Tensor], torch.Tensor], description: str,
                 hu_window: Sequence[float] = (-1000.0, 1000.0), size: Sequence[int] | None = None) -> Extractor:
    """An :class:`Extractor` over HU volumes (B, D, H, W) for a network taking (B, 1, D', H', W') in [-1, 1]."""
    lo, hi = (float(v) for v in hu_window)

    def run(hu: torch.Tensor) -> torch.Tensor:
        x = ((hu.float() - lo) / (hi - lo) * 2 - 1).clamp(-1, 1)[:, None]  # (B, 1, D, H, W)
        if size is not None:
            x = F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)
        return fn(x)

    return Extractor(run, description, proxy=True)


def slice_proxy(fn: Callable[[torch.Tensor], torch.Tensor], description: str,
                size: Sequence[int] | None = None) -> Extractor:
    """An :class:`Extractor` over the 2.5D FID's (B, 3, h, w) slices for a network taking (B, 1, h', w') in [-1, 1]."""

    def run(slices: torch.Tensor) -> torch.Tensor:
        x = (slices[:, :1].float() + CHANNEL_MEAN[0]) * 2 - 1  # (B, 1, h, w): the volume's min..max -> [-1, 1]
        if size is not None:
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
        return fn(x)

    return Extractor(run, description, proxy=True)


def text_proxy(fn: Callable[[list[str]], torch.Tensor], description: str) -> Extractor:
    """An :class:`Extractor` for the CLIP text side: reports -> (B, L) latents."""
    return Extractor(fn, description, proxy=True)
