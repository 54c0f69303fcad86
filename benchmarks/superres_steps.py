"""Super-resolution sampler steps against quality: PSNR of the trained demo model on real evaluation slices.

What the demo preset's ``sample_steps`` rests on. Each real evaluation volume of a finished demo (the
prep grid, HU clipped to the preset's window and mapped to [-1, 1]) is downsampled by ``lowres_scale``
(``ctgen.data.layout.downsample``, what the model trains on), super-resolved slice by slice with its own
prompt at each step count (seeded per volume: every count sees the same noise stream), and compared
with the real slices: PSNR over the [-1, 1] range (peak-to-peak 2), averaged over volumes, beside
bilinear upsampling of the same input and the seconds per volume.

    python benchmarks/superres_steps.py [--results results] [--steps 1 2 3 5 8] [--volumes 12]
                                        [--threads 1] [--out results/benchmarks/superres_steps.json]

Run in a finished demo's folder (``results/models`` with cascade.json, ``results/samples/prompts.csv``,
``results/shards/<split>/manifest.json``). Measured on 2026-12-03 (12 volumes, 1 thread): 29.2 dB at 1
step, 29.9 at 2, 29.8 at 3, 29.5 at 5, 29.2 at 8; bilinear 28.4 dB.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def psnr(a, b) -> float:
    """PSNR in dB of two tensors in [-1, 1] (peak-to-peak 2)."""
    return 10.0 * math.log10(4.0 / max(float(((a - b) ** 2).mean()), 1e-12))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="results", help="a finished demo's results folder")
    ap.add_argument("--split", default="valid", help="shard split of the real volumes")
    ap.add_argument("--steps", nargs="+", type=int, default=[1, 2, 3, 5, 8])
    ap.add_argument("--volumes", type=int, default=12, help="evaluation volumes (the first, by name)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON output (default: <results>/benchmarks/superres_steps.json)")
    args = ap.parse_args(argv)

    import pandas as pd
    import torch
    import torch.nn.functional as F

    from ctgen.data.layout import downsample, hu_to_unit
    from ctgen.jobs.pairing import Grid, RealSet
    from ctgen.pipelines.text_to_ct import TextToCTPipeline
    from ctprep.ctrate import volume_key

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    res = Path(args.results)
    models = res / "models"
    # a folder that is not a finished demo's: one line naming what is missing, not the first reader's traceback
    needed = [models / "cascade.json", res / "samples/prompts.csv", res / f"shards/{args.split}/manifest.json"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise SystemExit(f"{res} is not a finished demo's results folder: missing {', '.join(missing)}")
    pipe = TextToCTPipeline.from_pretrained(models)
    grid = Grid.from_models(models)
    scale = int(pipe.spec["grid"]["lowres_scale"])
    prompts = pd.read_csv(res / "samples/prompts.csv")
    text = {volume_key(i): p for i, p in zip(prompts["id"], prompts["prompt"])}
    wanted = set(sorted(text)[: args.volumes])
    vols = []  # (stem, hr (D, 1, H, W), lr (D, 1, h, w))
    for stem, hu, _ in RealSet([str(res / f"shards/{args.split}/manifest.json")]).read(wanted, grid):
        x = hu_to_unit(torch.from_numpy(hu), grid.clip).float().reshape(-1, *hu.shape[-2:])[:, None]  # (D, 1, H, W)
        vols.append((stem, x, downsample(x, scale)))
    if len(vols) != len(wanted):
        raise SystemExit(f"read {len(vols)} of {len(wanted)} volumes from the {args.split} shards")
    rows = []
    bilinear = [psnr(F.interpolate(lr, scale_factor=scale, mode="bilinear", align_corners=False), hr)
                for _, hr, lr in vols]
    for steps in args.steps:
        values, seconds = [], 0.0
        for j, (stem, hr, lr) in enumerate(vols):
            t = pipe.encode_text(pipe.superres, [text[stem]])
            t0 = time.perf_counter()
            out = pipe.superres.core.sample(lr, t["text"].expand(len(lr), -1, -1), t["text_mask"].expand(len(lr), -1),
                                            steps=steps, generator=torch.Generator().manual_seed(j), batch_size=64)
            seconds += time.perf_counter() - t0
            values.append(psnr(out, hr))
        rows.append({"steps": steps, "psnr_db": sum(values) / len(values), "s_per_volume": seconds / len(vols)})
        print(f"{steps} steps: PSNR {rows[-1]['psnr_db']:.2f} dB, {rows[-1]['s_per_volume']:.2f} s/volume", flush=True)
    summary = {"volumes": len(vols), "split": args.split, "threads": args.threads, "rows": rows,
               "bilinear_psnr_db": sum(bilinear) / len(bilinear)}
    print("\n| DDIM steps | PSNR | s/volume |\n|---:|---:|---:|")
    for r in rows:
        print(f"| {r['steps']} | {r['psnr_db']:.1f} dB | {r['s_per_volume']:.2f} |")
    print(f"\nbilinear: {summary['bilinear_psnr_db']:.1f} dB ({len(vols)} {args.split} volumes)")
    out = Path(args.out) if args.out else res / "benchmarks/superres_steps.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
