"""Peak memory of a training job that reads every volume of its cohort, at N and 4N volumes: it must not grow.

The project's promise is that a training job's memory is its batch's, not its cohort's (streamed shards).
``benchmarks/rehearsal.py`` runs every training job at N and 4N, but two steps of batch 1 each: both sizes
read the same 2 volumes, so a decode cache or a per-volume leak in the training data path or the loop
would not show there. Here the job reads all of them: a synthetic cohort of N and of 4N volumes
(``--shape`` voxels of random HU in the window, so the shards' compression cannot make a held raw sample
small: 1.4 MiB a volume in the shards; 128 x 128 x 64 is 2 MiB as int16) is written as shards with labels
and prompts (``ctprep.shards.write_shards`` and ``merge_manifests``, as the workflow's shard rules), then
the classifier trains on it through the real path (``ctgen.jobs.train.run_training``: streamed shards,
checksums, decode, augmentation, the training loop, checkpoints) in a fresh process per size, batch 1,
``max_steps`` = the cohort's size: one epoch, every volume decoded once. Its peak RSS is the process's own
VmHWM (``ctprep.memory.peak_rss_bytes``); with ``--workers 1`` the data worker's (it decodes, in a forked
process of its own) is the worker's own VmHWM (it writes it as it hands over each batch), checked the same way:
a forked worker's peak starts from the training process's memory at the fork, and what it holds adds to it.

The children run with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB (``ctprep.memory.FIXED_MALLOC``, its starting value; ``--malloc
default`` leaves it alone). By default glibc raises the threshold whenever a large mapped block is freed,
after which the step's ~100 MiB of transient buffers come from the heap, and the high-water mark depends on
how they fragment it: the job's peak varied by 47 MiB over 3 runs at 8 and 3 at 32 volumes (537-584 MiB, no
trend with the size), more than the bound below. With the threshold fixed every block of 128 KiB or more is mapped on its own and returned when freed,
so the peak is the job's live memory: 461.5-462.1 MiB over the same 6 runs. A held volume
(2 MiB as int16, 4 as float32) is such a block, and stays counted.

Exits 1 where a peak at 4N exceeds ``GROWTH_LIMIT`` x the peak at N, or grows by more than ``HELD_SHARE`` of the
added 3N volumes' int16 size (the ratio alone would not see them: 24 volumes of 2 MiB held as int16 add
48 MiB on a peak of ~460 MiB, 1.1x). The bound, 24 MiB at the defaults, leaves room for per-step
bookkeeping; a job holding every decoded volume (float32, as the model reads them) would add 96 MiB.
Figures (2 shared cores, 1 torch thread, the demo preset's classifier, defaults): peak 461.5 MiB at 8 volumes and
462.3 at 32 (7 s and 18 s); ``--workers 1``: the training process 454.9 and 454.6 MiB, the worker 312.4 and 312.6. A decode
step made to hold every volume it decodes (a local experiment) misses: +49 MiB held as int16 (1.10x, the ratio
alone passes), +96 MiB as float32 (1.20x), +46 MiB in the data worker; at ``--n 4`` +24 MiB on a 12 MiB bound.

``--model generator`` and ``--model latent_flow`` measure the demo preset's generator and latent flow model the
same way on their derived shards: token grids (17 x 8 x 8 int16 codes, 2 KiB) or latents (mu and sigma, 4 x 8 x 16 x 16
float16, 64 KiB), written with ``ctgen.data.derived.write_derived`` and the encode jobs' members (random codes, random
mu and sigma with their moments; no tokenizer or autoencoder is trained) beside tiny volume shards of the same keys,
and the small text encoder's tokenizer fitted on their prompts; the bound is half the added samples' 2-byte values.
Their samples are small, so the sizes are large. Figures (2 shared cores under other jobs' load, defaults otherwise):
latent flow ``--n 64``: 773.3 MiB at 64 latents, 773.7 at 256 (20 s, 63 s): within (bound 3 MiB); with its decode made
to hold every latent (``tests/ctgen/test_train_stream_memory.py``) ``--n 16`` misses. Generator ``--n 256`` (the
preset's ``log_every`` 20; the shard-index cache held to 4 shards in the child, as it is bounded by shards, 256, not by the cohort, but its few hundred bytes a sample outweigh a 2 KiB grid's bound): 489.1 MiB
at 256 grids, 489.4 at 1024 (18 s, 63 s): within (bound 0.8 MiB). With ``log_every`` 1 and the whole cache the same job
grew 2.5 MiB (492.4, 494.9): a metrics row kept per logged step and the cache's indexes, no grid held (tracemalloc).

``--model superres`` and ``--model clip`` train the demo preset's super-resolution model and CLIP model the same way
on volume shards (``cohort``) of the demo prep grid, their default ``--shape`` 64 x 64 x 32 (256 KiB as int16, 0.19
MiB in the shards), with the small text encoder's tokenizer fitted on the prompts: super-resolution one volume a
step (4 random slices of it, their low-res inputs downsampled from it: ``models.superres_lowres`` downsampled, the
default, no ``recon`` shards), CLIP two (its least batch: the other pair is the negative); one epoch, the preset's
``log_every`` 20, the classifier's bound. Figures (2026-12-07, 2 shared cores under other jobs' load): super-resolution
``--n 8``: 596.3 MiB at 8 volumes, 596.5 at 32 (8 s, 15 s; a rerun 596.1, 596.7); ``--n 32``: 596.6 at 32, 596.4 at 128 (14 s, 37 s). CLIP
``--n 8``: 403.2 and 403.6 (4 s each; a rerun 403.1, 403.7); ``--n 32``: 403.4 and 403.8. All within (bound 3 MiB at ``--n 8``, 12 at
32). ``--workers 1``, ``--n 8``: super-resolution 593.1 and 593.8 MiB, its worker 391.1 and 391.6; CLIP 399.9 and
399.9, its worker 297.2 and 297.0. With the decode made to hold every volume (float32, 512 KiB a volume; a local
experiment for super-resolution, ``tests/ctgen/test_train_stream_memory.py`` for CLIP) both miss at ``--n 8``: +12 MiB
(1.02x, 1.03x). At ``--n 4`` the super-resolution job misses with no volume held (+2 MiB on a 1.5 MiB bound): its
peak settles over its first steps (598.3 MiB at step 2, 599.0 at 4, 599.4 at 6, flat to step 15 of 16), so a 4-step
epoch ends below it; tracemalloc saw Python's memory grow 15 KiB from step 2 to 11 (the shard-index cache): a
native warm-up (torch, glibc), no volume held. Use ``--n 8`` or more for it.

    python benchmarks/train_stream.py [--model classifier|superres|clip|generator|latent_flow] [--n 8] [--shape R A S] [--workers 0|1] [--threads 1]
                                      [--malloc fixed|default] [--workdir /tmp/ctgen-train-stream-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ctprep.memory import FIXED_MALLOC, growth_verdict
from ctprep.shards import merge_manifests, write_shards
from ctprep.volume import Volume

REPO = Path(__file__).resolve().parents[1]
WINDOW = [-1000, 1000]
SPACING = (2.5, 2.5, 5.0)
SHARD_SIZE = 4  # volumes a shard: the same at both sizes (a reader holds one shard's index and file open)
DERIVED_SHARD_SIZE = 32  # token grids or latents a shard (a derived shard per source shard)
#: the demo preset's classifier (config.yaml); batch 1, one epoch, no checkpoints before the final one
CLASSIFIER = {"model": {"stem_stride": [2, 4, 4], "channels": [16, 32, 64], "blocks": [1, 1, 1], "norm_groups": 8,
                        "head_dropout": 0.1, "pos_weight": "auto"},
              "train": {"batch_size": 1, "lr": 0.002, "min_lr": 0.0002, "warmup_steps": 2, "weight_decay": 0.05,
                        "ckpt_every": 100_000, "log_every": 1, "seed": 0, "tensorboard": False, "device": "cpu"}}
#: the demo preset's generator and latent flow model and their small text encoder (config.yaml
#: model_presets.demo), trained the same way: batch 1, one epoch, no checkpoints before the final one
TEXT_ENCODER = {"dim": 64, "depth": 2, "heads": 4, "dropout": 0.1}
# log_every: the demo preset's 20 (a metrics row is kept in memory per logged step, for the checkpoint's copy: at 1
# that bookkeeping alone outgrew the generator's 0.8 MiB bound, its token grids being 2 KiB)
DERIVED_TRAIN = {"batch_size": 1, "warmup_steps": 2, "ema_decay": 0.99, "ckpt_every": 100_000, "log_every": 20,
                 "seed": 0, "tensorboard": False, "device": "cpu"}
GENERATOR = {"model": {"codebook_size": 256, "dim": 64, "depth": 2, "heads": 4, "dim_head": 16, "ff_mult": 2,
                       "text_dim": 64, "max_t": 17, "max_h": 8, "max_w": 8, "cond_drop_prob": 0.2, "dropout": 0.0,
                       "attention": "divided"},
             "text_encoder": TEXT_ENCODER,
             "train": {**DERIVED_TRAIN, "lr": 0.002, "min_lr": 0.0002, "schedule": "cosine", "weight_decay": 0.01,
                       "grad_clip": 1.0}}
LATENT_FLOW = {"model": {"latent_channels": 4, "latent_shape": [8, 16, 16], "channels": [16, 32],
                         "attention_levels": [False, True], "num_head_channels": [0, 16], "num_res_blocks": 1,
                         "norm_num_groups": 8, "cross_attention_dim": 64, "segments": ["structured"],
                         "cond_drop_prob": 0.15, "use_timestep_transform": False, "logit_normal_loc": 0.5,
                         "sample_steps": 20},
               "text_encoder": TEXT_ENCODER,
               "train": {**DERIVED_TRAIN, "lr": 0.001, "min_lr": 0.0001, "weight_decay": 0.0}}
#: the demo preset's super-resolution model and CLIP model, on volume shards of the demo prep grid (64 x 64 x 32),
#: trained the same way: super-resolution one volume a step (its batch: slices_per_volume slices of it), CLIP two
#: (its least: the other pair is the negative); one epoch, no checkpoints before the final one, the preset's log_every
SUPERRES = {"model": {"in_size": 32, "out_size": 64, "patch_size": 2, "channels": 32, "channel_mult": [1, 2, 2],
                      "layers_per_block": 1, "attention_levels": [1, 2], "attention_head_dim": 16, "norm_groups": 8,
                      "text_dim": 64, "cross_attention_dim": 64, "num_train_timesteps": 1000, "noise_aug_max": 0.2,
                      "noise_aug_sample": 0.05, "residual": True, "cond_drop_prob": 0.1, "sample_steps": 2,
                      "sampler": "ddim"},
            "text_encoder": TEXT_ENCODER,
            "train": {**DERIVED_TRAIN, "batch_size": 4, "lr": 0.001, "min_lr": 0.0001, "schedule": "cosine",
                      "weight_decay": 0.0, "grad_clip": 1.0},
            "data": {"slices_per_volume": 4, "lowres_scale": 2}}  # lowres_scale: config.yaml models.lowres_scale
CLIP = {"model": {"stem_stride": [2, 4, 4], "channels": [16, 32, 64], "blocks": [1, 1, 1], "norm_groups": 8,
                  "embed_dim": 64, "text_dim": 32},
        "text_encoder": {"dim": 32, "depth": 1, "heads": 2, "dropout": 0.1},
        "train": {"batch_size": 2, "lr": 0.002, "min_lr": 0.0002, "warmup_steps": 2, "weight_decay": 0.05,
                  "ckpt_every": 100_000, "log_every": 20, "seed": 0, "tensorboard": False, "device": "cpu"},
        "data": {"augment": {"flip_w": False, "intensity": 0.05}}}
#: each model's volumes (R, A, S) where --shape is not given: the classifier's, and the demo prep grid, which the
#: super-resolution model (out_size 64, in_size 32 at lowres_scale 2) and CLIP are built for
SHAPES = {"classifier": (128, 128, 64), "superres": (64, 64, 32), "clip": (64, 64, 32)}
VOLUME_MODELS = ("classifier", "superres", "clip")  # trained on volume shards (the others on derived ones)


def cohort(root: Path, n: int, shape: tuple[int, int, int], seed: int = 0) -> Path:
    """n training volumes of random HU in the window, in shards of SHARD_SIZE; returns the merged manifest."""
    rng = np.random.default_rng(seed)
    affine = np.diag([*SPACING, 1.0])

    def samples():
        for v in range(n):
            hu = rng.integers(WINDOW[0], WINDOW[1], size=shape, dtype=np.int16)
            labels = (rng.random(18) < 0.3).astype(np.float64)
            prompt, prompts = _volume_prompts(v)
            yield {"key": f"train_{v}_a_1", "volume": Volume.from_3d(hu, affine, source=f"train_{v}"),
                   "prompt": prompt, "prompts": prompts, "meta": {}, "labels": labels}

    write_shards(samples(), root / "c0", prefix="train-c000", shard_size=SHARD_SIZE, split="train")
    manifest = root / "manifest.json"
    merge_manifests([root / "c0" / "train-c000.manifest.json"], manifest, split="train")
    return manifest


def _volume_prompts(v: int) -> tuple[str, dict[str, str]]:
    """The prompt and prompts ``cohort`` writes for volume v."""
    return _prompts(v)[0], {"generatect": f"finding {v % 5}"}


def cohort_tokenizer(root: Path, n: int) -> Path:
    """The small text encoder's tokenizer fitted on the prompts ``cohort`` writes for its n volumes."""
    return fit_tokenizer(root, {t for v in range(n) for t in (_volume_prompts(v)[0], *_volume_prompts(v)[1].values())})


