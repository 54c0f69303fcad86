"""The training jobs of the latent flow family: MAISI's autoencoder, and the latent rectified-flow network.

Configs have the shape of ``ctgen.jobs.config``'s. The autoencoder trains on random crops of the
volume shards (``data.patch_size``), or, with ``maisi_checkpoint`` in its config, is NVIDIA's released
MAISI CT autoencoder loaded from that local file (nothing is trained; the same architecture settings
are required, and a mismatch names the first differing keys). The flow network trains on the latent
shards of ``encode_latents`` (``data.latents``): its latent scale factor is computed from the shards'
moments and stored in its config, and the autoencoder that made the latents is recorded.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ctgen.data import batches
from ctgen.jobs.config import config_hash, data_manifests, hu_window

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoencoderData:
    """An autoencoder preset's ``data`` options (the workflow adds the HU window and the shards)."""

    patch_size: tuple[int, int, int] | None = None  # (D, H, W) random training crops; None: whole volumes


@dataclass(frozen=True)
class LatentFlowData:
    """A flow network preset's ``data`` options (the workflow adds the latents, text and prompt)."""

    text_probe_latents: int = 64  # training latents the text-reliance probe job scores (0: no probe)
    #                               and as many held-out ones where data.probe_latents names their manifests


#: the HU window NVIDIA's MAISI CT autoencoder was trained on (mapped to its value_range [0, 1])
NVIDIA_HU_WINDOW = (-1000.0, 1000.0)


def _stream(data: dict[str, Any]) -> dict[str, Any]:
    return {"buffer": int(data.get("shuffle_buffer", 16)), "verify": bool(data.get("verify_shards", True))}


def train_autoencoder(cfg: dict[str, Any], out_dir: str | Path, checkpoint_root: str | Path) -> Path:
    """Train MAISI's autoencoder on volume crops, or load NVIDIA's weights (``maisi_checkpoint``)."""
    from ctgen.models.autoencoder import MaisiAutoencoder
    from ctgen.training.loop import TrainConfig, train

    data = cfg["data"]
    model_cfg = MaisiAutoencoder.config_from_dict(cfg["model"])
    if cfg.get("maisi_checkpoint"):
        window = tuple(float(v) for v in hu_window(data))
        if window != NVIDIA_HU_WINDOW:  # their encoder would read every intensity shifted and scaled, unsaid
            raise ValueError(f"maisi_checkpoint: NVIDIA's autoencoder was trained on HU {list(NVIDIA_HU_WINDOW)} "
                             f"mapped to [0, 1], but the prep preset clips to {list(window)}: use a preset that "
                             "clips to [-1000, 1000]")
        # seeded: the discriminator (adv_weight > 0) is not in NVIDIA's file and is saved as built, so the same
        # checkpoint must give the same weights file (its hash names the autoencoder in every later record)
        torch.manual_seed(0)
        model = MaisiAutoencoder(model_cfg).load_maisi_checkpoint(cfg["maisi_checkpoint"])
        model.save_pretrained(out_dir, model_kind="autoencoder", weights_from=str(cfg["maisi_checkpoint"]),
                              licence="NVIDIA Open Model License (the MAISI CT autoencoder's weights)")
        log.info("autoencoder: NVIDIA's MAISI weights from %s, saved to %s", cfg["maisi_checkpoint"], out_dir)
        return Path(out_dir)
    tcfg = TrainConfig.from_dict(cfg["train"])
    patch = data.get("patch_size")
    torch.manual_seed(tcfg.seed)
    model = MaisiAutoencoder(model_cfg)
    make = batches.streamed(data_manifests(data, "manifests"), batches.volume_decode(hu_window(data)),
                            batches.autoencoder_collate(tuple(patch) if patch else None), **_stream(data))
    checkpoint_dir = Path(checkpoint_root) / config_hash(cfg, "autoencoder")
    log.info("training autoencoder: %d parameters on %d volumes; checkpoints in %s",
             sum(p.numel() for p in model.parameters()), make.n_samples, checkpoint_dir)
    return train(model, make, tcfg, out_dir, checkpoint_dir=checkpoint_dir,
                 extra_meta={"model_kind": "autoencoder", "n_samples": make.n_samples,
                             "data": {k: str(v) for k, v in data.items()}})


