"""The training jobs: every model of both the cascade and the evaluation, through the one loop.

``run_training(kind, cfg, out_dir, checkpoint_root)`` is what ``ctgen train KIND --config FILE``
calls (the config's shape is documented in ``ctgen.jobs.config``). Cascade models: the CT-ViT
``tokenizer``, the MaskGIT ``generator``, the ``superres`` diffusion model. Evaluation feature
networks: ``clip`` (CT-CLIP-style volume/text model) and ``classifier`` (18 labels); the classifier
also trains on generated volumes handed in directly (train on synthetic, test on real).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ctgen.data import batches
from ctgen.data.text import TextConditioning
from ctgen.jobs.config import config_hash

log = logging.getLogger(__name__)

CASCADE_MODELS = ("tokenizer", "generator", "superres")
EVAL_MODELS = ("clip", "classifier")  # the evaluation's feature networks, same loop
MODELS = CASCADE_MODELS + EVAL_MODELS
CORE = {"generator": "ctgen.models.maskgit.MaskGIT", "superres": "ctgen.models.superres_unet.SuperResDiffusion"}
POS_WEIGHT_MAX = 20.0  # cap of the automatic BCE positive weight: a label seen once must not dominate the loss


@dataclass(frozen=True)
class SliceData:
    """A superres preset's ``data`` options (the workflow adds the HU window, scale, prompt and paths)."""

    slices_per_volume: int = 4  # random axial slices per volume and epoch (seeded)


@dataclass(frozen=True)
class VolumeData:
    """A clip or classifier preset's ``data`` options (the workflow adds the HU window, prompt and paths)."""

    augment: batches.Augment = field(default_factory=batches.Augment)  # training-time augmentation


def hu_window(data: dict[str, Any]) -> tuple[float, float]:
    """The prep preset's HU window from a training config's ``data.hu_window``; named when absent."""
    window = data.get("hu_window")
    if window is None or len(window) != 2:
        raise ValueError("the training config needs data.hu_window: [low, high], the prep preset's HU `clip` window")
    return float(window[0]), float(window[1])


def build_model(kind: str, cfg: dict[str, Any]) -> torch.nn.Module:
    """The untrained cascade model of ``kind`` from a config's ``model`` (and ``text_encoder``) sections."""
    if kind == "tokenizer":
        from ctgen.models.ctvit import CTViT

        return CTViT(CTViT.config_from_dict(cfg["model"]))
    from ctgen.models.conditioned import ConditionedConfig, TextConditioned

    return TextConditioned(ConditionedConfig(core_class=CORE[kind], core=cfg["model"], text_encoder=cfg.get("text_encoder")))


def _text(data: dict, prompts: dict[str, str], max_length: int) -> TextConditioning:
    return TextConditioning(prompts, cache_path=data.get("text_cache"), tokenizer_path=data.get("text_tokenizer"),
                            max_length=max_length)


def _max_length(cfg: dict[str, Any]) -> int:
    return (cfg.get("text_encoder") or {}).get("max_length", cfg["data"].get("max_length", 128))


def run_training(kind: str, cfg: dict[str, Any], out_dir: str | Path, checkpoint_root: str | Path) -> Path:
    """Train one model from a config dict; returns the weights folder."""
    from ctgen.training.loop import TrainConfig, train

    if kind == "clip":
        return train_clip(cfg, out_dir, checkpoint_root)
    if kind == "classifier":
        return train_classifier(cfg, out_dir, checkpoint_root)
    if kind not in CASCADE_MODELS:
        raise ValueError(f"unknown model {kind!r}; one of {MODELS}")
    data, tcfg = cfg["data"], TrainConfig.from_dict(cfg["train"])
    if kind != "tokenizer":
        cfg = fit_text_dims(cfg)
    torch.manual_seed(tcfg.seed)  # the initial weights are part of the run's reproducibility
    model = build_model(kind, cfg)
    max_length = _max_length(cfg)
    scale = int(data.get("lowres_scale", 1))
    if kind == "tokenizer":
        make = batches.volume_batches(batches.load_volumes(data["manifests"], hu_window(data)), tcfg.batch_size, scale)
    elif kind == "generator":
        grids, prompts = batches.load_tokens(data["tokens"])
        make = batches.token_batches(grids, _text(data, prompts, max_length), tcfg.batch_size)
    else:
        volumes = batches.load_volumes(data["manifests"], hu_window(data), prompt=data.get("prompt"))
        recon = None
        if data.get("recon"):
            from safetensors.torch import load_file

            recon = load_file(data["recon"])
        prompts = {v["key"]: v["prompt"] for v in volumes}
        make = batches.slice_batches(volumes, _text(data, prompts, max_length), tcfg.batch_size, scale,
                                     int(data.get("slices_per_volume", SliceData.slices_per_volume)), recon)
    checkpoint_dir = Path(checkpoint_root) / config_hash(cfg)
    log.info("training %s: %d parameters; checkpoints in %s", kind, sum(p.numel() for p in model.parameters()), checkpoint_dir)
    return train(model, make, tcfg, out_dir, checkpoint_dir=checkpoint_dir,
                 extra_meta={"model_kind": kind, "data": {k: str(v) for k, v in data.items()}})


