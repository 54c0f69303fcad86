"""A small 3D convolutional volume encoder shared by the evaluation feature networks.

CT-CLIP embeds volumes with a CT-ViT; CT-Net classifies them with a 3D CNN. The evaluation only
needs a stable, trainable 3D feature space, so both of ours (``CLIP3D``, ``Classifier3D``) use the
same pre-activation residual 3D CNN: a patchify stem (kernel = stride), stages of residual
3x3x3 blocks with a stride-2 convolution between stages, GroupNorm (batch-size independent), and
global average pooling to one feature vector per volume.

Input ``video (B, 1, D, H, W)`` in [-1, 1]; any D, H, W >= 1: sizes that are not multiples of the
stem stride are padded by replicating the last slice/row/column (as CT-ViT pads its last tubelet),
and the stride-2 convolutions round up, so the demo grid (1, 32, 64, 64), GenerateCT's
(1, 201, 128, 128) and CT-CLIP's (1, 240, 480, 480) all pass.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from einops import reduce
from torch import nn


@dataclasses.dataclass(frozen=True)
class VolumeEncoderConfig:
    """The encoder's fields; ``CLIP3DConfig`` and ``ClassifierConfig`` inherit them (flat in JSON)."""

    in_channels: int = 1  # image channels (CT: 1)
    stem_stride: tuple[int, int, int] = (2, 8, 8)  # patchify stem kernel = stride (D, H, W): 240x480^2 -> 120x60^2
    channels: tuple[int, ...] = (64, 128, 256, 512)  # width of each stage; a stride-2 conv sits between stages
    blocks: tuple[int, ...] = (2, 2, 2, 2)  # residual blocks per stage (len must equal len(channels))
    norm_groups: int = 8  # GroupNorm groups (every stage width must divide by it)
    dropout: float = 0.0  # dropout on the pooled features during training

    def __post_init__(self) -> None:
        if len(self.stem_stride) != 3 or min(self.stem_stride) < 1:
            raise ValueError(f"stem_stride must be three positive ints (D, H, W), got {self.stem_stride}")
        if len(self.channels) != len(self.blocks) or not self.channels:
            raise ValueError(f"channels {self.channels} and blocks {self.blocks} need the same, non-zero length")
        bad = [c for c in self.channels if c % self.norm_groups]
        if bad:
            raise ValueError(f"stage widths {bad} do not divide by norm_groups {self.norm_groups}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")

    @property
    def feature_dim(self) -> int:
        """Width of the pooled features (the last stage's)."""
        return self.channels[-1]


def encoder_fields(config) -> VolumeEncoderConfig:
    """The encoder part of a config that inherits :class:`VolumeEncoderConfig`."""
    names = {f.name for f in dataclasses.fields(VolumeEncoderConfig)}
    return VolumeEncoderConfig(**{k: v for k, v in dataclasses.asdict(config).items() if k in names})


class _ResBlock(nn.Module):
    """Pre-activation residual block: x + conv(act(norm(conv(act(norm(x))))))."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(groups, channels), nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable deep training
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, d, h, w)
        h = self.conv1(F.gelu(self.norm1(x)))
        return x + self.conv2(F.gelu(self.norm2(h)))


class VolumeEncoder(nn.Module):
    """``video (B, C, D, H, W)`` -> pooled features ``(B, F)`` (or the feature map, ``feature_map``)."""

    def __init__(self, config: VolumeEncoderConfig):
        super().__init__()
        self.config = config
        c0 = config.channels[0]
        self.stem = nn.Conv3d(config.in_channels, c0, kernel_size=config.stem_stride, stride=config.stem_stride)
        layers: list[nn.Module] = []
        for i, (width, n) in enumerate(zip(config.channels, config.blocks)):
            if i > 0:  # stride 2 with padding 1 rounds up: odd sizes (and size 1) pass
                layers.append(nn.GroupNorm(config.norm_groups, config.channels[i - 1]))
                layers.append(nn.Conv3d(config.channels[i - 1], width, 3, stride=2, padding=1))
            layers.extend(_ResBlock(width, config.norm_groups) for _ in range(n))
        self.stages = nn.Sequential(*layers)
        self.norm = nn.GroupNorm(config.norm_groups, config.feature_dim)
        self.out_norm = nn.LayerNorm(config.feature_dim)
        self.drop = nn.Dropout(config.dropout)

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def pad_to_stride(self, video: torch.Tensor) -> torch.Tensor:
        """Replicate the last slice/row/column until D, H, W are multiples of the stem stride."""
        if video.ndim != 5 or video.shape[1] != self.config.in_channels:
            raise ValueError(f"expected video (B, {self.config.in_channels}, D, H, W), got {tuple(video.shape)}")
        pad = [(-n) % s for n, s in zip(video.shape[2:], self.config.stem_stride)]  # D, H, W
        if not any(pad):
            return video
        return F.pad(video, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")

    def feature_map(self, video: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, F, d, h, w), the last stage's normalised activations."""
        # memory: the stem output is B x channels[0] x (D H W / prod(stem_stride)) activations, the largest tensor
        x = self.stages(self.stem(self.pad_to_stride(video)))
        return F.gelu(self.norm(x))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, F): global average pool of the feature map, layer-normalised."""
        pooled = reduce(self.feature_map(video), "b f d h w -> b f", "mean")  # (B, F)
        return self.drop(self.out_norm(pooled))
