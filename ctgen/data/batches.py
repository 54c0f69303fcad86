"""Training batches of every model, streamed from shards: what a sample becomes, and how samples become a batch.

``streamed(...)`` gives the training loop its ``make_batches(ctx)``: the rank's micro-batches of one
epoch from micro-batch ``ctx.start`` on, planned and read by ``ctgen.data.stream``. Each model adds
a *decode* (raw shard sample -> tensors, run in the data workers) and a *collate* (samples + the
batch's own seeded generator -> the model's batch dict, also in the workers). Augmentation draws
from the batch's generator, seeded by (seed, epoch, rank, micro-batch), so a batch is the same
whichever worker makes it and however the run was interrupted.

Resolutions: the shards hold the preset grid (the full resolution). The tokenizer and the generator
work on it area-downsampled in-plane by ``lowres_scale`` (GenerateCT: 512 -> 128); the
super-resolution model lifts slices back. Intensities: HU clipped to the prep preset's window
(``window``, from ``data.hu_window``) map to [-1, 1] (``ctgen.data.layout``). Labels: 1, 0, or NaN
where the dataset left the label blank (unknown: masked in losses and metrics, never a 0).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ctgen.data.layout import downsample, hu_to_unit, to_model_layout
from ctgen.data.shards import iter_samples, labels_of, volume_of
from ctgen.data.stream import Collate, Decode, StreamPlan, epoch_batches, load_shards, preflight
from ctgen.data.text import TextConditioning
from ctprep.settings import check_fields

log = logging.getLogger(__name__)


def streamed(manifests: list[str], decode: Decode, collate: Collate, *, parallel: list[list[str]] | None = None,
             buffer: int = 16, verify: bool = True, items_per_sample: int = 1) -> Callable:
    """make_batches for the loop: shards of ``manifests`` (and ``parallel`` shard sets with the same keys).

    ``items_per_sample``: training items the collate makes of each sample (super-resolution: slices per
    volume); a micro-batch of ``ctx.batch_size`` items then reads ``batch_size / items_per_sample`` samples.
    """
    shards = load_shards(manifests)
    if not any(s.keys for s in shards):  # the plan's advice (smaller shards, fewer ranks) would not help
        raise ValueError(f"{', '.join(map(str, manifests))} list{'s' if len(manifests) == 1 else ''} no samples: "
                         "an empty split (its cohort, or the chunks written for it, held none)")
    extra = [load_shards(p) for p in parallel or []]
    for other in extra:
        _check_parallel(shards, other)
    for s in (shards, *extra):
        preflight(s)
    # the shard files hashed in this run: each is hashed before its first sample of the run is read, whichever epoch
    # that is (a run resumed mid-epoch skips the shards of the batches before its start, and the uneven split leaves a
    # few unread in an epoch), and not again (a file changed since, by its date or size, is hashed afresh)
    verified: set = set()
    reported: list[int] = []

    def make(ctx) -> Iterator[dict]:
        workers = StreamPlan.max_workers(len(shards), ctx.world_size, ctx.num_workers)
        if workers != ctx.num_workers and not reported:
            reported.append(workers)
            log.warning("%d data workers asked for, %d used: each worker needs shards of its own (%d shards, %d ranks)",
                        ctx.num_workers, workers, len(shards), ctx.world_size)
        if ctx.batch_size % items_per_sample:
            raise ValueError(f"train.batch_size {ctx.batch_size} must be a multiple of the {items_per_sample} "
                             "items made of each sample")
        plan = StreamPlan(tuple(shards), ctx.batch_size // items_per_sample, ctx.seed, ctx.world_size, ctx.rank, workers, buffer,
                          tuple(tuple(p) for p in extra))
        return epoch_batches(plan, ctx.epoch, ctx.start, decode, collate, pin_memory=ctx.device.type == "cuda",
                             verify=verify, verified=verified)

    make.resumes_at_start = True  # the loop may pass ctx.start instead of replaying batches
    make.n_samples = sum(len(s.keys) for s in shards)
    make.keys = [k for s in shards for k in s.keys]  # what a text cache must hold (checked before training)
    return make


def _check_parallel(shards, other) -> None:
    """``other`` must be derived from the very shards of ``shards``: the same keys, computed from the same files
    (volume shards re-made with the same keys, e.g. under another prep preset, left a stale cache that paired each
    volume with another volume's reconstruction)."""
    where = f"{other[0].manifest if other else 'derived shards'} is not derived from " \
            f"{shards[0].manifest if shards else 'the shards'}"
    if [s.keys for s in shards] != [s.keys for s in other]:
        first = next((i for i, (a, b) in enumerate(zip(shards, other)) if a.keys != b.keys), min(len(shards), len(other)))
        raise ValueError(f"{where}: shard {first} differs in its keys (re-run the job that derives it)")
    stale = next((i for i, (a, b) in enumerate(zip(shards, other)) if a.origin != b.origin), None)
    if stale is not None:
        raise ValueError(f"{where}: shard {stale} was computed from another file with the same keys (the volume shards "
                         "were re-made after it): re-run the job that derives it")


# --- decodes: raw shard sample -> tensors (in the data workers) ---------------------------------------


def volume_decode(window, prompt: str | None = None) -> Decode:
    """Volume samples: {key, volume (1, D, H, W) float32 in [-1, 1], prompt, labels (18,) float32 with NaN}."""

    def decode(raw: dict[str, Any]) -> dict[str, Any]:
        vol = torch.from_numpy(to_model_layout(volume_of(raw)))  # (1, D, H, W) HU
        out = {"key": raw["__key__"], "volume": hu_to_unit(vol, window), "prompt": _prompt(raw, prompt),
               "labels": torch.from_numpy(labels_of(raw))}
        if "recon.npy" in raw:  # parallel tokenizer reconstructions (D, h, w) in [-1, 1]
            out["recon"] = torch.from_numpy(np.asarray(raw["recon.npy"], dtype=np.float32))
        return out

    return decode


def token_decode(prompt: str | None = None) -> Decode:
    """Token samples (encode_tokens' shards): {key, tokens (t, h, w) long, prompt, labels}."""

    def decode(raw: dict[str, Any]) -> dict[str, Any]:
        return {"key": raw["__key__"], "tokens": torch.from_numpy(raw["tokens.npy"].astype(np.int64)),
                "prompt": _prompt(raw, prompt), "labels": torch.from_numpy(labels_of(raw))}

    return decode


def _prompt(raw: dict[str, Any], template: str | None) -> str:
    prompts = raw.get("prompts.json") or {}
    if template and template in prompts:
        return prompts[template]
    if template and prompts:
        raise ValueError(f"{raw.get('__url__')}: sample {raw['__key__']} has no prompt {template!r} "
                         f"(it has {sorted(prompts)}): data.prompt names a prompt the shards do not hold, or one "
                         f"whose template needs a field this volume's report/metadata lacks (the prompts log names "
                         f"how many); train on a prompt every volume has (the structured prompt needs no metadata), "
                         f"or run `snakemake -R prompts` so that the prompts stage rejects the volumes that lack it")
    return raw["prompt.txt"]


# --- collates: samples + the batch's generator -> the model's batch (in the data workers) ---------------


def tokenizer_collate(lowres_scale: int) -> Collate:
    """The tokenizer's batch: {"video": (B, 1, D, H/s, W/s)}."""
    return lambda samples, gen: {"video": downsample(torch.stack([s["volume"] for s in samples]), lowres_scale)}


def generator_collate(text: TextConditioning) -> Collate:
    """The generator's batch: {"tokens": (B, t, h, w), text...}."""
    return lambda samples, gen: {"tokens": torch.stack([s["tokens"] for s in samples]),
                                 **text([s["key"] for s in samples], [s["prompt"] for s in samples])}


def superres_collate(text: TextConditioning, lowres_scale: int, slices_per_volume: int) -> Collate:
    """Super-resolution: {"hr": (B * k, 1, H, W), "lr": (B * k, 1, H/s, W/s), text...}, k random slices per volume.

    ``lr`` is the downsampled real slice, or the tokenizer's reconstruction of it where the samples
    carry one (``recon``), as GenerateCT trained its super-resolution stage.
    """

    def collate(samples, gen) -> dict:
        hr, lr, keys, prompts = [], [], [], []
        for s in samples:
            depth = s["volume"].shape[1]
            for z in torch.randint(depth, (slices_per_volume,), generator=gen).tolist():
                hr.append(s["volume"][:, z])  # (1, H, W)
                if "recon" in s:
                    lr.append(s["recon"][z][None])
                keys.append(s["key"])
                prompts.append(s["prompt"])
        hr = torch.stack(hr)
        lr = torch.stack(lr) if lr else downsample(hr, lowres_scale)
        return {"hr": hr, "lr": lr, **text(keys, prompts)}

    return collate


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation, seeded per batch."""

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
        return cls(**check_fields(cls, data.get("augment") or {}, "data.augment"))


def clip_collate(text: TextConditioning, augment: Augment) -> Collate:
    """CLIP3D: {"video": (B, 1, D, H, W) augmented, text_ids | text, "text_mask"}."""
    return lambda samples, gen: {"video": augment(torch.stack([s["volume"] for s in samples]), gen),
                                 **text([s["key"] for s in samples], [s["prompt"] for s in samples])}


def classifier_collate(augment: Augment) -> Collate:
    """Classifier3D: {"video": (B, 1, D, H, W) augmented, "labels": (B, 18) with NaN = unknown}."""
    return lambda samples, gen: {"video": augment(torch.stack([s["volume"] for s in samples]), gen),
                                 "labels": torch.stack([s["labels"] for s in samples])}


def autoencoder_collate(patch: tuple[int, int, int] | None) -> Collate:
    """The autoencoder's batch: {"video": (B, 1, d, h, w)} random crops of ``patch`` (D, H, W) (None: whole volumes).

    Crops are placed by the batch's generator, so a resumed run crops the same places.
    """

    def collate(samples, gen) -> dict:
        vols = [s["volume"] for s in samples]  # (1, D, H, W) each
        if patch is None:
            return {"video": torch.stack(vols)}
        crops = []
        for v in vols:
            if any(p > n for p, n in zip(patch, v.shape[1:])):
                raise ValueError(f"autoencoder crop {tuple(patch)} is larger than the volume {tuple(v.shape[1:])}")
            starts = [int(torch.randint(n - p + 1, (1,), generator=gen)) for p, n in zip(patch, v.shape[1:])]
            crops.append(v[:, starts[0]:starts[0] + patch[0], starts[1]:starts[1] + patch[1], starts[2]:starts[2] + patch[2]])
        return {"video": torch.stack(crops)}

    return collate


def latent_decode(prompt: str | None = None) -> Decode:
    """Latent samples (encode_latents' shards): {key, mu, sigma (C, d, h, w) float32, sections, prompt, spacing, labels}."""

    def decode(raw: dict[str, Any]) -> dict[str, Any]:
        sections = dict(raw["report.json"])
        sections["structured"] = (raw.get("prompts.json") or {}).get("structured", "")
        return {"key": raw["__key__"], "mu": torch.from_numpy(raw["mu.npy"].astype(np.float32)),
                "sigma": torch.from_numpy(raw["sigma.npy"].astype(np.float32)), "sections": sections,
                "prompt": _prompt(raw, prompt), "spacing": torch.from_numpy(np.asarray(raw["spacing.npy"], np.float32)),
                "labels": torch.from_numpy(labels_of(raw))}

    return decode


def latent_flow_collate(segments: tuple[str, ...], encode_sections: Callable) -> Collate:
    """The flow model's batch: {"latent_mu", "latent_sigma" (B, C, d, h, w), "spacing" (B, 3), text per segment}.

    ``encode_sections({segment: [texts]}, keys)`` gives the model's text inputs (token ids or cached
    states; a blank text gets an all-False mask, which the model turns into its null segment).
    """

    def collate(samples, gen) -> dict:
        texts = {seg: [s["sections"].get(seg, "") for s in samples] for seg in segments}
        return {"latent_mu": torch.stack([s["mu"] for s in samples]),
                "latent_sigma": torch.stack([s["sigma"] for s in samples]),
                "spacing": torch.stack([s["spacing"] for s in samples]),
                **encode_sections(texts, [s["key"] for s in samples])}

    return collate


class SectionTokens:
    """The small trainable encoder's inputs per report section: ``{seg}_ids`` and ``{seg}_mask`` (blank: all False)."""

    def __init__(self, tokenizer_path: str, max_length: int):
        from ctgen.models.text_encoders import ReportTokenizer

        self.tokenizer, self.max_length = ReportTokenizer.load(tokenizer_path), max_length

    def __call__(self, sections: dict[str, list[str]], keys: list[str] | None = None) -> dict[str, torch.Tensor]:
        from ctgen.models.report_context import blank_empty

        out = {}
        for seg, texts in sections.items():
            ids, mask = self.tokenizer.encode_batch([t or "" for t in texts], self.max_length)  # long sections cut at whole sentences
            out[f"{seg}_ids"], out[f"{seg}_mask"] = ids, blank_empty(texts, mask)
        return out


class SectionStates:
    """Frozen encoders' cached states per report section (``embed-sections``: keys ``<sample key>:<section>``),
    one cache per encoder: ``findings``/``findings_mask`` for the first, ``findings_enc1``... for the next."""

    def __init__(self, cache_paths: list[str]):
        from ctgen.data.text_cache import EmbeddingCache

        self.caches = [EmbeddingCache(p) for p in cache_paths]

    def __call__(self, sections: dict[str, list[str]], keys: list[str]) -> dict[str, torch.Tensor]:
        from ctgen.models.report_context import blank_empty, text_keys

        out = {}
        for seg, texts in sections.items():
            for e, cache in enumerate(self.caches):
                enc = cache.batch([f"{k}:{seg}" for k in keys])
                key, mask_key = text_keys(seg, e)
                out[key], out[mask_key] = enc.hidden, blank_empty(texts, enc.mask)
        return out


# --- small in-memory sources -----------------------------------------------------------------------------


def listed(samples: list[dict], collate: Collate) -> Callable:
    """make_batches over samples already in memory (generated volumes handed to the classifier for TSTR).

    Kept for what is not in shards: the evaluation's generated volumes (one per evaluation report, a
    few hundred at most). Seeded shuffle per epoch, whole global batches, round-robin over ranks.
    """

    def make(ctx) -> Iterator[dict]:
        order = np.random.default_rng([ctx.seed, ctx.epoch]).permutation(len(samples)).tolist()
        per_global = ctx.batch_size * ctx.world_size
        usable = (len(order) // per_global) * per_global
        if usable == 0:
            raise ValueError(f"{len(order)} samples cannot fill one global batch of {per_global}")
        mine = order[ctx.rank:usable:ctx.world_size]
        for j, i in enumerate(range(0, len(mine), ctx.batch_size)):
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence([ctx.seed, ctx.epoch, ctx.rank, j, 2])
                                                    .generate_state(1, np.uint64)[0] & (2**63 - 1)))
            yield collate([samples[k] for k in mine[i:i + ctx.batch_size]], gen)

    return make


def load_volumes(manifests: list[str], window, prompt: str | None = None) -> list[dict]:
    """Every sample of the manifests as {key, volume (1, D, H, W) float16 in [-1, 1], prompt, labels}.

    For the evaluation's reference volumes until it streams them too (one evaluation split; not for training).
    """
    out = []
    for manifest in manifests:
        for s in iter_samples(manifest):
            vol = torch.from_numpy(to_model_layout(s["volume"]))  # (1, D, H, W) HU
            text = s["prompts"].get(prompt, s["prompt"]) if prompt else s["prompt"]
            out.append({"key": s["key"], "volume": hu_to_unit(vol, window).half(), "prompt": text,
                        "labels": torch.from_numpy(labels_of({"labels.npy": s["labels"]}))})
    if not out:
        raise ValueError(f"no samples in {manifests}")
    log.info("loaded %d volumes of shape %s from %d manifests", len(out), tuple(out[0]["volume"].shape), len(manifests))
    return out