def fit_text_dims(cfg: dict[str, Any]) -> dict[str, Any]:
    """Make the model's text width (and the small encoder's vocabulary) match the text source.

    The presets name a text width for their default encoder; the width that counts is the one of the
    encoder actually configured (MiniLM 384, CXR-BERT 768, the small encoder's ``dim``).
    """
    cfg = {**cfg, "model": dict(cfg["model"])}
    data = cfg["data"]
    if cfg.get("text_encoder") is not None:
        from ctgen.models.text_encoders import ReportTokenizer, SmallTextEncoderConfig

        enc = dict(cfg["text_encoder"])
        if data.get("text_tokenizer"):
            enc["vocab_size"] = ReportTokenizer.load(data["text_tokenizer"]).vocab_size
        cfg["text_encoder"] = enc
        dim = enc.get("dim", SmallTextEncoderConfig.dim)
    elif data.get("text_cache"):
        from ctgen.data.text_cache import EmbeddingCache

        dim = EmbeddingCache(data["text_cache"]).dim
    else:
        raise ValueError("generator/superres/clip training needs a text source: text_cache, or text_tokenizer with text_encoder")
    if cfg["model"].get("text_dim") != dim:
        log.info("text width %s -> %d (the configured text encoder's)", cfg["model"].get("text_dim"), dim)
        cfg["model"]["text_dim"] = dim
    return cfg


# --- the evaluation's feature networks ------------------------------------------------------------


def label_pos_weight(labels: torch.Tensor, cap: float = POS_WEIGHT_MAX) -> tuple[float, ...]:
    """BCE positive weights negatives / positives per label of (N, labels), in [1, cap]; 1 where no positive."""
    pos = labels.float().sum(dim=0)
    neg = labels.shape[0] - pos
    weight = torch.where(pos > 0, neg / pos.clamp(min=1), torch.ones_like(pos)).clamp(1.0, cap)
    return tuple(round(float(w), 4) for w in weight)


def _run_hash(kind: str, cfg: dict[str, Any], volumes: list[dict] | None = None) -> str:
    """Checkpoints are resumed only by the same model, training, augmentation and training data.

    ``config_hash`` covers the config and the contents of the data files (the manifests hold every
    shard's sha256); volumes handed in directly (generated ones, for TSTR) are hashed by content.
    """
    h = hashlib.sha256(f"{kind}:{config_hash(cfg)}".encode())
    for v in volumes or []:
        h.update(v["key"].encode())
        h.update(torch.as_tensor(v["volume"]).numpy().tobytes())
        h.update(torch.as_tensor(v["labels"]).float().numpy().tobytes())
    return f"{kind}-{h.hexdigest()[:12]}"


def train_clip(cfg: dict[str, Any], out_dir: str | Path, checkpoint_root: str | Path) -> Path:
    """Train CLIP3D on the manifests' (volume, prompt) pairs; returns the weights folder."""
    from ctgen.models.clip3d import CLIP3D
    from ctgen.training.loop import TrainConfig

    data, tcfg = cfg["data"], TrainConfig.from_dict(cfg["train"])
    if tcfg.batch_size < 2:
        raise ValueError("CLIP training needs train.batch_size >= 2 (the other pairs are the negatives)")
    cfg = fit_text_dims(cfg)
    volumes = batches.load_volumes(data["manifests"], hu_window(data), prompt=data.get("prompt"))
    torch.manual_seed(tcfg.seed)  # the initial weights are part of the run's reproducibility
    model = CLIP3D(CLIP3D.config_from_dict({**cfg["model"], "text_encoder": cfg.get("text_encoder")}))
    text = _text(data, {v["key"]: v["prompt"] for v in volumes}, _max_length(cfg))
    make = batches.clip_batches(volumes, text, tcfg.batch_size, batches.Augment.from_data(data))
    return _train_feature_net(model, make, tcfg, cfg, out_dir, checkpoint_root, "clip", volumes)


def train_classifier(cfg: dict[str, Any], out_dir: str | Path, checkpoint_root: str | Path,
                     volumes: list[dict] | None = None) -> Path:
    """Train Classifier3D on the manifests' volumes and labels, or on ``volumes`` when given.

    ``volumes``: [{key, volume (1, D, H, W) in [-1, 1], labels (18,)}], e.g. generated volumes with
    the labels of their prompts (train on synthetic, test on real).
    """
    from ctgen.models.classifier3d import Classifier3D
    from ctgen.training.loop import TrainConfig

    data, tcfg = cfg["data"], TrainConfig.from_dict(cfg["train"])
    handed_in = volumes  # hashed by content for the checkpoint folder (no data file describes them)
    if volumes is None:
        volumes = batches.load_volumes(data["manifests"], hu_window(data), prompt=data.get("prompt"))
    model_cfg = dict(cfg["model"])
    if model_cfg.get("pos_weight") == "auto":
        model_cfg["pos_weight"] = label_pos_weight(torch.stack([torch.as_tensor(v["labels"]) for v in volumes]))
        log.info("automatic BCE pos_weight from %d volumes: %s", len(volumes), model_cfg["pos_weight"])
    cfg = {**cfg, "model": model_cfg}
    torch.manual_seed(tcfg.seed)
    model = Classifier3D(Classifier3D.config_from_dict(model_cfg))
    make = batches.classifier_batches(volumes, tcfg.batch_size, batches.Augment.from_data(data))
    return _train_feature_net(model, make, tcfg, cfg, out_dir, checkpoint_root, "classifier", volumes, handed_in)


def _train_feature_net(model, make, tcfg, cfg, out_dir, checkpoint_root, kind: str, volumes: list[dict],
                       handed_in: list[dict] | None = None) -> Path:
    from ctgen.training.loop import train

    checkpoint_dir = Path(checkpoint_root) / _run_hash(kind, cfg, handed_in)
    log.info("training %s: %d parameters on %d volumes; checkpoints in %s", kind,
             sum(p.numel() for p in model.parameters()), len(volumes), checkpoint_dir)
    meta = {"model_kind": kind, "n_volumes": len(volumes),
            "data": {k: str(v) for k, v in cfg["data"].items() if k != "volumes"}}
    return train(model, make, tcfg, out_dir, checkpoint_dir=checkpoint_dir, extra_meta=meta)
