"""Two ResNets of the evaluation protocols, with the module names of their published checkpoints.

* ``resnet18_features()``: torchvision's ResNet-18 without its pool and fc, as an ``nn.Sequential`` of
  (conv1, bn1, relu, maxpool, layer1..4): CT-Net's slab feature extractor (``features.0`` ... ``features.7``
  in the CT-Net checkpoint; Draelos et al. 2021, ``custom_models_ctnet.py``).
* :class:`RadImageNetResNet50`: the RadImageNet ResNet-50 the papers' 2.5D FID uses (MAISI, Text2CT,
  Report2CT, and the ``radimagenet_resnet50`` default of MONAI's ``compute_fid_2-5d_ct.py``). It is
  Warvito/radimagenet-models' Keras-to-PyTorch conversion (``radimagenet_models/models/resnet.py``), not
  torchvision's ResNet-50: every conv has a bias, a block's stride sits on its first 1x1 conv (Keras), and
  BatchNorm eps is 1.001e-5. It has no head: the output is the layer4 map (B, 2048, h, w), which the 2.5D
  FID averages over space. Its checkpoint is ``RadImageNet-ResNet50_notop.pth`` (a plain state dict).

Written without torchvision (not a dependency).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ctgen.models.backbones.loading import load_checked, read_state_dict


class BasicBlock(nn.Module):
    """torchvision's ResNet-18/34 block: two 3x3 convs (no bias) with BatchNorm, identity or 1x1 shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet18_features() -> nn.Sequential:
    """(B, 3, h, w) -> (B, 512, h/32, w/32): torchvision ``resnet18().children()[:-2]``."""
    def stage(cin, cout, stride):
        return nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout))

    return nn.Sequential(
        nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        stage(64, 64, 1), stage(64, 128, 2), stage(128, 256, 2), stage(256, 512, 2),
    )


BN_EPS = 1.001e-5  # Keras' BatchNormalization epsilon, kept by the conversion


class Bottleneck(nn.Module):
    """Keras ResNet50 block: 1x1 (stride here) -> 3x3 -> 1x1 x4, every conv with bias, BatchNorm eps 1.001e-5."""

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, stride=stride)
        self.bn1 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1)
        self.bn3 = nn.BatchNorm2d(planes * 4, eps=BN_EPS)
        self.downsample = None
        if stride != 1 or cin != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride=stride),
                                            nn.BatchNorm2d(planes * 4, eps=BN_EPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class RadImageNetResNet50(nn.Module):
    """(B, 3, h, w) -> (B, 2048, h/32, w/32): RadImageNet ResNet-50 without top (Warvito's conversion)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(64, eps=BN_EPS)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)  # after a ReLU: -inf and Keras' zero padding agree
        cin, layers = 64, []
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage = [Bottleneck(cin, planes, stride)] + [Bottleneck(planes * 4, planes) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*stage))
            cin = planes * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 2048, h/32, w/32)

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> RadImageNetResNet50:
        """``RadImageNet-ResNet50_notop.pth`` (Warvito/radimagenet-models) or the same keys as ``.safetensors``."""
        state = read_state_dict(path, "RadImageNet ResNet-50 weights")
        return load_checked(cls(), state, path, "RadImageNet ResNet-50")
