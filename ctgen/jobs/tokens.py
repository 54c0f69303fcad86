"""The step between tokenizer and generator: token grids (and reconstructions) of the shards' volumes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from ctgen.data.batches import load_volumes
from ctgen.data.layout import downsample
from ctprep.volume import atomic_write

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_tokens(tokenizer_dir: str | Path, manifests: list[str], out_path: str | Path, lowres_scale: int,
                  window, prompt: str | None = None, recon_path: str | Path | None = None, batch_size: int = 2,
                  device: str = "cpu") -> dict[str, torch.Tensor]:
    """Token grids of every volume with a trained tokenizer (the generator's training data).

    ``window``: the prep preset's HU window. Writes ``out_path`` (safetensors, {key: (t, h, w) int32})
    and ``<out>.prompts.json`` ({key: prompt}); with ``recon_path`` also the tokenizer's reconstructions
    ({key: (D, h, w) float16 in [-1, 1]}), the low-res inputs GenerateCT trained its super-resolution stage on.
    """
    from ctgen.models.ctvit import CTViT

    model = CTViT.from_pretrained(tokenizer_dir, map_location=device).eval()
    volumes = load_volumes(manifests, window, prompt=prompt)
    grids, recons = {}, {}
    for i in range(0, len(volumes), batch_size):
        chunk = volumes[i:i + batch_size]
        video = downsample(torch.stack([v["volume"].float() for v in chunk]), lowres_scale).to(device)
        idx = model.encode(video)  # (B, t, h, w)
        if recon_path:
            rec = model.decode(idx, num_slices=video.shape[2])  # (B, 1, D, h, w)
        for j, v in enumerate(chunk):
            grids[v["key"]] = idx[j].to(torch.int32).cpu().contiguous()
            if recon_path:
                recons[v["key"]] = rec[j, 0].clamp(-1, 1).half().cpu().contiguous()
    out_path = Path(out_path)
    atomic_write(out_path, lambda p: save_file(grids, p))
    atomic_write(out_path.with_suffix(".prompts.json"),
                 lambda p: Path(p).write_text(json.dumps({v["key"]: v["prompt"] for v in volumes}, indent=1)))
    if recon_path:
        atomic_write(Path(recon_path), lambda p: save_file(recons, p))
    log.info("encoded %d volumes to token grids of shape %s", len(grids), tuple(next(iter(grids.values())).shape))
    return grids
