"""Training speed of every model at the demo preset on the CPU: steps/s, s/step and peak memory.

Each model runs in a fresh Python process with ``torch.set_num_threads(threads)`` (peak RSS is the
process's VmHWM). The model and its batches are what ``ctgen/jobs/train.py``
builds from ``config.yaml`` (``model_presets.demo`` + ``models``): the small trainable text encoder
(vocabulary ``models.text_encoder.vocab_size``, text width fitted by ``ctgen.jobs.train.fit_text_dims``), the
preset's batch size, random inputs on the demo grid (prep 64 x 64 x 32 -> model layout (1, 32, 64, 64)):

- ``tokenizer``: video (B, 1, 32, 32, 32) (``lowres_scale`` 2); ``tokenizer-gan``: the same at
  ``step >= adversarial_start`` (adaptive GAN weight on: a second autograd pass);
- ``generator``: token grids (B, t, h, w) from ``CTViT.tokens_shape`` + text ids (B, 24);
- ``superres``: slices hr (B, 1, 64, 64) / lr (B, 1, 32, 32) + text ids;
- ``clip``: volumes (B, 1, 32, 64, 64) + text ids; ``classifier``: volumes + 18 labels.

A step is the loop's (``ctgen/training/loop.py``): forward + backward (``accumulate_gradients``), gradient
clipping, AdamW (``build_optimizer``), LR schedule, EMA when the preset has one. ``--warmup`` steps,
then ``--steps`` timed ones.

    python benchmarks/train_demo.py [--threads 2] [--warmup 3] [--steps 10] [--models ...]
                                    [--out results/benchmarks/train_demo.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = ("tokenizer", "tokenizer-gan", "generator", "superres", "clip", "classifier")
TEXT_LEN = 24  # text tokens per prompt: a short "{age} years old {sex}: {impression}" prompt
log = logging.getLogger("train_demo")

# The child: builds one model and its batches as the task builders do, warms up, times the loop's steps.
CHILD = r"""
import json, os, sys, time
kind, threads, repo, warmup, steps, text_len = sys.argv[1], int(sys.argv[2]), sys.argv[3], *map(int, sys.argv[4:7])
sys.path.insert(0, repo)
import torch, yaml
torch.set_num_threads(threads)
from ctgen.data.layout import downsample
from ctgen.jobs.train import build_model, fit_text_dims, label_pos_weight
from ctgen.training.loop import TrainConfig, accumulate_gradients
from ctgen.training.ema import EMA
from ctgen.training.optim import build_optimizer, build_scheduler
def hwm_mib():  # this process's own peak RSS
    from ctprep.memory import peak_rss_bytes
    return peak_rss_bytes() / 2**20
config = yaml.safe_load(open(f"{repo}/config.yaml"))
models, name = config["models"], kind.split("-")[0]
preset = config["model_presets"]["demo"][name]
scale = int(models["lowres_scale"])
cfg = {"model": dict(preset["model"]), "train": preset["train"], "data": {"lowres_scale": scale, **preset.get("data", {})}}
if "text_encoder" in preset:  # as workflow/rules/common.smk get_train_config (small text encoder)
    cfg["text_encoder"] = {**preset["text_encoder"], "vocab_size": models["text_encoder"]["vocab_size"],
                           "max_length": models["text_encoder"]["max_length"]}
    cfg = fit_text_dims(cfg)
tcfg = TrainConfig.from_dict(cfg["train"])
b = tcfg.batch_size
k_shape = config["presets"][config["prep"]["preset"]]["shape"]  # prep grid (I=W, J=H, K=D)
d, hh, ww = k_shape[2], k_shape[1], k_shape[0]
torch.manual_seed(tcfg.seed)
def volumes():  # (B, 1, D, H, W) in [-1, 1]: a smooth body-like blob plus noise
    zz, yy, xx = torch.meshgrid(*(torch.linspace(-1, 1, n) for n in (d, hh, ww)), indexing="ij")
    body = (xx ** 2 / 0.8 + yy ** 2 / 0.5 < 1).float() * 0.9 - 0.9
    return (body + 0.1 * torch.randn(b, 1, d, hh, ww)).clamp(-1, 1)
