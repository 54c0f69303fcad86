"""The evaluation's trained feature networks: loading them, and features of volumes and texts.

The networks (``clip``: CT-CLIP-style, ``classifier``: 18 labels) are trained by
``ctgen.jobs.train``; here they are loaded in eval mode (EMA weights where present) and run
in batches over volumes in the model layout, in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ctgen.data.text import TextConditioning
from ctgen.models.classifier3d import Classifier3D
from ctgen.models.clip3d import CLIP3D
from ctprep.logs import progress


@dataclass
class FeatureNets:
    """The trained feature networks, in eval mode on one device (either may be absent)."""

    clip: CLIP3D | None = None
    classifier: Classifier3D | None = None


def _weights_dir(directory: str | Path, ema: bool) -> Path:
    directory = Path(directory)
    return directory / "ema" if ema and (directory / "ema" / "config.json").is_file() else directory


def load_feature_nets(clip_dir: str | Path | None = None, classifier_dir: str | Path | None = None,
                      device: str | torch.device = "cpu", ema: bool = True) -> FeatureNets:
    """Load the trained networks (their EMA weights when ``ema`` and present) for evaluation."""
    nets = FeatureNets()
    if clip_dir is not None:
        nets.clip = CLIP3D.from_pretrained(_weights_dir(clip_dir, ema)).to(device).eval()
    if classifier_dir is not None:
        nets.classifier = Classifier3D.from_pretrained(_weights_dir(classifier_dir, ema)).to(device).eval()
    return nets


def _chunks(volumes: list, batch_size: int) -> Iterator[torch.Tensor]:
    """Stacked (B, 1, D, H, W) float32 batches; volumes of differing shapes go one by one."""
    tensors = [torch.as_tensor(v["volume"] if isinstance(v, dict) else v) for v in volumes]
    for i in range(0, len(tensors), batch_size):
        part = tensors[i:i + batch_size]
        if all(t.shape == part[0].shape for t in part):
            yield torch.stack([t.float() for t in part])
        else:
            yield from (t.float()[None] for t in part)


@torch.no_grad()
def extract_features(nets: FeatureNets, volumes: list, batch_size: int = 2) -> dict[str, np.ndarray]:
    """Per-volume features of ``volumes`` ([{volume (1, D, H, W)}] or tensors), in [-1, 1], fp32.

    Returns float32 arrays, one row per volume, of what the loaded networks give:
    ``clip_features`` (N, F) and ``clip_embedding`` (N, E) (L2-normalised), ``classifier_features``
    (N, F) and ``probabilities`` (N, 18).
    """
    out: dict[str, list[torch.Tensor]] = {}
    for video in progress(_chunks(volumes, batch_size), total=-(-len(volumes) // batch_size), desc="features",
                          unit="batch"):
        if nets.clip is not None:
            video_ = video.to(next(nets.clip.parameters()).device)
            feats = nets.clip.volume_features(video_)
            out.setdefault("clip_features", []).append(feats.float().cpu())
            emb = torch.nn.functional.normalize(nets.clip.volume_proj(feats).float(), dim=-1)
            out.setdefault("clip_embedding", []).append(emb.cpu())
        if nets.classifier is not None:
            video_ = video.to(next(nets.classifier.parameters()).device)
            feats = nets.classifier.features(video_)
            out.setdefault("classifier_features", []).append(feats.float().cpu())
            probs = torch.sigmoid(nets.classifier.head(feats).float())
            out.setdefault("probabilities", []).append(probs.cpu())
    return {k: torch.cat(v).numpy() for k, v in out.items()}


@torch.no_grad()
def embed_texts(clip: CLIP3D, text: TextConditioning, keys: list[str], batch_size: int = 32) -> np.ndarray:
    """CLIP text embeddings (N, E), L2-normalised, of the texts ``text`` gives for ``keys``."""
    device = next(clip.parameters()).device
    rows = []
    for i in range(0, len(keys), batch_size):
        batch = {k: v.to(device) for k, v in text(list(keys[i:i + batch_size])).items()}
        rows.append(clip.encode_text(**batch).float().cpu())
    return torch.cat(rows).numpy()
