"""Will a model preset run here? One training step of each model at its real geometry, and a short sample.

The step is the training loop's own (``accumulate_gradients``, ``build_optimizer`` with the fused
AdamW kernel on CUDA, bf16 autocast on CUDA, gradient clipping) on a synthetic batch of the sizes the
geometry contract derives from the config (``ctgen.jobs.geometry``), with freshly initialised
weights: what it measures is time and memory, not quality. ``benchmarks/gpu_smoke.py`` prints these
figures for a GPU; the tests run the ``paper`` preset's steps on the CPU.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ctgen.jobs.geometry import check_geometry
from ctgen.jobs.train import build_model, fit_text_dims, label_pos_weight
from ctprep.memory import peak_rss_bytes

log = logging.getLogger(__name__)

KINDS = ("tokenizer", "generator", "superres", "clip", "classifier")
TEXT_TOKENS = 128  # GenerateCT's text length


def cpu_computes_bf16() -> bool:
    """The CPU has bf16 matrix instructions (Intel's AMX, or AVX-512 BF16 as on AMD's Zen 4): there the
    CPU steps run under bf16 autocast, as the presets' "auto" precision does on a GPU, at about half the
    time of fp32 for 3D convolutions (README, "Benchmarks")."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    return "amx_bf16" in flags or "avx512_bf16" in flags


def paper_config(config: dict[str, Any], preset: str = "paper") -> dict[str, Any]:
    """``config`` set to the cascade's paper geometry with model preset ``preset`` (a copy): prep preset
    ``paper`` (512 x 512 x 201), ``lowres_scale`` 4 (tokenizer 128 x 128 x 201), the cascade alone (the
    ``paper`` model preset has no latent flow models; ``report2ct`` is that family's, benchmarks/latent_flow.py)."""
    cfg = copy.deepcopy(config)
    cfg["models"].update(preset=preset, lowres_scale=4, generators=["cascade"])
    cfg["prep"]["preset"] = "paper"
    return cfg


def _model(kind: str, config: dict[str, Any]) -> torch.nn.Module:
    preset = config["model_presets"][config["models"]["preset"]][kind]
    text = config["models"]["text_encoder"]
    cfg: dict[str, Any] = {"model": dict(preset["model"]), "data": {}}
    if "text_encoder" in preset:
        cfg["text_encoder"] = {**preset["text_encoder"], "vocab_size": text["vocab_size"], "max_length": text["max_length"]}
    if kind in ("tokenizer", "generator", "superres"):
        return build_model(kind, fit_text_dims(cfg) if kind != "tokenizer" else cfg)
    if kind == "clip":
        from ctgen.models.clip3d import CLIP3D

        cfg = fit_text_dims(cfg)
        return CLIP3D(CLIP3D.config_from_dict({**cfg["model"], "text_encoder": cfg.get("text_encoder")}))
    from ctgen.models.classifier3d import Classifier3D

    model_cfg = {**cfg["model"], "pos_weight": label_pos_weight(torch.tensor([[1.0] * 18, [0.0] * 18]))}
    return Classifier3D(Classifier3D.config_from_dict(model_cfg))


