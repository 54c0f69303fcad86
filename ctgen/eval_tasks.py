"""The evaluation's feature networks: training jobs (``train_clip``, ``train_classifier``) and feature extraction.

Both train through the one loop (``ctgen.train.train``) from a config of the same shape as the
cascade's (``ctgen/tasks.py``)::

    model: {...}          # CLIP3DConfig / ClassifierConfig fields; classifier ``pos_weight: auto`` = from label counts
    text_encoder: {...}   # clip only: SmallTextEncoderConfig fields to train one jointly; absent: cached states
    train: {...}          # TrainConfig fields
    data:
      manifests: [...]    # shard manifests of the (real) training split
      text_tokenizer: PATH  # clip: the small encoder's tokenizer (or text_cache: PATH, a frozen encoder's states)
      prompt: generatect  # which prompt template is the text side
      augment: {flip_w: false, intensity: 0.05}  # see Augment

Volumes come from the shards at their stored grid, in [-1, 1] (``datasets.hu_to_unit``), with their
18 labels (``datasets.load_volumes``). ``PRESETS`` holds the demo/paper configs as plain data.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctgen import datasets
from ctgen.models.classifier3d import Classifier3D
from ctgen.models.clip3d import CLIP3D

log = logging.getLogger(__name__)

POS_WEIGHT_MAX = 20.0  # cap of the automatic BCE positive weight: a label seen once must not dominate the loss
_TRAIN_DEMO = {"batch_size": 4, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 20, "weight_decay": 0.05,
               "ckpt_every": 50, "log_every": 10, "seed": 0}
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # ~20 volumes of (1, 32, 64, 64): about a minute each on 2 CPU cores
    "demo": {
        "clip": {"model": {"stem_stride": [2, 4, 4], "channels": [16, 32, 64], "blocks": [1, 1, 1], "norm_groups": 8,
                           "embed_dim": 64, "text_dim": 32},
                 "text_encoder": {"dim": 32, "depth": 1, "heads": 2, "dropout": 0.1, "max_length": 64},
                 "train": {**_TRAIN_DEMO, "max_steps": 300}, "data": {"augment": {"flip_w": False, "intensity": 0.05}}},
        "classifier": {"model": {"stem_stride": [2, 4, 4], "channels": [16, 32, 64], "blocks": [1, 1, 1],
                                 "norm_groups": 8, "head_dropout": 0.1, "pos_weight": "auto"},
                       "train": {**_TRAIN_DEMO, "max_steps": 300},
                       "data": {"augment": {"flip_w": True, "intensity": 0.05}}},
    },
    # CT-CLIP / CT-Net-like sizes on the 480^2 x 240 grid (GPUs; documentation of the intended scale)
    "paper": {
        "clip": {"model": {"embed_dim": 512, "text_dim": 768}, "train": {"batch_size": 8, "lr": 1e-4, "min_lr": 1e-5,
                                                                         "warmup_steps": 1000, "max_steps": 50_000},
                 "data": {"augment": {"flip_w": False, "intensity": 0.05}}},
        "classifier": {"model": {"pos_weight": "auto"}, "train": {"batch_size": 8, "lr": 1e-4, "min_lr": 1e-5,
                                                                 "warmup_steps": 1000, "max_steps": 30_000},
                       "data": {"augment": {"flip_w": True, "intensity": 0.05}}},
    },
}


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation, seeded per epoch from the loop's context."""

    flip_w: bool = False  # flip left-right (W) with p = 0.5; off for CLIP: reports name sides ("right effusion")
    intensity: float = 0.0  # x * (1 + a) + b with a, b ~ U(-intensity, intensity), clipped to [-1, 1]

    def __call__(self, video: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """(B, 1, D, H, W) -> augmented copy (draws from ``gen`` even when off, keeping streams aligned)."""
        b = video.shape[0]
        flip = torch.rand(b, generator=gen) < 0.5  # (B,)
        scale_shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * self.intensity  # (B, 2)
        if self.flip_w and flip.any():
            video = torch.where(flip.view(b, 1, 1, 1, 1), video.flip(-1), video)
        if self.intensity > 0:
            a, c = scale_shift[:, 0].view(b, 1, 1, 1, 1), scale_shift[:, 1].view(b, 1, 1, 1, 1)
            video = (video * (1 + a) + c).clamp(-1, 1)
        return video

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Augment:
        return cls(**(data.get("augment") or {}))


def _video_batches(volumes: list[dict], batch_size: int, augment: Augment, extra):
    """make_batches: this rank's {"video": (B, 1, D, H, W) augmented, **extra(chosen volumes)} per epoch."""

    def make(ctx) -> Iterator[dict]:
        gen = ctx.generator()
        order = datasets._rank_order(len(volumes), ctx, batch_size)
        for i in range(0, len(order), batch_size):
            chosen = [volumes[j] for j in order[i:i + batch_size]]
            video = augment(torch.stack([v["volume"].float() for v in chosen]), gen)
            yield {"video": video, **extra(chosen)}

    return make


def clip_batches(volumes: list[dict], text: datasets.TextConditioning, batch_size: int, augment: Augment):
    """make_batches for CLIP3D: {"video": (B, 1, D, H, W), text_ids | text, "text_mask"}."""
    return _video_batches(volumes, batch_size, augment, lambda chosen: text([v["key"] for v in chosen]))


def classifier_batches(volumes: list[dict], batch_size: int, augment: Augment):
    """make_batches for Classifier3D: {"video": (B, 1, D, H, W), "labels": (B, 18)}."""
    return _video_batches(volumes, batch_size, augment, lambda chosen: {
        "labels": torch.stack([torch.as_tensor(v["labels"]).float() for v in chosen])})


def label_pos_weight(labels: torch.Tensor, cap: float = POS_WEIGHT_MAX) -> tuple[float, ...]:
    """BCE positive weights negatives / positives per label of (N, labels), in [1, cap]; 1 where no positive."""
    pos = labels.float().sum(dim=0)
    neg = labels.shape[0] - pos
    weight = torch.where(pos > 0, neg / pos.clamp(min=1), torch.ones_like(pos)).clamp(1.0, cap)
    return tuple(round(float(w), 4) for w in weight)


def _run_hash(kind: str, cfg: dict[str, Any], volumes: list[dict] | None = None) -> str:
    """Checkpoints are resumed only by the same model, training, augmentation and training data.

    ``tasks.config_hash`` covers the config and the contents of the data files (the manifests hold
    every shard's sha256); volumes handed in directly (generated ones, for TSTR) are hashed by content.
    """
    from ctgen.tasks import config_hash

    h = hashlib.sha256(f"{kind}:{config_hash(cfg)}".encode())
    for v in volumes or []:
        h.update(v["key"].encode())
        h.update(torch.as_tensor(v["volume"]).numpy().tobytes())
        h.update(torch.as_tensor(v["labels"]).float().numpy().tobytes())
    return f"{kind}-{h.hexdigest()[:12]}"


def train_clip(cfg: dict[str, Any], out_dir: str | Path, checkpoint_root: str | Path) -> Path:
    """Train CLIP3D on the manifests' (volume, prompt) pairs; returns the weights folder."""
    from ctgen.tasks import _fit_text_dims
    from ctgen.train import TrainConfig

    data, tcfg = cfg["data"], TrainConfig.from_dict(cfg["train"])
    if tcfg.batch_size < 2:
        raise ValueError("CLIP training needs train.batch_size >= 2 (the other pairs are the negatives)")
    cfg = _fit_text_dims(cfg)
    volumes = datasets.load_volumes(data["manifests"], prompt=data.get("prompt"))
    torch.manual_seed(tcfg.seed)  # the initial weights are part of the run's reproducibility
    model = CLIP3D(CLIP3D.config_from_dict({**cfg["model"], "text_encoder": cfg.get("text_encoder")}))
    max_length = (cfg.get("text_encoder") or {}).get("max_length", data.get("max_length", 128))
    text = datasets.TextConditioning({v["key"]: v["prompt"] for v in volumes}, cache_path=data.get("text_cache"),
                                     tokenizer_path=data.get("text_tokenizer"), max_length=max_length)
    make = clip_batches(volumes, text, tcfg.batch_size, Augment.from_data(data))
    return _train(model, make, tcfg, cfg, out_dir, checkpoint_root, "clip", volumes)


def train_classifier(cfg: dict[str, Any], out_dir: str | Path, checkpoint_root: str | Path,
                     volumes: list[dict] | None = None) -> Path:
    """Train Classifier3D on the manifests' volumes and labels, or on ``volumes`` when given.

    ``volumes``: [{key, volume (1, D, H, W) in [-1, 1], labels (18,)}], e.g. generated volumes with
    the labels of their prompts (train on synthetic, test on real).
    """
    from ctgen.train import TrainConfig

    data, tcfg = cfg["data"], TrainConfig.from_dict(cfg["train"])
    handed_in = volumes  # hashed by content for the checkpoint folder (no data file describes them)
    if volumes is None:
        volumes = datasets.load_volumes(data["manifests"], prompt=data.get("prompt"))
    model_cfg = dict(cfg["model"])
    if model_cfg.get("pos_weight") == "auto":
        model_cfg["pos_weight"] = label_pos_weight(torch.stack([torch.as_tensor(v["labels"]) for v in volumes]))
        log.info("automatic BCE pos_weight from %d volumes: %s", len(volumes), model_cfg["pos_weight"])
    cfg = {**cfg, "model": model_cfg}
    torch.manual_seed(tcfg.seed)
    model = Classifier3D(Classifier3D.config_from_dict(model_cfg))
    make = classifier_batches(volumes, tcfg.batch_size, Augment.from_data(data))
    return _train(model, make, tcfg, cfg, out_dir, checkpoint_root, "classifier", volumes, handed_in)


def _train(model, make, tcfg, cfg, out_dir, checkpoint_root, kind: str, volumes: list[dict],
           handed_in: list[dict] | None = None) -> Path:
    from ctgen.train import train

    checkpoint_dir = Path(checkpoint_root) / _run_hash(kind, cfg, handed_in)
    log.info("training %s: %d parameters on %d volumes; checkpoints in %s", kind,
             sum(p.numel() for p in model.parameters()), len(volumes), checkpoint_dir)
    meta = {"model_kind": kind, "n_volumes": len(volumes),
            "data": {k: str(v) for k, v in cfg["data"].items() if k != "volumes"}}
    return train(model, make, tcfg, out_dir, checkpoint_dir=checkpoint_dir, extra_meta=meta)


# ---------------------------------------------------------------------------------------------
# loading and feature extraction


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
    for video in _chunks(volumes, batch_size):
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
def embed_texts(clip: CLIP3D, text: datasets.TextConditioning, keys: list[str], batch_size: int = 32) -> np.ndarray:
    """CLIP text embeddings (N, E), L2-normalised, of the texts ``text`` gives for ``keys``."""
    device = next(clip.parameters()).device
    rows = []
    for i in range(0, len(keys), batch_size):
        batch = {k: v.to(device) for k, v in text(list(keys[i:i + batch_size])).items()}
        rows.append(clip.encode_text(**batch).float().cpu())
    return torch.cat(rows).numpy()


def preset(kind: str, name: str = "demo") -> dict[str, Any]:
    """A deep copy of ``PRESETS[name][kind]`` (kind: clip | classifier) to fill ``data`` into."""
    return json.loads(json.dumps(PRESETS[name][kind]))


__all__ = ["Augment", "FeatureNets", "PRESETS", "classifier_batches", "clip_batches", "embed_texts",
           "extract_features", "label_pos_weight", "load_feature_nets", "preset",
           "train_classifier", "train_clip"]
