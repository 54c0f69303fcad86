"""The latent cache of the latent flow family: every volume's posterior mean and std, as derived shards.

One job per (split, chunk), like the token shards: the chunk's volume shards are encoded by the
autoencoder (MAISI's, trained here or loaded from NVIDIA's checkpoint) ``batch_size`` at a time,
and each sample keeps ``mu.npy`` and ``sigma.npy`` (C, d, h, w) float16, never a drawn sample:
caching ``mu + sigma * eps`` would freeze one draw of the noise into every epoch's targets (MAISI's
known pitfall, ~27% irreducible noise); the flow model draws ``eps`` afresh each step. Beside them
the sample's report sections (``report.json``), prompts, labels and voxel spacing (mm, x y z), so
the flow model streams latent shards alone. Each chunk's manifest holds the additive moments of its
latents (``ctgen.models.autoencoder.LatentStats``); the split's merged manifest sums them, which
gives the scale factor exactly (1 / std over every training latent) at no extra pass.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ctgen.data.derived import load_derived, producer_of, weights_id, write_derived
from ctgen.data.layout import hu_to_unit, to_model_layout
from ctgen.data.shards import volume_of
from ctgen.data.stream import raw_batches
from ctprep.ctrate import is_blank_section

log = logging.getLogger(__name__)

MEMBERS = {
    "mu.npy": "float16 (C, d, h, w) posterior mean of the autoencoder's latent (model layout: d along S)",
    "sigma.npy": "float16 (C, d, h, w) posterior std (the flow model samples mu + sigma * eps itself)",
    "report.json": "UTF-8 JSON: {findings, impression}: the report sections (empty string when absent)",
    "spacing.npy": "float32 (3,) voxel spacing of the volume in mm (x, y, z)",
    "prompt.txt": "UTF-8 text: the training prompt (copied from the volume shard)",
    "prompts.json": "UTF-8 JSON: {template name: prompt} (copied from the volume shard)",
    "labels.npy": "uint8 (18,) abnormality labels, 255 = unknown (copied from the volume shard)",
}


def report_sections(meta: dict) -> dict[str, str]:
    """{findings, impression} of a volume shard's meta (CT-RATE columns; blank where absent)."""
    report = meta.get("report") or {}
    out = {}
    for name, keys in (("findings", ("Findings_EN", "findings")), ("impression", ("Impressions_EN", "impression"))):
        text = next((report[k] for k in keys if isinstance(report.get(k), str)), "")
        out[name] = "" if is_blank_section(text) else text.strip()
    return out


@torch.no_grad()
def encode_latents(autoencoder_dir: str | Path, manifest: str | Path, out_dir: str | Path, window, *,
                   batch_size: int = 1, device: str = "cpu", encode_window: tuple[int, int, int] | None = None,
                   encode_overlap: float | None = None) -> Path:
    """Latent shards (mu, sigma) of one volume-shard manifest; returns the derived manifest's path.

    ``encode_window``/``encode_overlap``: a sliding-window encode (``MaisiAutoencoder.encode``) over the
    autoencoder's own setting, which is that of its training config when it was trained."""
    from ctgen.models.autoencoder import LatentStats, MaisiAutoencoder

    model = MaisiAutoencoder.from_pretrained(autoencoder_dir, map_location=device).eval()
    if encode_window is not None:
        model.config = dataclasses.replace(model.config, encode_window=tuple(encode_window),
                                           encode_overlap=model.config.encode_overlap if encode_overlap is None
                                           else encode_overlap)  # checked as at load
        log.info("encoding in windows of %s voxels, overlap %g", model.config.encode_window,
                 model.config.encode_overlap)
    producer = weights_id(autoencoder_dir)
    stats = LatentStats()

    def encoded(pending: list[tuple[str, dict]]) -> Iterator[dict]:
        vols = torch.stack([hu_to_unit(torch.from_numpy(to_model_layout(volume_of(raw))), window) for _, raw in pending])
        mu, sigma = model.encode(vols.to(device))  # (B, C, d, h, w) each
        stats.update(mu.cpu(), sigma.cpu())
        for j, (key, raw) in enumerate(pending):
            spacing = np.sqrt((np.asarray(raw["affine.npy"], dtype=np.float64)[:3, :3] ** 2).sum(0))
            yield {"__key__": key, "mu.npy": mu[j].to(torch.float16).cpu().numpy(),
                   "sigma.npy": sigma[j].to(torch.float16).cpu().numpy(),
                   "report.json": report_sections(raw.get("meta.json") or {}), "spacing.npy": spacing.astype(np.float32),
                   "prompt.txt": raw["prompt.txt"], "prompts.json": raw["prompts.json"], "labels.npy": raw["labels.npy"]}

    def samples() -> Iterator[dict]:
        for pending in raw_batches(manifest, batch_size, f"latents {Path(manifest).name}"):
            yield from encoded(pending)

    return write_derived(manifest, samples(), out_dir, "latents", producer, MEMBERS, stats=stats.sums)


def latent_scale_factor(manifests: list[str | Path]) -> float:
    """1 / std of every latent of the (merged) latent manifests, from their moments."""
    from ctgen.models.autoencoder import LatentStats

    total = {"n": 0, "sum_mu": 0.0, "sum_sq": 0.0}
    for path in manifests:
        meta = load_derived(path)
        if "stats" not in meta:
            raise ValueError(f"{path} holds no latent moments: re-run encode_latents")
        total = {k: total[k] + meta["stats"][k] for k in total}
    return LatentStats.from_sums(total).scale_factor


def latent_producer(manifests: list[str | Path]) -> str:
    """The autoencoder that made the latents (one for all manifests; mixing networks is refused)."""
    return producer_of(manifests, "latent shards")
