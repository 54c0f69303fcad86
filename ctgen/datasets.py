"""Training batches for the three models, from the ctprep shards, one rank's share per epoch.

Every ``*_batches`` function here is a ``make_batches(ctx)`` for the training loop: ``ctx`` gives
``rank``, ``world_size``, ``epoch`` and ``seed``; the function yields this rank's micro-batches for
one epoch, deterministically. Samples are dealt round-robin over ranks after a seeded shuffle that
every rank computes identically, and only whole global batches are used, so all ranks run the same
number of steps (DDP needs that).

Resolutions: the shards hold the preset grid (the full resolution). The tokenizer and the generator
work on it area-downsampled in-plane by ``lowres_scale`` (GenerateCT: 512 -> 128); the
super-resolution model lifts slices back. Intensities: HU clipped to the preset window map to [-1, 1].
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ctgen.data import iter_samples, to_model_layout

log = logging.getLogger(__name__)

HU_WINDOW = (-1000.0, 1000.0)  # the presets' clip window; the models see it as [-1, 1]


def hu_to_unit(hu: torch.Tensor, window=HU_WINDOW) -> torch.Tensor:
    lo, hi = window
    return (hu.float().clamp(lo, hi) - lo) / (hi - lo) * 2 - 1


def unit_to_hu(x: torch.Tensor, window=HU_WINDOW) -> torch.Tensor:
    lo, hi = window
    return (x.float().clamp(-1, 1) + 1) / 2 * (hi - lo) + lo


def downsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    """In-plane area downsampling of (..., H, W) by an integer factor (box filter: no aliasing)."""
    if scale == 1:
        return x
    lead = x.shape[:-2]
    y = F.avg_pool2d(x.reshape(-1, 1, *x.shape[-2:]), scale)
    return y.reshape(*lead, *y.shape[-2:])


def _rank_order(n: int, ctx, batch_size: int) -> list[int]:
    """This rank's sample indices for the epoch: seeded shuffle, round-robin, whole global batches."""
    order = list(range(n))
    random.Random(f"{ctx.seed}-{ctx.epoch}").shuffle(order)
    per_global = batch_size * ctx.world_size
    usable = (n // per_global) * per_global
    if usable == 0:
        raise ValueError(f"{n} samples cannot fill one global batch of {per_global} (batch {batch_size} x {ctx.world_size} ranks)")
    return order[ctx.rank:usable:ctx.world_size]


def load_volumes(manifests: list[str], prompt: str | None = None) -> list[dict]:
    """Every sample of the manifests as {key, volume (1, D, H, W) float16 in [-1, 1], prompt, labels (18,) float32}.

    The demo and moderate cohorts fit in memory; this keeps every epoch's shuffle exact and cheap.
    # TODO(scale): at CT-RATE scale stream with webdataset's split_by_node/worker instead.
    """
    out = []
    for manifest in manifests:
        for s in iter_samples(manifest):
            vol = torch.from_numpy(to_model_layout(s["volume"]))  # (1, D, H, W) HU
            text = s["prompts"].get(prompt, s["prompt"]) if prompt else s["prompt"]
            out.append({"key": s["key"], "volume": hu_to_unit(vol).half(), "prompt": text,
                        "labels": torch.from_numpy(np.asarray(s["labels"], dtype=np.float32))})
    if not out:
        raise ValueError(f"no samples in {manifests}")
    log.info("loaded %d volumes of shape %s from %d manifests", len(out), tuple(out[0]["volume"].shape), len(manifests))
    return out


def volume_batches(volumes: list[dict], batch_size: int, lowres_scale: int):
    """make_batches for the tokenizer: {"video": (B, 1, D, H/s, W/s)}."""

    def make(ctx) -> Iterator[dict]:
        order = _rank_order(len(volumes), ctx, batch_size)
        for i in range(0, len(order), batch_size):
            vols = torch.stack([volumes[j]["volume"].float() for j in order[i:i + batch_size]])
            yield {"video": downsample(vols, lowres_scale)}

    return make


class TextConditioning:
    """Text for a batch of keys: cached frozen-encoder states, or token ids for a trainable encoder."""

    def __init__(self, prompts: dict[str, str], cache_path: str | None = None, tokenizer_path: str | None = None,
                 max_length: int = 128):
        if (cache_path is None) == (tokenizer_path is None):
            raise ValueError("give exactly one of a text embedding cache or a text tokenizer")
        self.prompts = prompts
        self.max_length = max_length
        self.cache = self.tokenizer = None
        if cache_path:
            from ctgen.text_cache import EmbeddingCache

            self.cache = EmbeddingCache(cache_path)
        else:
            from ctgen.models.text_encoders import ReportTokenizer

            self.tokenizer = ReportTokenizer.load(tokenizer_path)

    def __call__(self, keys: list[str]) -> dict[str, torch.Tensor]:
        if self.cache is not None:
            enc = self.cache.batch(keys)
            return {"text": enc.hidden, "text_mask": enc.mask}
        ids, mask = self.tokenizer.encode_batch([self.prompts[k] for k in keys], self.max_length)
        return {"text_ids": ids, "text_mask": mask}


def load_tokens(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The token grids written by ``encode_tokens`` ({key: (t, h, w)}) and their prompts."""
    grids = load_file(path)
    prompts = json.loads(Path(path).with_suffix(".prompts.json").read_text())
    return grids, prompts


def token_batches(grids: dict[str, torch.Tensor], text: TextConditioning, batch_size: int):
    """make_batches for the generator: {"tokens": (B, t, h, w), text...}."""
    keys = sorted(grids)

    def make(ctx) -> Iterator[dict]:
        order = _rank_order(len(keys), ctx, batch_size)
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
        order = _rank_order(len(items), ctx, batch_size)
        for i in range(0, len(order), batch_size):
            chosen = [(items[j][0], picks[j]) for j in order[i:i + batch_size]]
            hr = torch.stack([volumes[v]["volume"][:, z].float() for v, z in chosen])  # (B, 1, H, W)
            if recon is None:
                lr = downsample(hr, lowres_scale)
            else:
                lr = torch.stack([recon[volumes[v]["key"]][z][None].float() for v, z in chosen])
            yield {"hr": hr, "lr": lr, **text([volumes[v]["key"] for v, _ in chosen])}

    return make