def fit_tokenizer(root: Path, texts) -> Path:
    """The small text encoder's tokenizer (a vocabulary of 120) fitted on ``texts``: ``root/text.json``."""
    from ctgen.models.text_encoders import fit_text_tokenizer

    tokenizer = root / "text.json"
    fit_text_tokenizer(sorted(texts), 120, tokenizer)
    return tokenizer


def _prompts(v: int) -> tuple[str, dict[str, str], dict[str, str]]:
    """The prompt, prompts and report sections of volume v (a few distinct words: a small vocabulary)."""
    prompt = f"{40 + v % 30} years old male: finding {v % 5}."
    report = {"findings": f"finding {v % 5} in the right lung.", "impression": f"finding {v % 5}."}
    return prompt, {"generatect": prompt, "structured": f"finding {v % 5}"}, report


def derived_cohort(root: Path, n: int, model: str, seed: int = 0) -> tuple[Path, Path, tuple[int, ...]]:
    """n training samples of the generator's token shards or the flow model's latent shards, written as the
    workflow's encode jobs write them (``write_derived``, ``MEMBERS`` of ``ctgen.jobs.tokens`` / ``latents``)
    beside small volume shards of the same keys (their source), with random codes or random mu and sigma of the
    demo model's grid instead of a trained tokenizer's or autoencoder's; and the small text encoder's
    tokenizer, fitted on their prompts. Returns (derived manifest, tokenizer, one sample's grid)."""
    from ctgen.data.derived import write_derived
    import torch

    from ctgen.jobs import latents, tokens
    from ctgen.models.autoencoder import LatentStats

    rng = np.random.default_rng(seed)
    affine = np.diag([*SPACING, 1.0])

    def volumes():  # the source shards: their keys and checksums (tiny volumes: the job never reads them)
        for v in range(n):
            prompt, prompts, report = _prompts(v)
            yield {"key": f"train_{v}_a_1", "volume": Volume.from_3d(np.zeros((4, 4, 4), np.int16), affine,
                                                                      source=f"train_{v}"),
                   "prompt": prompt, "prompts": prompts, "meta": {"report": report},
                   "labels": (rng.random(18) < 0.3).astype(np.float64)}

    # shards of DERIVED_SHARD_SIZE samples: the readers' index cache keeps up to 256 shards' indexes (a few hundred
    # bytes a sample), which at 4 a shard filled at 1024 samples and counted against a 2 KiB sample's bound
    write_shards(volumes(), root / "c0", prefix="train-c000", shard_size=DERIVED_SHARD_SIZE, split="train")
    source = root / "c0" / "train-c000.manifest.json"
    if model == "generator":
        m = GENERATOR["model"]
        grid = (m["max_t"], m["max_h"], m["max_w"])
    else:
        grid = (LATENT_FLOW["model"]["latent_channels"], *LATENT_FLOW["model"]["latent_shape"])
    stats = LatentStats()  # the moments encode_latents writes into the manifest (the flow model's scale factor)

    def samples():
        for v in range(n):
            prompt, prompts, report = _prompts(v)
            common = {"__key__": f"train_{v}_a_1", "prompt.txt": prompt, "prompts.json": prompts,
                      "labels.npy": np.where(rng.random(18) < 0.3, 1, 0).astype(np.uint8)}
            if model == "generator":
                yield {**common, "tokens.npy": rng.integers(0, GENERATOR["model"]["codebook_size"], size=grid,
                                                            dtype=np.int16)}
                continue
            mu = rng.standard_normal(grid).astype(np.float16)
            sigma = rng.uniform(0.05, 1.0, size=grid).astype(np.float16)
            stats.update(torch.from_numpy(mu), torch.from_numpy(sigma))
            yield {**common, "mu.npy": mu, "sigma.npy": sigma, "report.json": report,
                   "spacing.npy": np.asarray(SPACING, np.float32)}

    if model == "generator":
        manifest = write_derived(source, samples(), root / "tokens", "tokens", "bench@random",
                                 {k: v for k, v in tokens.MEMBERS.items() if k != "recon.npy"})
    else:
        manifest = write_derived(source, samples(), root / "latents", "latents", "bench@random", latents.MEMBERS,
                                 stats=stats.sums)
    tokenizer = fit_tokenizer(root, {t for v in range(n) for t in (_prompts(v)[0], *_prompts(v)[1].values(),
                                                                       *_prompts(v)[2].values())})
    return manifest, tokenizer, grid


