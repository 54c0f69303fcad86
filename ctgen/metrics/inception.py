"""InceptionV3 pool features (2048-d) for FID, from pytorch-fid's weights at a local path.

Written without torchvision (not a dependency): the same module names as torchvision's
``Inception3`` and pytorch-fid's FID variants (``FIDInceptionA/C/E_1/E_2``: average pools that
exclude padding, a max pool in the last block), so ``pt_inception-2015-12-05-6726825d.pth`` loads
by name. Nothing is downloaded: the path comes from config. Loading checks the key set and fails
loudly on any mismatch other than the unused classifier/aux head and BatchNorm counters.

Slices arrive as (B, 1, h, w) in the volume's units; a window maps them to [0, 1] (clipped), they
are resized bilinearly to 299 x 299, repeated to 3 channels and scaled to [-1, 1] as pytorch-fid does.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
    window_low: float = -1000.0  # input value mapped to 0 (HU: lung window low end; use -1 for [-1, 1] volumes)
    window_high: float = 1000.0  # input value mapped to 1 (clipped above)
    size: int = 299  # side of the resized slice; 299 is the FID convention (75 is the smallest that runs)


class BasicConv2d(nn.Module):
    """torchvision's BasicConv2d: conv (no bias) + BatchNorm (eps 1e-3) + ReLU, keys .conv/.bn."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


conv = BasicConv2d


def _avg(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # FID blocks exclude padding


class BlockA(nn.Module):
    """Mixed_5b/c/d (FIDInceptionA): 1x1, 5x5, double 3x3, pool branches."""

    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = conv(cin, 48, 1), conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = conv(cin, 64, 1), conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
        self.branch_pool = conv(cin, pool, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg(x))], 1)


class BlockB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = conv(cin, 64, 1), conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):
    """Mixed_6b-e (FIDInceptionC): factorised 7x7 branches."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = conv(cin, c7, 1), conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = conv(cin, c7, 1)
        self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = conv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg(x))], 1)


class BlockD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = conv(cin, 192, 1), conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = conv(cin, 192, 1)
        self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):
    """Mixed_7b (FIDInceptionE_1, average pool) and Mixed_7c (FIDInceptionE_2, max pool)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = conv(cin, 320, 1)
        self.branch3x3_1 = conv(cin, 384, 1)
        self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = conv(cin, 448, 1), conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = conv(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class InceptionV3Features(nn.Module):
    """(B, 1, h, w) slices -> (B, 2048) pool3 features of pytorch-fid's FID InceptionV3."""

    def __init__(self, config: InceptionConfig = InceptionConfig()):
        super().__init__()
        self.config = config
        self.Conv2d_1a_3x3 = conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 32, 3)
        self.Conv2d_2b_3x3 = conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = conv(64, 80, 1)
        self.Conv2d_4a_3x3 = conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b, self.Mixed_6c = BlockC(768, 128), BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b, self.Mixed_7c = BlockE(1280, max_pool=False), BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the classifier head: loaded for a strict key check, unused
        self.eval()

    @classmethod
    def from_path(cls, path: str | os.PathLike, config: InceptionConfig = InceptionConfig()) -> InceptionV3Features:
        """Load pytorch-fid's ``.pth`` (``weights_only=True``, nothing unpickled) or a ``.safetensors``."""
        from ctgen.models.backbones.loading import read_state_dict

        path = Path(path)
        state = read_state_dict(path, "InceptionV3 weights")  # a wrong file named, not torch's unpickler error
        model = cls(config)
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        unexpected = [k for k in result.unexpected_keys if not k.startswith("AuxLogits.")]
        if missing or unexpected:
            raise ValueError(f"{path} is not an InceptionV3 state dict: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]} ({len(missing)}/{len(unexpected)} in all)")
        log.info("loaded InceptionV3 weights from %s", path)
        return model.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected slices (B, 1, h, w), got {tuple(x.shape)}")
        x = ((x.float() - c.window_low) / (c.window_high - c.window_low)).clamp(0, 1)  # (B, 1, h, w) in [0, 1]
        x = F.interpolate(x, size=(c.size, c.size), mode="bilinear", align_corners=False)
        x = repeat(2 * x - 1, "b 1 h w -> b c h w", c=3)  # (B, 3, S, S) in [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)  # (B, 192, 35, 35) at S = 299
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))  # (B, 2048): pool3, the FID features