def text():
    ids = torch.randint(5, models["text_encoder"]["vocab_size"], (b, text_len))
    mask = torch.arange(text_len)[None] < torch.randint(text_len // 2, text_len + 1, (b, 1))  # padded prompts
    return {"text_ids": ids.masked_fill(~mask, 0), "text_mask": mask}
if name in ("tokenizer", "generator", "superres"):
    model = build_model(name, cfg)
elif name == "clip":
    from ctgen.models.clip3d import CLIP3D
    model = CLIP3D(CLIP3D.config_from_dict({**cfg["model"], "text_encoder": cfg["text_encoder"]}))
else:
    from ctgen.models.classifier3d import Classifier3D
    cohort_labels = (torch.rand(20, 18) < 0.25).float()  # ~20 demo volumes, ~25% positive
    mc = {**cfg["model"], "pos_weight": label_pos_weight(cohort_labels)}
    model = Classifier3D(Classifier3D.config_from_dict(mc))
if name == "generator":
    from ctgen.models.ctvit import CTViT
    tok = CTViT(CTViT.config_from_dict(config["model_presets"]["demo"]["tokenizer"]["model"]))
    grid = tok.tokens_shape(d, hh // scale, ww // scale)  # the tokenizer's grid at lowres_scale
def batch():
    if name == "tokenizer":
        return {"video": downsample(volumes(), scale)}
    if name == "generator":
        return {"tokens": torch.randint(0, cfg["model"]["codebook_size"], (b, *grid)), **text()}
    if name == "superres":
        hr = volumes()[:, :, d // 2]  # (B, 1, H, W)
        return {"hr": hr, "lr": downsample(hr, scale), **text()}
    if name == "clip":
        return {"video": volumes(), **text()}
    return {"video": volumes(), "labels": (torch.rand(b, 18) < 0.25).float()}
batches = [batch() for _ in range(4)]
shape = {k: list(v.shape) for k, v in batches[0].items()}
device = torch.device("cpu")
model.train()
optimizer = build_optimizer(model, tcfg.lr, tcfg.weight_decay, tcfg.betas, device)
scheduler = build_scheduler(optimizer, tcfg.lr, tcfg.min_lr, tcfg.warmup_steps, tcfg.max_steps, tcfg.schedule)
ema = EMA(model, tcfg.ema_decay, tcfg.ema_start) if tcfg.ema_decay > 0 else None
params = [p for p in model.parameters() if p.requires_grad]
step0 = cfg["model"].get("adversarial_start", 0) if kind.endswith("-gan") else 0
times, load0 = [], os.getloadavg()[0]
for i in range(warmup + steps):
    t0 = time.perf_counter()
    micro = [batches[(i * tcfg.grad_accum + j) % len(batches)] for j in range(tcfg.grad_accum)]
    accumulate_gradients(model, micro, step=step0 + i, ddp=False)
    if tcfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
    optimizer.step(); scheduler.step(); optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(model, step0 + i + 1)
    if i >= warmup:
        times.append(time.perf_counter() - t0)
total = sum(times)
print(json.dumps({"model": kind, "steps_per_s": len(times) / total, "s_per_step": total / len(times),
                  "median_s": sorted(times)[len(times) // 2], "steps": len(times), "batch_size": b, "inputs": shape,
                  "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "max_steps": tcfg.max_steps,
                  "peak_mib": hwm_mib(), "load": [load0, os.getloadavg()[0]]}))
"""


def measure(kind: str, threads: int, warmup: int, steps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    res = subprocess.run([sys.executable, "-c", CHILD, kind, str(threads), str(REPO), str(warmup), str(steps),
                          str(TEXT_LEN)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def table(results: list[dict], threads: int) -> str:
    rows = [f"| model (demo, {threads} CPU threads, fp32) | params | batch | inputs | steps/s | s/step (mean / median) "
            "| preset max_steps at this speed | peak RSS | 1-min load before/after |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        inputs = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in r["inputs"].items())
        rows.append(f"| {r['model']} | {r['params_m']:.2f} M | {r['batch_size']} | {inputs} | {r['steps_per_s']:.2f} "
                    f"| {r['s_per_step']:.3f} / {r['median_s']:.3f} | {r['max_steps'] / r['steps_per_s'] / 60:.1f} min "
                    f"| {r['peak_mib']:.0f} MiB | {r['load'][0]:.1f} / {r['load'][1]:.1f} |")
    rows.append(f"\n{threads} = an idle machine in the load column; other jobs sharing the cores inflate the times. "
                "tokenizer-gan: steps past adversarial_start (the demo tokenizer spends its last steps there).")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocations, AdamW state)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per model")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--out", default=str(REPO / "results/benchmarks/train_demo.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    results = []
    for kind in args.models:
        results.append(measure(kind, args.threads, args.warmup, args.steps))
        log.info("%s: %s", kind, json.dumps(results[-1]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "preset": "demo", "warmup": args.warmup,
                                          "results": results}, indent=1) + "\n")
    print(table(results, args.threads))  # the report itself goes to stdout


if __name__ == "__main__":
    main()
