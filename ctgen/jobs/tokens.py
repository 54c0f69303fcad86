"""The step between tokenizer and generator: token grids (and reconstructions) of the shards' volumes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from ctgen.data.batches import load_volumes
from ctgen.data.layout import downsample
from ctprep.errors import UserError
from ctprep.logs import progress
from ctprep.volume import atomic_write

log = logging.getLogger(__name__)


def recorded_lowres_scale(tokenizer_dir: str | Path) -> int | None:
    """The ``lowres_scale`` the tokenizer was trained with (its config.json's training data), or None."""
    meta = json.loads((Path(tokenizer_dir) / "config.json").read_text())
    value = (meta.get("provenance", {}).get("data") or {}).get("lowres_scale")
    return None if value is None else int(value)


def _lowres_scale(tokenizer_dir: str | Path, given: int | None) -> int:
    """The scale to encode at: the tokenizer's own; one given that differs from it is refused (other token grids)."""
    recorded = recorded_lowres_scale(tokenizer_dir)
    if given is None and recorded is None:
        raise UserError(f"{tokenizer_dir} does not record the lowres_scale it was trained with: pass --lowres-scale")
    if given is not None and recorded is not None and given != recorded:
        raise UserError(f"lowres_scale {given} differs from the {recorded} the tokenizer in {tokenizer_dir} was "
                        "trained with: its token grids would not be the generator's")
    return recorded if given is None else given


@torch.no_grad()
def encode_tokens(tokenizer_dir: str | Path, manifests: list[str], out_path: str | Path, lowres_scale: int | None,
                  window, prompt: str | None = None, recon_path: str | Path | None = None, batch_size: int = 2,
                  device: str = "cpu") -> dict[str, torch.Tensor]:
    """Token grids of every volume with a trained tokenizer (the generator's training data).

    ``lowres_scale``: None takes the tokenizer's own (recorded in its config.json); a different one
    is refused. ``window``: the prep preset's HU window. Writes ``out_path`` (safetensors, {key: (t, h, w) int32})
    and ``<out>.prompts.json`` ({key: prompt}); with ``recon_path`` also the tokenizer's reconstructions
    ({key: (D, h, w) float16 in [-1, 1]}), the low-res inputs GenerateCT trained its super-resolution stage on.
    """
    from ctgen.models.ctvit import CTViT

    lowres_scale = _lowres_scale(tokenizer_dir, lowres_scale)
    model = CTViT.from_pretrained(tokenizer_dir, map_location=device).eval()
    volumes = load_volumes(manifests, window, prompt=prompt)
    grids, recons = {}, {}
    for i in progress(range(0, len(volumes), batch_size), desc="encode tokens", unit="batch"):
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
