"""GPU smoke test of the paper presets: one training step of every model and one paper-geometry sample.

Each measurement runs in a fresh process (peak memory is its own): one training step (after one
warm-up step) of the tokenizer, generator, super-resolution model, CLIP and classifier at the paper
geometry (prep 512 x 512 x 201, tokenizer 128 x 128 x 201, 101 x 8 x 8 tokens) through the training
loop's step functions (bf16 autocast and the fused AdamW kernel on CUDA), then one sample: the whole
low-res volume (MaskGIT with guidance batched, tokenizer decode) and super-resolution of a few slices.
Untrained weights: this measures speed and memory, not images.

    python benchmarks/gpu_smoke.py [--device cuda] [--steps 18] [--sr-slices 4] [--out results/benchmarks/gpu_smoke.json]

On a CPU (``--device cpu``) it runs the same code, slowly (about ten minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODELS = ("tokenizer", "generator", "superres", "clip", "classifier")

CHILD = r"""
import json, sys, yaml, torch
part, device, repo, cfg_path, steps, sr_slices = sys.argv[1:7]
sys.path.insert(0, repo)
if device == "cpu":
    torch.set_num_threads(2)
from ctgen.jobs.smoke import sample_step, training_step
cfg = yaml.safe_load(open(cfg_path))
if part == "sample":
    out = sample_step(cfg, device=device, steps=int(steps), sr_slices=int(sr_slices))
else:
    out = training_step(part, cfg, device=device, steps=2)  # a warm-up step, then the timed one
print("RESULT " + json.dumps(out))
"""


def paper_config(preset: str) -> dict:
    from ctgen.jobs.smoke import paper_config as set_paper

    return set_paper(yaml.safe_load((REPO / "config.yaml").read_text()), preset)


def run(part: str, device: str, cfg_path: Path, steps: int, sr_slices: int, timeout: int) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, part, device, str(REPO), str(cfg_path), str(steps),
                          str(sr_slices)], capture_output=True, text=True, timeout=timeout)
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        return {"model": part, "error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="paper", help="model preset (its prep grid: presets.paper)")
    ap.add_argument("--steps", type=int, default=18, help="MaskGIT decoding steps of the sample (GenerateCT: 18)")
    ap.add_argument("--sr-slices", type=int, default=4, help="slices super-resolved in the sample")
    ap.add_argument("--models", nargs="+", default=[*MODELS, "sample"], choices=[*MODELS, "sample"],
                    help="the training steps to time, and the sample")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / f"gpu_smoke_{args.preset}.yaml"
        cfg_path.write_text(yaml.safe_dump(paper_config(args.preset)))
        for part in args.models:
            results.append(run(part, args.device, cfg_path, args.steps, args.sr_slices, args.timeout))
            print(json.dumps(results[-1]), flush=True)
    print(f"\n| {args.preset} at 512x512x201 ({args.device}) | params | batch | s/step | peak GiB | precision |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['model']} | failed: {r['error']} | | | | |")
        elif "step_s" in r:
            print(f"| {r['model']} training step | {r['parameters'] / 1e6:.1f} M | {r['batch_size']} | {r['step_s']:.2f} "
                  f"| {r['peak_gib']:.2f} | {r['precision']}{', fused AdamW' if r['fused_adamw'] else ''} |")
        else:
            print(f"| sample: low-res {'x'.join(map(str, r['lowres_shape']))} ({r['maskgit_steps']} MaskGIT steps, "
                  f"guidance batched) | | 1 | {r['lowres_s']:.2f} | {r['peak_gib']:.2f} | |")
            print(f"| sample: super-resolution {r['superres_slices']} slices to {r['superres_shape']} | | | "
                  f"{r['superres_s_per_slice']:.2f} per slice | | |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