#: trains argv[6] (classifier, superres, clip, generator, latent_flow) on argv[1]'s config into argv[2] (checkpoints under argv[3], argv[4] torch threads) and
#: prints, as its last line of stdout, the peaks (KiB, VmHWM) of this process and of its data worker (0: none). The
#: worker reports its own: it writes its peak to argv[5]/worker-<pid> as it hands over each batch (it ends without
#: running the dataset's ``finally``, and a reaped child's ``ru_maxrss`` would carry this process's peak over exec)
CHILD = """\
import json, os, sys
import torch
from ctgen.data import stream
from ctgen.jobs.train import run_training
from ctprep.memory import peak_rss_bytes

config, out, checkpoints, threads, peaks, kind = sys.argv[1:7]
iterate = stream.PlannedBatches.__iter__


def watched(self):
    for item in iterate(self):
        if torch.utils.data.get_worker_info() is not None:
            with open(os.path.join(peaks, f"worker-{os.getpid()}"), "w") as fh:
                fh.write(str(peak_rss_bytes() // 1024))
        yield item


stream.PlannedBatches.__iter__ = watched
if kind in ("generator", "latent_flow"):  # the shard-index cache (INDEX_CACHE shards) is bounded by shards, not by the cohort, but
    stream.INDEX_CACHE = 4  # its few hundred bytes a sample outweigh a 2 KiB token grid's bound below 256 shards
torch.set_num_threads(int(threads))
run_training(kind, json.loads(open(config).read()), out, checkpoints)
workers = [int(open(os.path.join(peaks, f)).read()) for f in os.listdir(peaks)]
print(json.dumps({"main": peak_rss_bytes() // 1024, "worker": max(workers, default=0)}))
"""


