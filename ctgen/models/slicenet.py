"""SliceNet: a small 2D CNN trained on real CT slices, the feature space of the 2D and 2.5D FID.

Why not the 3D classifier on a slice repeated through its depth stride (what the evaluation did
before): a 3D network never saw such inputs, so their features say little. Why not only ImageNet's
InceptionV3: it never saw CT, its weights cannot be downloaded here, and it stays an option
(``evaluation.inception_weights``) for comparison with published numbers.

Training objective (all targets come with every slice, no annotation needed):

* **plane** (axial, coronal, sagittal; 3-way cross-entropy) and **position** along the plane's axis
  (0 at the first slice, 1 at the last; L1, one output per plane): where a slice sits in the chest.
  A generated slice whose anatomy does not match any level of a real chest lands off the real
  feature distribution, which is what FID should detect.
* the volume's **18 abnormality labels** on each of its slices (BCE on the known labels): weak,
  since a finding is not visible on every slice, but it makes pathology part of the feature space.

Slices of any size (h, w) in [-1, 1] are resized (bilinear) to ``image_size`` squared; the pooled,
layer-normalised features of the last stage (``channels[-1]`` wide) are the FID features.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import reduce
from torch import nn

from ctgen.models.base import ModelOutput, PretrainedMixin

N_PLANES = 3  # axial, coronal, sagittal (ctgen.metrics.slices.PLANES order)


@dataclasses.dataclass(frozen=True)
class SliceNetConfig:
    """The slice network; demo and paper sizes live in config.yaml (``evaluation.slicenet``)."""

    image_size: int = 128  # slices are resized to image_size x image_size before the network
    channels: tuple[int, ...] = (32, 64, 128, 256)  # width of each stage; the last is the FID feature dimension
    blocks: tuple[int, ...] = (1, 1, 2, 2)  # residual blocks per stage (as many entries as channels)
    norm_groups: int = 8  # GroupNorm groups (every width must divide by it)
    num_labels: int = 18  # CT-RATE's abnormality labels, in ctprep.ctrate.LABELS order
    plane_weight: float = 1.0  # weight of the plane cross-entropy in the loss
    position_weight: float = 1.0  # weight of the position L1 in the loss
    label_weight: float = 1.0  # weight of the label BCE in the loss (0: no labels)
    dropout: float = 0.0  # dropout on the pooled features before the heads, in training

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if len(self.channels) != len(self.blocks) or not self.channels:
            raise ValueError(f"channels {self.channels} and blocks {self.blocks} need the same, non-zero length")
        bad = [c for c in self.channels if c % self.norm_groups]
        if bad:
            raise ValueError(f"widths {bad} do not divide by norm_groups {self.norm_groups}")
        if min(self.plane_weight, self.position_weight, self.label_weight) < 0 or not 0 <= self.dropout < 1:
            raise ValueError("loss weights must be >= 0 and dropout in [0, 1)")

    @property
    def feature_dim(self) -> int:
        return self.channels[-1]


@dataclass
class SliceNetOutput(ModelOutput):
    """``loss`` (weighted sum) and its terms."""

    plane_loss: torch.Tensor
    position_loss: torch.Tensor  # mean |predicted - true| position, in [0, 1] units
    label_loss: torch.Tensor
    plane_accuracy: torch.Tensor


def resize_slices(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, h, w) -> (B, 1, size, size), bilinear (antialiased when shrinking)."""
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected slices (B, 1, h, w), got {tuple(x.shape)}")
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class _Block(nn.Module):
    """Pre-activation residual block, starting as the identity (zero-initialised last conv)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(groups, channels), nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w)
        return x + self.conv2(F.gelu(self.norm2(self.conv1(F.gelu(self.norm1(x))))))


class SliceNet(nn.Module, PretrainedMixin):
    """``slices (B, 1, h, w)`` in [-1, 1] -> features (B, F); ``forward`` is the training step."""

    config_class = SliceNetConfig

    def __init__(self, config: SliceNetConfig):
        super().__init__()
        self.config = config
        c = config.channels
        layers: list[nn.Module] = [nn.Conv2d(1, c[0], 3, stride=2, padding=1)]  # (B, c0, S/2, S/2)
        for i, (width, n) in enumerate(zip(c, config.blocks)):
            if i > 0:
                layers += [nn.GroupNorm(config.norm_groups, c[i - 1]), nn.Conv2d(c[i - 1], width, 3, stride=2, padding=1)]
            layers += [_Block(width, config.norm_groups) for _ in range(n)]
        layers += [nn.GroupNorm(config.norm_groups, c[-1]), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.out_norm = nn.LayerNorm(config.feature_dim)
        self.drop = nn.Dropout(config.dropout)
        self.plane_head = nn.Linear(config.feature_dim, N_PLANES)
        self.position_head = nn.Linear(config.feature_dim, N_PLANES)  # one position per plane
        self.label_head = nn.Linear(config.feature_dim, config.num_labels)

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def features(self, slices: torch.Tensor) -> torch.Tensor:
        """(B, 1, h, w) in [-1, 1] -> (B, F): the FID features."""
        x = resize_slices(slices, self.config.image_size)  # (B, 1, S, S)
        pooled = reduce(self.body(x), "b c h w -> b c", "mean")  # (B, F)
        return self.out_norm(pooled)

    def forward(self, slices: torch.Tensor, plane: torch.Tensor, position: torch.Tensor, labels: torch.Tensor,
                step: int = 0) -> SliceNetOutput:
        """slices (B, 1, h, w), plane (B,) long in [0, 3), position (B,) in [0, 1], labels (B, L) with NaN unknown."""
        h = self.drop(self.features(slices))  # (B, F)
        plane_logits = self.plane_head(h).float()  # (B, 3)
        plane_loss = F.cross_entropy(plane_logits, plane)
        pos = torch.sigmoid(self.position_head(h).float()).gather(1, plane[:, None])[:, 0]  # (B,) the slice's plane
        position_loss = (pos - position.float()).abs().mean()
        known = ~torch.isnan(labels)  # (B, L)
        target = torch.nan_to_num(labels.float(), nan=0.0)
        terms = F.binary_cross_entropy_with_logits(self.label_head(h).float(), target, reduction="none")
        label_loss = (terms * known).sum() / known.sum().clamp(min=1)
        c = self.config
        loss = c.plane_weight * plane_loss + c.position_weight * position_loss + c.label_weight * label_loss
        with torch.no_grad():
            accuracy = (plane_logits.argmax(dim=1) == plane).float().mean()
        return SliceNetOutput(loss=loss, plane_loss=plane_loss.detach(), position_loss=position_loss.detach(),
                              label_loss=label_loss.detach(), plane_accuracy=accuracy)
