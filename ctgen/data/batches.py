"""Training batches for the three models, from the ctprep shards, one rank's share per epoch.

Every ``*_batches`` function here is a ``make_batches(ctx)`` for the training loop: ``ctx`` gives
``rank``, ``world_size``, ``epoch`` and ``seed``; the function yields this rank's micro-batches for
one epoch, deterministically. Samples are dealt round-robin over ranks after a seeded shuffle that
every rank computes identically, and only whole global batches are used, so all ranks run the same
number of steps (DDP needs that).

Resolutions: the shards hold the preset grid (the full resolution). The tokenizer and the generator
work on it area-downsampled in-plane by ``lowres_scale`` (GenerateCT: 512 -> 128); the
super-resolution model lifts slices back. Intensities: HU clipped to the prep preset's window
(``window``, from ``data.hu_window``) map to [-1, 1] (``ctgen.data.layout``).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ctgen.data.layout import downsample, hu_to_unit, to_model_layout
from ctgen.data.shards import iter_samples
from ctgen.data.text import TextConditioning

log = logging.getLogger(__name__)

def rank_order(n: int, ctx, batch_size: int) -> list[int]:
    """This rank's sample indices for the epoch: seeded shuffle, round-robin, whole global batches."""
    order = list(range(n))
    random.Random(f"{ctx.seed}-{ctx.epoch}").shuffle(order)
    per_global = batch_size * ctx.world_size
    usable = (n // per_global) * per_global
    if usable == 0:
        raise ValueError(f"{n} samples cannot fill one global batch of {per_global} (batch {batch_size} x {ctx.world_size} ranks)")
    return order[ctx.rank:usable:ctx.world_size]


def load_volumes(manifests: list[str], window, prompt: str | None = None) -> list[dict]:
    """Every sample of the manifests as {key, volume (1, D, H, W) float16 in [-1, 1], prompt, labels (18,) float32}.

    ``window``: the prep preset's HU window (low, high), which maps to [-1, 1].

    The demo and moderate cohorts fit in memory; this keeps every epoch's shuffle exact and cheap.
    # TODO(scale): at CT-RATE scale stream with webdataset's split_by_node/worker instead.
    """
    out = []
    for manifest in manifests:
        for s in iter_samples(manifest):
            vol = torch.from_numpy(to_model_layout(s["volume"]))  # (1, D, H, W) HU
            text = s["prompts"].get(prompt, s["prompt"]) if prompt else s["prompt"]
            out.append({"key": s["key"], "volume": hu_to_unit(vol, window).half(), "prompt": text,
                        "labels": torch.from_numpy(np.asarray(s["labels"], dtype=np.float32))})
    if not out:
        raise ValueError(f"no samples in {manifests}")
    log.info("loaded %d volumes of shape %s from %d manifests", len(out), tuple(out[0]["volume"].shape), len(manifests))
    return out


def volume_batches(volumes: list[dict], batch_size: int, lowres_scale: int):
    """make_batches for the tokenizer: {"video": (B, 1, D, H/s, W/s)}."""

    def make(ctx) -> Iterator[dict]:
        order = rank_order(len(volumes), ctx, batch_size)
        for i in range(0, len(order), batch_size):
            vols = torch.stack([volumes[j]["volume"].float() for j in order[i:i + batch_size]])
            yield {"video": downsample(vols, lowres_scale)}

    return make


def load_tokens(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The token grids written by ``encode_tokens`` ({key: (t, h, w)}) and their prompts."""
    grids = load_file(path)
    prompts = json.loads(Path(path).with_suffix(".prompts.json").read_text())
    return grids, prompts


def token_batches(grids: dict[str, torch.Tensor], text: TextConditioning, batch_size: int):
    """make_batches for the generator: {"tokens": (B, t, h, w), text...}."""
    keys = sorted(grids)

    def make(ctx) -> Iterator[dict]:
        order = rank_order(len(keys), ctx, batch_size)
        for i in range(0, len(order), batch_size):
            batch_keys = [keys[j] for j in order[i:i + batch_size]]
            yield {"tokens": torch.stack([grids[k].long() for k in batch_keys]), **text(batch_keys)}

    return make


def slice_batches(volumes: list[dict], text: TextConditioning, batch_size: int, lowres_scale: int,
                  slices_per_volume: int = 4, recon: dict[str, torch.Tensor] | None = None):
    """make_batches for super-resolution: {"hr": (B, 1, H, W), "lr": (B, 1, H/s, W/s), text...}.

    Each epoch draws ``slices_per_volume`` random slices per volume (seeded). ``lr`` is the
    downsampled real slice, or the tokenizer's reconstruction of it when ``recon`` is given
    ({key: (D, H/s, W/s)}), as GenerateCT trained its super-resolution stage.
    """
    items = [(v, d) for v in range(len(volumes)) for d in range(slices_per_volume)]

    def make(ctx) -> Iterator[dict]:
        rng = np.random.default_rng([ctx.seed, ctx.epoch])
        depth = [volumes[v]["volume"].shape[1] for v in range(len(volumes))]
        picks = [int(rng.integers(depth[v])) for v, _ in items]  # same on every rank
        order = rank_order(len(items), ctx, batch_size)
        for i in range(0, len(order), batch_size):
            chosen = [(items[j][0], picks[j]) for j in order[i:i + batch_size]]
            hr = torch.stack([volumes[v]["volume"][:, z].float() for v, z in chosen])  # (B, 1, H, W)
            if recon is None:
                lr = downsample(hr, lowres_scale)
            else:
                lr = torch.stack([recon[volumes[v]["key"]][z][None].float() for v, z in chosen])
            yield {"hr": hr, "lr": lr, **text([volumes[v]["key"] for v, _ in chosen])}

    return make


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
        order = rank_order(len(volumes), ctx, batch_size)
        for i in range(0, len(order), batch_size):
            chosen = [volumes[j] for j in order[i:i + batch_size]]
            video = augment(torch.stack([v["volume"].float() for v in chosen]), gen)
            yield {"video": video, **extra(chosen)}

    return make


def clip_batches(volumes: list[dict], text: TextConditioning, batch_size: int, augment: Augment):
    """make_batches for CLIP3D: {"video": (B, 1, D, H, W), text_ids | text, "text_mask"}."""
    return _video_batches(volumes, batch_size, augment, lambda chosen: text([v["key"] for v in chosen]))


def classifier_batches(volumes: list[dict], batch_size: int, augment: Augment):
    """make_batches for Classifier3D: {"video": (B, 1, D, H, W), "labels": (B, 18)}."""
    return _video_batches(volumes, batch_size, augment, lambda chosen: {
        "labels": torch.stack([torch.as_tensor(v["labels"]).float() for v in chosen])})