def flow_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The flow model's config with what the data decides: the latent scale factor (from the latent
    shards' moments), the small text encoder's vocabulary (from its fitted tokenizer) and, with frozen
    encoders, their state widths (from their caches: a preset names CXR-BERT's 768, MiniLM gives 384) and the
    context rows a section needs (their longest ``max_length``: a longer cached section failed mid-training)."""
    from ctgen.jobs.latents import latent_scale_factor

    data = cfg["data"]
    model = dict(cfg["model"])
    model["scale_factor"] = latent_scale_factor(data_manifests(data, "latents"))
    if cfg.get("text_encoder") is not None:
        from ctgen.models.text_encoders import ReportTokenizer

        enc = dict(cfg["text_encoder"])
        if data.get("text_tokenizer"):
            enc["vocab_size"] = ReportTokenizer.load(data["text_tokenizer"]).vocab_size
        model["text_encoder"] = enc
        model["max_text_tokens"] = max(int(model.get("max_text_tokens", 0)), int(enc.get("max_length", 128)))
    elif data.get("text_cache"):
        from ctgen.data.text_cache import EmbeddingCache

        caches = data["text_cache"] if isinstance(data["text_cache"], list) else [data["text_cache"]]
        opened = [EmbeddingCache(c) for c in caches]
        dims = [c.dim for c in opened]
        if list(model.get("text_dims") or []) != dims:
            log.info("text widths %s -> %s (the configured encoders' caches)", model.get("text_dims"), dims)
            model["text_dims"] = dims
        longest = max(c.max_length for c in opened)
        if model.get("text_pooling", "tokens") == "tokens" and int(model.get("max_text_tokens", 128)) < longest:
            log.info("text rows per section %s -> %d (the caches' max_length)", model.get("max_text_tokens"), longest)
            model["max_text_tokens"] = longest
    return {**cfg, "model": model}


def train_latent_flow(cfg: dict[str, Any], out_dir: str | Path, checkpoint_root: str | Path) -> Path:
    """Train the latent rectified-flow network on latent shards, conditioned on the report sections."""
    from ctgen.jobs.latents import latent_producer
    from ctgen.models.latent_flow import LatentFlow
    from ctgen.training.loop import TrainConfig, train

    cfg = flow_config(cfg)
    data, tcfg = cfg["data"], TrainConfig.from_dict(cfg["train"])
    latents = data_manifests(data, "latents")
    torch.manual_seed(tcfg.seed)
    model = LatentFlow(LatentFlow.config_from_dict(cfg["model"]))
    make = _latent_batches(latents, data, model.config)
    checkpoint_dir = Path(checkpoint_root) / config_hash(cfg)
    log.info("training latent_flow: %d parameters on %d latents (scale factor %.5g); checkpoints in %s",
             sum(p.numel() for p in model.parameters()), make.n_samples, model.config.scale_factor, checkpoint_dir)
    out = train(model, make, tcfg, out_dir, checkpoint_dir=checkpoint_dir,
                extra_meta={"model_kind": "latent_flow", "n_samples": make.n_samples,
                            "latents_from": latent_producer(latents),
                            "data": {k: str(v) for k, v in data.items()}})
    return out


def _latent_batches(manifests: list[str], data: dict[str, Any], model_config) -> Callable:
    """Batches of the latents of ``manifests`` with their report sections, encoded as the flow network
    (``model_config``, a ``LatentFlow`` config) reads them: the small encoder's tokens or the frozen
    encoders' cached states."""
    if model_config.text_encoder is not None:
        if not data.get("text_tokenizer"):
            raise ValueError("latent_flow with the small text encoder needs data.text_tokenizer")
        encode = batches.SectionTokens(data["text_tokenizer"], int(model_config.text_encoder.get("max_length", 128)))
    else:
        if not data.get("text_cache"):
            raise ValueError("latent_flow with frozen text encoders needs data.text_cache (embed-sections)")
        caches = data["text_cache"] if isinstance(data["text_cache"], list) else [data["text_cache"]]
        encode = batches.SectionStates(caches)
    make = batches.streamed(manifests, batches.latent_decode(data.get("prompt")),
                            batches.latent_flow_collate(model_config.segments, encode), **_stream(data))
    if isinstance(encode, batches.SectionStates):  # every section read from the caches, checked before the first step
        for cache in encode.caches:
            cache.require([f"{k}:{seg}" for k in make.keys for seg in model_config.segments])
    return make


def probe_latent_flow(cfg: dict[str, Any], model_dir: str | Path, out: str | Path) -> Path:
    """The text-reliance probe of the flow network trained with ``cfg`` (its training config, with the
    latents and text it trained on) and saved in ``model_dir``: ``out`` (a JSON list of metric records).
    On up to ``data.text_probe_latents`` of its training latents and, where ``data.probe_latents`` names
    held-out latent manifests (the workflow's evaluation split), as many of those.

    A job of its own (``ctgen probe-latent-flow``), after training: the held-out latents are an input of
    the probe, never of the training, so a change of the evaluation split re-probes and does not retrain.
    The batches, batch size, seed and device are the training config's, as when training ran the probe."""
    from ctgen.jobs.latents import latent_producer
    from ctgen.models.latent_flow import LatentFlow
    from ctgen.training.loop import TrainConfig

    data, tcfg = cfg["data"], TrainConfig.from_dict(cfg["train"])
    latents = data_manifests(data, "latents")
    saved = json.loads((Path(model_dir) / "config.json").read_text())
    model_config = LatentFlow.config_from_dict(saved["config"])
    make = _latent_batches(latents, data, model_config)
    heldout = None
    if data.get("probe_latents"):  # the evaluation split's latents: read by the probe only, never trained on
        probe = data_manifests(data, "probe_latents")
        latent_producer([*latents, *probe])  # one autoencoder for both sets
        heldout = _latent_batches(probe, data, model_config)
    n_probe = int(data.get("text_probe_latents", LatentFlowData.text_probe_latents))
    return probe_text_reliance(model_dir, make, n_probe, max(2, tcfg.batch_size), tcfg.device, tcfg.seed, heldout,
                               out=out)


def probe_text_reliance(model_dir: str | Path, make, max_latents: int = 64, batch_size: int = 16,
                        device: str = "auto", seed: int = 0, heldout=None, out: str | Path | None = None) -> Path:
    """The trained flow network in ``model_dir`` (its EMA weights, as sampling uses): does it read the
    report (``ctgen.jobs.text_reliance``)? On the training latents of ``make`` and, where ``heldout``
    makes batches of latents it never trained on, on those. Written to ``out`` (default:
    ``text_reliance.json`` beside the weights); also logged. ``max_latents`` 0: an empty list."""
    from ctgen.jobs.text_reliance import text_reliance
    from ctgen.models.latent_flow import LatentFlow
    from ctgen.pipelines.spec import load_network
    from ctgen.training.distributed import resolve_device
    from ctgen.training.loop import BatchContext
    from ctprep.volume import atomic_write

    model_dir = Path(model_dir)
    values = []
    if max_latents:
        dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
        model = load_network(model_dir, LatentFlow, dev)
        ctx = BatchContext(rank=0, world_size=1, epoch=0, seed=seed, device=dev, batch_size=batch_size, num_workers=0)
        values = text_reliance(model, make(ctx), max_latents=max_latents, seed=seed)
        if heldout is not None:
            values += text_reliance(model, heldout(ctx), max_latents=max_latents, seed=seed, heldout=True)
    path = Path(out) if out is not None else model_dir / "text_reliance.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: Path(p).write_text(json.dumps([m.to_json() for m in values], indent=2) + "\n"))
    return path