def synthetic_batch(kind: str, model: torch.nn.Module, config: dict[str, Any], batch_size: int,
                    gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A batch of ``kind``'s inputs at the config's geometry, values in range, text as token ids."""
    grids = check_geometry(config)
    W, H, D = grids["prep"]
    _, h, w = grids["lowres"]
    vocab = config["models"]["text_encoder"]["vocab_size"]
    length = min(TEXT_TOKENS, config["models"]["text_encoder"]["max_length"])
    text = {"text_ids": torch.randint(5, vocab, (batch_size, length), generator=gen),
            "text_mask": torch.ones(batch_size, length, dtype=torch.bool)}
    if kind == "tokenizer":
        return {"video": torch.rand(batch_size, 1, D, h, w, generator=gen) * 2 - 1}
    if kind == "generator":
        codes = model.core.config.codebook_size
        return {"tokens": torch.randint(0, codes, (batch_size, *grids["tokens"]), generator=gen), **text}
    if kind == "superres":
        return {"hr": torch.rand(batch_size, 1, H, W, generator=gen) * 2 - 1,
                "lr": torch.rand(batch_size, 1, h, w, generator=gen) * 2 - 1, **text}
    video = torch.rand(batch_size, 1, D, H, W, generator=gen) * 2 - 1
    if kind == "clip":
        return {"video": video, **text}
    return {"video": video, "labels": (torch.rand(batch_size, 18, generator=gen) < 0.3).float()}


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return {"peak_gib": torch.cuda.max_memory_allocated(device) / 2**30, "peak_kind": "cuda_max_allocated"}
    return {"peak_gib": peak_rss_bytes() / 2**30, "peak_kind": "process_max_rss"}


def optimizer_steps(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, lr: float, steps: int = 1,
                    precision: str = "auto") -> dict[str, Any]:
    """``steps`` optimiser steps of ``model`` on one batch (on the model's device) with the training loop's
    step functions: ``accumulate_gradients`` under its autocast, gradient clipping at 1, ``build_optimizer``
    (the fused AdamW kernel on CUDA). Time of the last step, its loss, the peak memory from the first."""
    from ctgen.training.loop import TrainConfig, accumulate_gradients, autocast_context
    from ctgen.training.optim import build_optimizer

    dev = next(model.parameters()).device
    tcfg = TrainConfig(max_steps=max(steps, 1), batch_size=1, lr=lr, warmup_steps=0, precision=precision,
                       tensorboard=False)
    autocast, used = autocast_context(tcfg, dev)
    optimizer = build_optimizer(model, tcfg.lr, tcfg.weight_decay, tcfg.betas, dev)
    model.train()
    _reset_peak(dev)
    seconds, loss = [], None
    for step in range(steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        logs = accumulate_gradients(model, [batch], step=step, ddp=False, autocast=autocast, collect_logs=True)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds.append(time.perf_counter() - t0)
        loss = logs[0]["loss"]
    return {"parameters": sum(p.numel() for p in model.parameters()), "step_s": seconds[-1], "loss": loss,
            "precision": used, "device": str(dev), "fused_adamw": bool(optimizer.defaults.get("fused")), **_peak(dev)}


def training_step(kind: str, config: dict[str, Any], *, device: str = "cpu", batch_size: int | None = None,
                  precision: str = "auto", steps: int = 1, seed: int = 0) -> dict[str, Any]:
    """``steps`` training steps of ``kind`` (:func:`optimizer_steps`) on a synthetic batch at the config's geometry."""
    dev = torch.device(device)
    train = config["model_presets"][config["models"]["preset"]][kind]["train"]
    b = batch_size or int(train.get("batch_size", 1))
    if kind == "clip":
        b = max(b, 2)  # CLIP's loss needs another pair in the batch
    torch.manual_seed(seed)
    model = _model(kind, config).to(dev).train()
    gen = torch.Generator().manual_seed(seed)
    batch = {k: v.to(dev) for k, v in synthetic_batch(kind, model, config, b, gen).items()}
    out = optimizer_steps(model, batch, lr=float(train.get("lr", 1e-4)), steps=steps, precision=precision)
    return {"model": kind, "batch_size": b, **out}


@torch.no_grad()
def sample_step(config: dict[str, Any], *, device: str = "cpu", steps: int = 18, sr_slices: int = 4,
                sr_steps: int | None = None, guidance_scale: float = 5.0, seed: int = 0) -> dict[str, Any]:
    """A whole low-res volume at the config's geometry (MaskGIT + tokenizer decode, guidance batched), then
    super-resolution of ``sr_slices`` of its slices; untrained weights. Times and peak memory."""
    from ctgen.models.text_encoders import ReportTokenizer, fit_text_tokenizer

    dev = torch.device(device)
    grids = check_geometry(config)
    torch.manual_seed(seed)
    tokenizer, generator, superres = (_model(k, config).to(dev).eval() for k in ("tokenizer", "generator", "superres"))
    with tempfile.TemporaryDirectory() as tmp:
        vocab = config["models"]["text_encoder"]["vocab_size"]
        fit_text_tokenizer(["right lower lobe nodule 6 mm", "cardiomegaly", "no pleural effusion"], vocab,
                           Path(tmp) / "tok.json")
        text_tok = ReportTokenizer.load(Path(tmp) / "tok.json")
    ids, mask = text_tok.encode_batch(["70 years old male: right lower lobe nodule 6 mm; cardiomegaly."],
                                      config["models"]["text_encoder"]["max_length"])
    g = torch.Generator(device=dev).manual_seed(seed)
    _reset_peak(dev)
    t0 = time.perf_counter()
    text = generator.encode_text(text_ids=ids.to(dev), text_mask=mask.to(dev))
    tokens = generator.core.generate(**text, grid=grids["tokens"], steps=steps, guidance_scale=guidance_scale,
                                     temperature=1.0, generator=g)
    low = tokenizer.decode(tokens, num_slices=grids["lowres"][0])  # (1, 1, D, h, w)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t1 = time.perf_counter()
    sr_text = superres.encode_text(text_ids=ids.to(dev), text_mask=mask.to(dev))
    lr = low[0].transpose(0, 1)[:sr_slices]  # (k, 1, h, w)
    high = superres.core.sample(lr, sr_text["text"].expand(len(lr), -1, -1), sr_text["text_mask"].expand(len(lr), -1),
                                steps=sr_steps, generator=g, batch_size=len(lr))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t2 = time.perf_counter()
    return {"lowres_shape": list(low.shape[2:]), "tokens": list(grids["tokens"]), "maskgit_steps": steps,
            "lowres_s": t1 - t0, "superres_slices": len(lr), "superres_shape": list(high.shape[-2:]),
            "superres_s": t2 - t1, "superres_s_per_slice": (t2 - t1) / len(lr), **_peak(dev)}