def config(model: str, manifest: Path, n: int, workers: int, tokenizer: Path | None = None) -> dict:
    """The training config of ``model`` on ``manifest``'s n samples: batch 1, one epoch (n steps)."""
    base = {"classifier": CLASSIFIER, "superres": SUPERRES, "clip": CLIP, "generator": GENERATOR,
            "latent_flow": LATENT_FLOW}[model]
    cfg = {**base, "train": {**base["train"], "max_steps": steps(model, n), "num_workers": workers}}
    if model == "classifier":
        data = {"manifests": [str(manifest)], "hu_window": WINDOW, "augment": {"flip_w": True, "intensity": 0.05}}
    elif model in ("superres", "clip"):  # as the workflow's train_config: the preset's data, the window, the prompt
        # (superres: models.superres_lowres downsampled, the default: low-res inputs derived from the volume, no recon)
        data = {**base["data"], "manifests": [str(manifest)], "hu_window": WINDOW, "text_tokenizer": str(tokenizer),
                "prompt": "generatect"}
    elif model == "generator":
        data = {"tokens": str(manifest), "text_tokenizer": str(tokenizer), "prompt": "generatect", "lowres_scale": 2}
    else:
        data = {"latents": [str(manifest)], "text_tokenizer": str(tokenizer), "prompt": "generatect"}
    return {**cfg, "data": data}


