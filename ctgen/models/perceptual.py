"""Optional perceptual loss on CT slices: VGG16-style features, weights from a local file.

The network is defined here (torchvision is not a dependency) with torchvision's parameter names
(``features.<i>.weight``), so a converted torchvision/LPIPS VGG16 state dict loads as it is. The
loss is LPIPS without its learned linear heads: channel-normalised feature differences, squared,
averaged over the five ReLU stages. The module is frozen (no gradients to its weights, eval mode)
and is passed to the tokenizer, never registered in it, so it never enters a trained state_dict.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from einops import repeat
from safetensors.torch import load_file
from torch import nn

log = logging.getLogger(__name__)

# VGG16 "D" configuration: conv widths, "M" = 2x2 max-pool (torchvision's ``cfgs["D"]``)
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# indices in ``features`` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (LPIPS' taps)
TAPS = (3, 8, 15, 22, 29)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PerceptualLoss(nn.Module):
    """``PerceptualLoss(widths=VGG16, taps=TAPS)``; ``loss(pred, target)`` on slices (B, 1|3, H, W) in [-1, 1].

    Build it with :meth:`from_path` for real use; the constructor alone gives random weights.
    Memory: activations of a VGG16 over the slices given (about 15 MB per 128x128 slice in float32).
    """

    def __init__(self, widths: tuple = VGG16, taps: tuple[int, ...] = TAPS) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for w in widths:
            if w == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, int(w), 3, padding=1), nn.ReLU(inplace=False)]
                channels = int(w)
        self.features = nn.Sequential(*layers[: max(taps) + 1])
        self.taps = tuple(taps)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_path(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> PerceptualLoss:
        """Load VGG16 feature weights from a ``.safetensors`` file or a ``torch.save``d state dict.

        Keys may carry torchvision's ``features.`` prefix or not; nothing is unpickled
        (``weights_only=True``). Extra keys (e.g. a classifier head) are ignored; missing ones raise.
        """
        path = Path(path)
        if path.suffix == ".safetensors":
            state = load_file(path, device=str(map_location))
        else:
            state = torch.load(path, map_location=map_location, weights_only=True)
        state = {(k if k.startswith("features.") else f"features.{k}"): v for k, v in state.items()}
        model = cls()
        wanted = set(model.features.state_dict())
        given = {k[len("features."):]: v for k, v in state.items() if k[len("features."):] in wanted}
        missing = wanted - set(given)
        if missing:
            raise ValueError(f"{path}: perceptual weights lack {sorted(missing)}")
        model.features.load_state_dict(given)
        log.info("perceptual network loaded from %s (%d tensors)", path, len(given))
        return model.to(map_location)

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)  # always frozen

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over layers of the squared difference of unit-normalised features: a scalar."""
        x = self._features(pred)
        with torch.no_grad():
            y = self._features(target)
        terms = [(_unit(a) - _unit(b)).pow(2).sum(1).mean() for a, b in zip(x, y)]
        return torch.stack(terms).mean()

    forward = loss

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[1] == 1:
            x = repeat(x, "b 1 h w -> b c h w", c=3)  # grayscale CT -> the RGB the network expects
        x = ((x + 1) / 2 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out


def _unit(f: torch.Tensor) -> torch.Tensor:
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit norm over channels, as LPIPS
