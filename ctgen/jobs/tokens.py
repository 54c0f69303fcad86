"""The step between tokenizer and generator: token grids (and reconstructions) of one chunk's volumes, as shards.

One job per (split, chunk), like preparation: it reads the chunk's volume shards in order, encodes
``batch_size`` volumes at a time on the job's device and writes derived shards with the same keys
(``ctgen.data.derived``): per sample ``tokens.npy`` (t, h, w) int16 codebook indices, the sample's
``prompt.txt``, ``prompts.json`` and ``labels.npy`` (so the generator streams token shards alone), and
with ``recon`` the tokenizer's reconstruction ``recon.npy`` (D, h, w) float16 in [-1, 1], the low-res
input GenerateCT trained its super-resolution stage on. Memory: one batch of volumes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ctgen.data.derived import weights_id, write_derived
from ctgen.data.layout import downsample, hu_to_unit, to_model_layout
from ctgen.data.shards import volume_of
from ctgen.data.stream import raw_batches

log = logging.getLogger(__name__)

MEMBERS = {
    "tokens.npy": "int16 (t, h, w) CT-ViT codebook indices of the volume downsampled in-plane by lowres_scale",
    "recon.npy": "float16 (D, h, w) the tokenizer's reconstruction in [-1, 1] (only with reconstructions)",
    "prompt.txt": "UTF-8 text: the training prompt (copied from the volume shard)",
    "prompts.json": "UTF-8 JSON: {template name: prompt} (copied from the volume shard)",
    "labels.npy": "uint8 (18,) abnormality labels, 255 = unknown (copied from the volume shard)",
}


@torch.no_grad()
def encode_tokens(tokenizer_dir: str | Path, manifest: str | Path, out_dir: str | Path, lowres_scale: int, window,
                  *, recon: bool = False, batch_size: int = 2, device: str = "cpu") -> Path:
    """Token shards of one volume-shard manifest (a chunk's); returns the derived manifest's path.

    ``window``: the prep preset's HU window, mapped to [-1, 1] as in training.
    """
    from ctgen.models.ctvit import CTViT

    model = CTViT.from_pretrained(tokenizer_dir, map_location=device).eval()
    if model.config.codebook_size > np.iinfo(np.int16).max:
        raise ValueError(f"codebook of {model.config.codebook_size} codes does not fit the int16 token shards")
    producer = weights_id(tokenizer_dir)

    def encoded(pending: list[tuple[str, dict]]) -> Iterator[dict]:
        vols = torch.stack([hu_to_unit(torch.from_numpy(to_model_layout(volume_of(raw))), window) for _, raw in pending])
        video = downsample(vols, lowres_scale).to(device)  # (B, 1, D, h, w)
        idx = model.encode(video)  # (B, t, h, w)
        rec = model.decode(idx, num_slices=video.shape[2]) if recon else None  # (B, 1, D, h, w)
        for j, (key, raw) in enumerate(pending):
            out = {"__key__": key, "tokens.npy": idx[j].to(torch.int16).cpu().numpy(),
                   "prompt.txt": raw["prompt.txt"], "prompts.json": raw["prompts.json"], "labels.npy": raw["labels.npy"]}
            if rec is not None:
                out["recon.npy"] = rec[j, 0].clamp(-1, 1).to(torch.float16).cpu().numpy()
            yield out

    def samples() -> Iterator[dict]:
        for pending in raw_batches(manifest, batch_size, f"encode {Path(manifest).name}"):
            yield from encoded(pending)

    members = {k: v for k, v in MEMBERS.items() if recon or k != "recon.npy"}
    # the codebook size travels with the codes: a generator trained for another size is refused before its step 0
    return write_derived(manifest, samples(), out_dir, "tokens", producer, members,
                         describe={"codebook_size": model.config.codebook_size})