def steps(model: str, n: int) -> int:
    """One epoch of n samples: CLIP's batch holds 2 volumes, the others' one sample."""
    return n // CLIP["train"]["batch_size"] if model == "clip" else n


def run(root: Path, manifest: Path, n: int, workers: int, threads: int, fixed_malloc: bool = True,
        model: str = "classifier", tokenizer: Path | None = None) -> dict:
    """{main, worker (MiB; 0 without workers), seconds, steps} of one training job in a fresh process."""
    cfg = config(model, manifest, n, workers, tokenizer)
    (root / "config.json").write_text(json.dumps(cfg))
    out = root / model
    (root / "peaks").mkdir()
    cmd = [sys.executable, "-c", CHILD, str(root / "config.json"), str(out), str(root / "ckpt"), str(threads),
           str(root / "peaks"), model]
    t0 = time.perf_counter()
    path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])  # this checkout's ctgen
    env = {**os.environ, "PYTHONPATH": path, **(FIXED_MALLOC if fixed_malloc else {})}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    peaks = json.loads(res.stdout.strip().splitlines()[-1])
    summary = json.loads((out / "train_summary.json").read_text())
    if workers and not peaks["worker"]:
        raise SystemExit("the data worker reported no peak")
    return {"main": peaks["main"] / 1024, "worker": peaks["worker"] / 1024, "seconds": seconds,
            "steps": summary["steps"], "train_s": summary["wall_time_s"]}


