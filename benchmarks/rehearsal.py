"""Rehearsal: the whole workflow on a cohort of N and of 4N volumes; per-rule wall time and peak RSS.

Each size runs in its own working folder from nothing (the demo cohort is generated there), through
the Snakefile with an edited copy of config.yaml, and the figures come from Snakemake's own
benchmark files (``results/benchmarks/**.tsv``: wall seconds and max_rss per job). The target: every
training job's peak RSS at 4N within 1.2x of its peak at N (streamed data: a job's memory is its
batch's, not its cohort's), and each training job the profile sets out to measure measured at both sizes;
exits 1, with a line that says which, otherwise.
Each job runs 2 steps of batch 1, so it reads the same 2 volumes at N and 4N: a decode cache or a
per-volume leak would not show here. ``benchmarks/train_stream.py`` is the per-volume check: a training
job (the classifier's) that reads every volume of N and 4N, one epoch, its peak within half the added
volumes' int16 size.

- ``--profile full``: CT-RATE-size scans (512 x 512 pixels of 0.6-0.8 mm, 200-400 slices of 0.8-1.6 mm),
  the ``paper`` prep grid (512 x 512 x 201 at 0.75 x 0.75 x 1.5 mm) and the ``paper`` model sizes
  (lowres_scale 4): cohort, prep, shards, every training job (two steps each, batch 1: one slice for the
  super-resolution) and token encoding through the Snakefile; then, with the larger cohort's
  models, a short sample (``ctgen sample``: the low-res volume at full depth, and a volume of
  ``--sample-slices`` slices through the super-resolution), timed with its peak RSS. Not the
  workflow's ``sample`` and ``evaluate`` jobs: at 512 px one super-resolution step costs 2.1 TFLOP,
  ~28 s a slice on 2 CPU cores, so a 201-slice volume takes hours on a CPU (a GPU's figures:
  ``benchmarks/gpu_smoke.py``), and their memory does not depend on the cohort. About an hour on
  2 cores at --n 2: a benchmark.
- ``--profile small`` (CI): the tiny test config (64 x 64 x 32 grid, tiny models; its cohort with N and 4N
  training patients), training jobs only. The CI test takes the tests' tiny demo run as N = 3.

    python benchmarks/rehearsal.py [--profile full|small] [--n 4] [--factor 4] [--sample-slices 5]
                                   [--out results/benchmarks/rehearsal.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CASCADE = ("tokenizer", "generator", "superres", "clip", "classifier")  # the paper preset's models (no latent family)
TARGETS = ("train_tokenizer", "train_generator", "train_superres", "train_clip", "train_classifier",
           "train_autoencoder", "train_latent_flow", "train_slicenet")  # the small profile's: every network's training
#: every training job whose peak must not grow with the cohort: the targets', and those that only some configs run
#: (the TSTR classifiers need samples of the training reports; the report encoder, a config that pretrains one),
#: checked where both runs have them
TRAINING = (*TARGETS, "train_tstr", "train_report_encoder")
LIMIT = 1.2  # a training job's peak RSS at 4N over its peak at N (streamed data: its batch's, not its cohort's)
STEPS = {"max_steps": 2, "batch_size": 1, "warmup_steps": 0, "ckpt_every": 1000, "log_every": 1, "tensorboard": False}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def overrides(profile: str, n: int) -> dict:
    """The config edits of one rehearsal size (``n`` training patients, one scan and reconstruction each)."""
    if profile == "small":  # the tests' tiny config (n 3: the tiny demo itself) with n training patients
        tiny = yaml.safe_load((REPO / "tests/workflow/configs/tiny.yaml").read_text())
        return merge(tiny, {"demo": {"n_train_patients": n, "n_valid_patients": max(1, n // 3)}})
    cohort = {"n_train_patients": n, "n_valid_patients": max(2, n // 4), "max_scans_per_patient": 1,
              "max_recons_per_scan": 1, "faults": []}
    models = {m: {"train": STEPS} for m in CASCADE}
    # one 512 px slice a step: 12.4-13.3 GB peak RSS in fp32 on the CPU (2 slices went past 24 GB at the second step)
    models["superres"]["train"] = {**STEPS, "batch_size": 1}
    models["superres"]["data"] = {"slices_per_volume": 1}
    models["clip"]["train"] = {**STEPS, "batch_size": 2}  # InfoNCE needs two pairs
    return {
        "demo": {**cohort, "matrix": 512, "slices": [200, 400], "fov_mm": [310, 410], "z_spacing_mm": [0.8, 1.6]},
        "prep": {"preset": "paper", "n_chunks": 2},
        "shards": {"shard_size": 4},
        "models": {"preset": "paper", "lowres_scale": 4, "generators": ["cascade"],
                   "resources": {m: {"threads": 2, "mem_mb": 16000, "runtime": 600, "gpu": 0}
                                 for m in CASCADE}},
        "model_presets": {"paper": models},
        "sampling": {"max_prompts": 1, "steps": 2, "sr_steps": 2, "batch_size": 8, "dicom": False},
        "evaluation": {"tstr": False, "guidance_scales": [1.0], "slices_per_volume": 4},
    }


def run(profile: str, n: int, root: Path, cores: int, targets: list[str]) -> dict:
    """One size from nothing; {rule or rule/wildcards: {"s", "max_rss_mb"}} from the benchmark files."""
    work = root / f"n{n}"
    work.mkdir(parents=True, exist_ok=True)
    cfg = merge(yaml.safe_load((REPO / "config.yaml").read_text()), overrides(profile, n))
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work),
                          "--configfile", str(work / "config.yaml"), "--cores", str(cores), *targets],
                         capture_output=True, text=True, cwd=work, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"rehearsal n={n} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return {"n": n, "wall_s": time.perf_counter() - t0, "rules": read_benchmarks(work / "results" / "benchmarks")}


# the child's own peak RSS: RUSAGE_CHILDREN of a process that waited for nothing else
SAMPLE_CHILD = r"""
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.run(sys.argv[1:]).returncode
print(json.dumps({"rc": rc, "s": time.perf_counter() - t0,
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def short_sample(work: Path, slices: int) -> dict:
    """Two cascade samples with ``work``'s models (2 MaskGIT steps, no guidance), each timed with its peak RSS:
    the whole low-res volume at the generator's full depth without super-resolution, and a ``slices``-slice
    volume through the super-resolution (1 step)."""
    out = {"slices": slices}
    for name, extra in (("lowres", ["--no-superres"]), ("superres", ["--num-slices", str(slices), "--sr-steps", "1",
                                                                       "--batch-size", str(slices)])):
        cmd = [sys.executable, "-m", "ctgen.cli", "sample", "--models", str(work / "results" / "models"),
               "--prompt", "65 years old male: Cardiomegaly. Bilateral pleural effusion.", "--out",
               str(work / f"short_sample_{name}.nii.gz"), "--steps", "2", "--guidance-scale", "1", "--device", "cpu",
               *extra]
        res = subprocess.run([sys.executable, "-c", SAMPLE_CHILD, *cmd], capture_output=True, text=True, cwd=REPO)
        got = json.loads(res.stdout.strip().splitlines()[-1]) if res.stdout.strip() else {"rc": res.returncode}
        if got["rc"] != 0:
            raise RuntimeError(f"short sample ({name}) failed:\n{res.stderr[-3000:]}")
        out[name] = {"s": got["s"], "max_rss_mb": got["max_rss_mb"]}
    return out


def read_benchmarks(folder: Path) -> dict[str, dict[str, float]]:
    """{job: {"s", "max_rss_mb"}} of every Snakemake benchmark TSV under ``folder`` (``results/benchmarks``).

    Snakemake samples a job's memory every half second or more, so a short job's benchmark can miss its
    peak: a tiny flow-network training read 664 MB at N and 850 MB at 4N, while the kernel's peak of the
    same jobs was 845 and 850 MB. A training job's max_rss is therefore the larger of the sampled one and
    the kernel peak (``VmHWM``, ``ctprep.memory``) that the training loop writes to ``train_summary.json``.
    """
    out = {}
    for path in sorted(folder.rglob("*.tsv")):
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        if rows and "max_rss" in rows[0]:
            job = str(path.relative_to(folder).with_suffix(""))
            rss = rows[-1]["max_rss"]
            rss = float(rss) if rss not in ("", "-", "NA") else None
            # train_tstr/real.tsv is models/tstr_real's
            summary = folder.parent / "models" / job.replace("/", "_").removeprefix("train_") / "train_summary.json"
            if job.split("/")[0] in TRAINING and summary.is_file():
                loop = json.loads(summary.read_text())
                if loop.get("peak_memory_kind") == "cpu_max_rss_bytes":  # not a GPU's memory
                    rss = max(rss or 0.0, loop["peak_memory_bytes"] / 2**20)
            out[job] = {"s": float(rows[-1]["s"]), "max_rss_mb": rss}
    return out


def flatness(small: dict, large: dict, limit: float = LIMIT) -> list[dict]:
    """Training jobs' peak RSS at the larger cohort over the smaller one, and whether each is within ``limit``."""
    rows = []
    for job in sorted(small["rules"]):
        if job.split("/")[0] not in TRAINING or job not in large["rules"]:
            continue
        a, b = small["rules"][job]["max_rss_mb"], large["rules"][job]["max_rss_mb"]
        ratio = b / a if a and b else None
        rows.append({"job": job, "rss_n_mb": a, "rss_4n_mb": b, "ratio": ratio,
                     "ok": ratio is not None and ratio <= limit})
    return rows


def coverage(small: dict, large: dict, expected: tuple[str, ...]) -> list[str]:
    """The ``expected`` training jobs not measured at both sizes, one line each: :func:`flatness` cannot compare
    such a job (its growth would go unseen), and no rows at all would pass as within the limit. Jobs outside
    ``expected`` may run at one size only (the tests' N is the whole tiny demo, its TSTR classifiers too)."""
    sizes = {job: [run["n"] for run in (small, large) if any(j.split("/")[0] == job for j in run["rules"])]
             for job in expected}
    return [f"{job} was measured at N={ns[0]} only" if ns else f"{job} was measured at neither size"
            for job, ns in sizes.items() if len(ns) < 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=("full", "small"), default="full")
    ap.add_argument("--n", type=int, default=4, help="training patients of the smaller cohort")
    ap.add_argument("--factor", type=int, default=4, help="the larger cohort is n x factor")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--root", type=Path, help="working folders (default: a temporary folder, removed)")
    ap.add_argument("--out", type=Path, help="write the figures as JSON")
    ap.add_argument("--sample-slices", type=int, default=5,
                    help="full profile: slices of the short sample (super-resolved at 512 px, ~28 s each)")
    args = ap.parse_args()
    if args.profile == "small":
        targets = [f"results/models/{m.removeprefix('train_')}/model.safetensors" for m in TARGETS]
    else:  # the cascade's training jobs and its spec (the paper preset has no latent family)
        targets = [f"results/models/{m}/model.safetensors" for m in CASCADE] + ["results/models/cascade.json"]
    sample = None
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        small = run(args.profile, args.n, root, args.cores, targets)
        large = run(args.profile, args.n * args.factor, root, args.cores, targets)
        if args.profile == "full":
            sample = short_sample(root / f"n{args.n * args.factor}", args.sample_slices)
    rows = flatness(small, large)
    expected = TARGETS if args.profile == "small" else tuple(f"train_{m}" for m in CASCADE)
    problems = coverage(small, large, expected) + [f"{r['job']} peak RSS at 4N over N {r['ratio']} (limit {LIMIT})"
                                                   for r in rows if not r["ok"]]
    print(f"\n| job | N={args.n}: s | peak RSS MB | 4N={args.n * args.factor}: s | peak RSS MB | ratio |")
    print("|---|---|---|---|---|---|")
    for job in sorted(set(small["rules"]) | set(large["rules"])):
        a, b = small["rules"].get(job, {}), large["rules"].get(job, {})
        ratio = (b.get("max_rss_mb") or 0) / a["max_rss_mb"] if a.get("max_rss_mb") else None
        print(f"| {job} | {a.get('s', float('nan')):.1f} | {a.get('max_rss_mb') or float('nan'):.0f} | "
              f"{b.get('s', float('nan')):.1f} | {b.get('max_rss_mb') or float('nan'):.0f} | "
              f"{'' if ratio is None else f'{ratio:.2f}'} |")
    print(f"\nwall: N {small['wall_s']:.0f} s, 4N {large['wall_s']:.0f} s; training jobs within {LIMIT}x: "
          f"{sum(r['ok'] for r in rows)} of {len(rows)}")
    if sample:
        lo, sr = sample["lowres"], sample["superres"]
        print(f"short sample: low-res volume at full depth {lo['s']:.0f} s, peak RSS {lo['max_rss_mb']:.0f} MB; "
              f"{sample['slices']} slices through the super-resolution {sr['s']:.0f} s, "
              f"peak RSS {sr['max_rss_mb']:.0f} MB")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"small": small, "large": large, "flatness": rows, "sample": sample},
                                       indent=1) + "\n")
    if problems:
        print(f"FAIL: {'; '.join(problems)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
