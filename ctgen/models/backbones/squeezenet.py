"""SqueezeNet 1.1 with its ImageNet 1000-class head: the VLM3D 2026 2.5D FID feature network.

The 2026 evaluation (forithmus/VLM3D-Dockers, ``ct_challenges/ctgen_evaluation/evaluation.py`` passes
``--model_name squeezenet1_1`` to ``compute_fid_2-5d_ct.py``) builds ``torchvision.models.squeezenet1_1
(pretrained=True)`` and takes its ``forward`` output: the 1000 class scores after the head's ReLU and
global average pool (``spatial_average`` leaves a 2D output alone). Written here without torchvision
(not a dependency), with torchvision's module names, so its ``squeezenet1_1-b8a52dc0.pth`` (a plain
state dict) loads by name from a local path (config: ``evaluation.vlm3d.squeezenet_weights``).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ctgen.models.backbones.loading import load_checked, read_state_dict


class Fire(nn.Module):
    """Squeeze 1x1 -> ReLU -> concat(expand 1x1, expand 3x3) -> ReLU (torchvision's ``Fire``)."""

    def __init__(self, cin: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, kernel_size=1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, kernel_size=1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(x)), torch.relu(self.expand3x3(x))], 1)


class SqueezeNet11(nn.Module):
    """(B, 3, h, w) -> (B, num_classes): ReLU'd class scores, globally average-pooled."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        pool = dict(kernel_size=3, stride=2, ceil_mode=True)
        self.features = nn.Sequential(  # indices are torchvision's: they are the state-dict keys
            nn.Conv2d(3, 64, kernel_size=3, stride=2), nn.ReLU(), nn.MaxPool2d(**pool),
            Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), nn.MaxPool2d(**pool),
            Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), nn.MaxPool2d(**pool),
            Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256), Fire(512, 64, 256, 256),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(512, num_classes, kernel_size=1), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d((1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)  # (B, num_classes)

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> SqueezeNet11:
        """torchvision's ImageNet checkpoint (``.pth`` state dict) or the same keys as ``.safetensors``."""
        state = read_state_dict(path, "SqueezeNet-1.1 weights")
        return load_checked(cls(), state, path, "SqueezeNet-1.1")
