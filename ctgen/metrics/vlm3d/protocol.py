"""What the three protocols share: a feature network with its description, names and profiles of the records.

A protocol runs on the published backbone when its weights are given (``evaluation.vlm3d``), else on a
network of our own passed in as an :class:`Extractor` with ``proxy=True``. A proxy's numbers are not the
challenge's numbers: every record of a proxy run has ``_proxy`` in its name and ``proxy:<description>``
in its profile, so it never lands in a leaderboard table by mistake.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

CHALLENGE = "vlm3d-2026"  # profile prefix of the challenge's protocols
PAPERS = "papers"  # profile prefix of the papers' variant (RadImageNet 2.5D FID)


@dataclass(frozen=True)
class Extractor:
    """A feature network and what it is.

    ``fn`` takes the protocol's tensor (documented by each protocol) and returns (B, F) features;
    ``description`` names it in the profile (``ctnet``, ``squeezenet1.1``, or the proxy, e.g.
    ``classifier3d:results/models/classifier``); ``proxy`` says it is not the published backbone.
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    description: str
    proxy: bool = False


def metric_name(base: str, extractor: Extractor) -> str:
    """``fvd_ctnet`` or ``fvd_ctnet_proxy``; a dotted name gets the suffix on its first part
    (``fid_2p5d_proxy.xy``), so the sub-metrics of one run stay together."""
    if not extractor.proxy:
        return base
    head, dot, tail = base.partition(".")
    return f"{head}_proxy{dot}{tail}"


def profile(prefix: str, protocol: str, extractor: Extractor) -> str:
    """``vlm3d-2026:fvd_ctnet`` / ``vlm3d-2026:fid25d:squeezenet1.1`` / ``vlm3d-2026:fvd_ctnet:proxy:<desc>``."""
    if extractor.proxy:
        return f"{prefix}:{protocol}:proxy:{extractor.description}"
    return f"{prefix}:{protocol}" + (f":{extractor.description}" if protocol == "fid25d" else "")


@torch.no_grad()
def features(extractor: Extractor, batch: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """(B, ...) -> (B, F) float64 on the CPU; a (B, F, h, w) map is averaged over space (``spatial_average``)."""
    out = extractor.fn(batch if device is None else batch.to(device))
    if out.ndim == 4:
        out = out.mean(dim=(2, 3))
    if out.ndim != 2 or out.shape[0] != batch.shape[0]:
        raise ValueError(f"{extractor.description} must return (B={batch.shape[0]}, F) features, got {tuple(out.shape)}")
    return out.detach().to("cpu", torch.float64)
