"""CT-Net (Draelos et al., Med. Image Anal. 2021) as the VLM3D FVD_CTNet feature network.

Source: forithmus/VLM3D-Dockers, ``ctgen_evaluation/FVD/ctnet/models/custom_models_ctnet.py`` (the
VLM3D variant of Draelos' ``CTNetModel``) and ``FVD/fvd_pytorch.py`` (how it is called):

* input (B, 402, 420, 420): the volume is cut into 134 slabs of 3 consecutive slices, each slab an
  "RGB" image for an ImageNet ResNet-18 (``x.view(B*134, 3, 420, 420)``) -> (B*134, 512, 14, 14);
* ``reducingconvs``: three 3D convs over (slab, y, x) with 134 -> 64 -> 32 -> 16 channels ->
  (B, 16, 18, 5, 5) = 7200 features;
* ``classifier``: Linear 7200 -> 128, ReLU, Dropout, Linear 128 -> 96, ReLU, Dropout, Linear 96 -> 18.
  The VLM3D forward stops after the second ReLU/Dropout: **96 ReLU'd features** (the penultimate layer),
  dropout being the identity in eval mode;
* intensities: ``prepare_ctvol_2019_10_dataset(v, [-1000, 200], ...)`` clips HU to [-1000, 200], maps
  them to [0, 1] and subtracts 0.449 (the ImageNet mean); :meth:`CTNet.forward` takes HU and does that.

The checkpoint (``CTNet28_ctclip_whole_data_18classes``) is ``{'params': state dict}`` with DataParallel's
``module.`` prefix, which ``fvd_pytorch.compute_fvd`` strips; the copy committed to the VLM3D repository
is truncated (840,000 bytes), so the weights are not public. Local path: ``evaluation.vlm3d.ctnet_weights``.
"""

from __future__ import annotations

import os

import torch
from einops import rearrange
from torch import nn

from ctgen.models.backbones.loading import load_checked, read_state_dict, strip_prefix
from ctgen.models.backbones.resnet import resnet18_features

SLABS, SIDE = 134, 420  # 402 slices = 134 slabs of 3; the ResNet sees 420 x 420
WINDOW = (-1000.0, 200.0)  # CT-Net's own HU window (its 2019_10 dataset preparation)
IMAGENET_MEAN = 0.449  # subtracted after the window maps HU to [0, 1]


class CTNet(nn.Module):
    """(B, 402, 420, 420) HU -> (B, 96) penultimate CT-Net features (ReLU'd)."""

    def __init__(self, n_outputs: int = 18):
        super().__init__()
        self.features = resnet18_features()
        self.reducingconvs = nn.Sequential(
            nn.Conv3d(SLABS, 64, kernel_size=(3, 3, 3), stride=(3, 1, 1)), nn.ReLU(),
            nn.Conv3d(64, 32, kernel_size=(3, 3, 3), stride=(3, 1, 1)), nn.ReLU(),
            nn.Conv3d(32, 16, kernel_size=(3, 2, 2), stride=(3, 2, 2)), nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * 18 * 5 * 5, 128), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(128, 96), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(96, n_outputs),  # the 18-label head: loaded, not used for the features
        )

    @staticmethod
    def normalise(hu: torch.Tensor) -> torch.Tensor:
        """HU -> CT-Net's input values: clip to [-1000, 200], map to [0, 1], subtract 0.449."""
        lo, hi = WINDOW
        return (hu.float().clamp(lo, hi) - lo) / (hi - lo) - IMAGENET_MEAN

    def forward(self, hu: torch.Tensor) -> torch.Tensor:
        if hu.ndim != 4 or tuple(hu.shape[1:]) != (3 * SLABS, SIDE, SIDE):
            raise ValueError(f"CT-Net takes (B, {3 * SLABS}, {SIDE}, {SIDE}) volumes, got {tuple(hu.shape)}")
        b = hu.shape[0]
        x = rearrange(self.normalise(hu), "b (s c) h w -> (b s) c h w", c=3)  # (B*134, 3, 420, 420) slabs
        x = self.features(x)  # (B*134, 512, 14, 14)
        x = rearrange(x, "(b s) c h w -> b s c h w", b=b)  # (B, 134, 512, 14, 14): slabs are the conv channels
        x = self.reducingconvs(x)  # (B, 16, 18, 5, 5)
        x = self.classifier[:6](x.reshape(b, -1))  # (B, 96) after ReLU (dropout: identity in eval)
        return x

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> CTNet:
        """The VLM3D checkpoint (``{'params': ...}``, ``module.`` prefixes) or a plain state dict / safetensors."""
        raw = read_state_dict(path, "CT-Net weights")
        state = raw.get("params", raw) if isinstance(raw.get("params"), dict) else raw
        return load_checked(cls(), strip_prefix(state, "module."), path, "CT-Net")