verdict = growth_verdict  # the targets: ctprep.memory (GROWTH_LIMIT, HELD_SHARE), shared with the other benchmarks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="classifier", choices=("classifier", "superres", "clip", "generator", "latent_flow"),
                    help="the job: the classifier, the super-resolution model or CLIP on volume shards, the generator "
                         "on token shards, the latent flow model on latent shards (the demo preset's models)")
    ap.add_argument("--n", type=int, default=8, help="samples of the small run; the large one has 4n")
    ap.add_argument("--shape", type=int, nargs=3, default=None,
                    help="the volumes' voxels along R, A, S; default 128 128 64 for the classifier, the demo prep grid "
                         "64 64 32 for superres and clip (the shape their demo models take); the generator's and latent "
                         "flow model's derived samples have the demo model's grid")
    ap.add_argument("--workers", type=int, default=0, choices=(0, 1), help="data workers of the training job")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the training job")
    ap.add_argument("--malloc", default="fixed", choices=("fixed", "default"),
                    help="glibc's mmap threshold in the training job: fixed at 128 KiB (a reproducible peak), or glibc's own")
    ap.add_argument("--workdir", default="/tmp/ctgen-train-stream-bench", help="scratch folder (emptied first)")
    args = ap.parse_args(argv)
    if args.model == "clip" and args.n % CLIP["train"]["batch_size"]:
        ap.error(f"--model clip: --n must be a multiple of its batch, {CLIP['train']['batch_size']} (one epoch)")
    sizes, runs = [args.n, 4 * args.n], []
    for n in sizes:
        root = Path(args.workdir) / f"n{n}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        if args.model in VOLUME_MODELS:
            shape = tuple(args.shape or SHAPES[args.model])
            voxels = int(np.prod(shape))
            manifest = cohort(root, n, shape)
            tokenizer = cohort_tokenizer(root, n) if args.model != "classifier" else None
            shards = (root / "c0").glob("*.tar")
            what, unit = f"volumes of {'x'.join(map(str, shape))}", "volumes as int16"
        else:
            manifest, tokenizer, shape = derived_cohort(root, n, args.model)
            shards = manifest.parent.glob("*.tar")
            # a sample's stored 2-byte values: int16 codes, or float16 mu and sigma
            voxels = int(np.prod(shape)) * (1 if args.model == "generator" else 2)
            what, unit = ((f"token grids of {'x'.join(map(str, shape))}", "token grids as int16")
                          if args.model == "generator" else
                          (f"latents (mu, sigma) of {'x'.join(map(str, shape))}", "latents as float16"))
        on_disk = sum(p.stat().st_size for p in shards) / n / 2**20
        r = run(root, manifest, n, args.workers, args.threads, args.malloc == "fixed", args.model, tokenizer)
        runs.append(r)
        worker = f", data worker {r['worker']:6.1f} MiB" if args.workers else ""
        batch = {"superres": f"1 volume ({SUPERRES['data']['slices_per_volume']} slices)",
                 "clip": f"{CLIP['train']['batch_size']} volumes"}.get(args.model, "1")
        print(f"{n:4d} {what} ({on_disk:.3g} MiB each in the shards), {args.model}: {r['steps']} steps "
              f"of batch {batch}, {args.workers} workers: peak RSS {r['main']:6.1f} MiB{worker}; {r['seconds']:5.1f} s "
              f"({r['train_s']:.1f} s training; all samples as 2-byte values would be {n * voxels * 2 / 2**20:.3g} MiB, "
              f"as float32 {n * voxels * 4 / 2**20:.3g})", flush=True)
        if r["steps"] != steps(args.model, n):
            print(f"the job ran {r['steps']} steps, not one epoch of {n} samples")
            return 1
    checks = [verdict(sizes, [r["main"] for r in runs], voxels, "training process's peak", unit)]
    if args.workers:
        checks.append(verdict(sizes, [r["worker"] for r in runs], voxels, "data worker's peak", unit))
    for _, line in checks:
        print(line)
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
