"""A 2D patch discriminator over CT slices, and the hinge losses that train it.

The PatchGAN of pix2pix / VQGAN, with GroupNorm instead of BatchNorm: no running statistics, so
calling it twice per step (on detached and on live reconstructions) changes no buffer, and
``torch.func.functional_call`` with detached parameters is side-effect free.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SliceDiscriminator(nn.Module):
    """``SliceDiscriminator(channels=1, dim=64, layers=3)``: slices (B, C, H, W) -> logits (B, 1, h, w).

    ``layers`` stride-2 convolutions (widths dim, 2 dim, ... capped at 8 dim) then two stride-1
    ones; each output logit judges one receptive-field patch (70 px for layers=3).
    """

    def __init__(self, channels: int = 1, dim: int = 64, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(channels, dim, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = dim
        for i in range(1, layers):
            out = dim * min(2 ** i, 8)
            blocks += [nn.Conv2d(width, out, 4, stride=2, padding=1, bias=False), _group_norm(out), nn.LeakyReLU(0.2)]
            width = out
        out = dim * min(2 ** layers, 8)
        blocks += [nn.Conv2d(width, out, 3, padding=1, bias=False), _group_norm(out), nn.LeakyReLU(0.2),
                   nn.Conv2d(out, 1, 3, padding=1)]
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, h, w)


def _group_norm(channels: int) -> nn.GroupNorm:
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss for the discriminator: mean relu(1 - D(real)) + mean relu(1 + D(fake))."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: -mean D(fake)."""
    return -fake_logits.mean()
