"""Peak memory and time of ``ctgen evaluate`` at N and 4N volumes: it must not grow with the cohort.

Writes a synthetic cohort (smooth random chest-like HU volumes, ``--shape`` voxels) as shards and the
same volumes as NIfTI predictions, a models folder with untrained feature networks of the demo sizes
(memory and time do not depend on the weights), then runs ``ctgen evaluate`` in a fresh process per
size and reports its peak RSS (the child's own VmHWM; its ``ru_maxrss`` would carry this parent's peak
over exec) and wall time. What stays is one batch of volumes plus per-volume features; the volumes
themselves would be the growth if any job held them all: at least 2 bytes a voxel (int16, as the shards and
the predictions store them; 4 as float32). Exits 1 where the peak at 4N exceeds ``GROWTH_LIMIT`` x the peak at N,
or grows by more than ``HELD_SHARE`` of the added 3N volumes' int16 size (the ratio alone cannot see them:
24 volumes of 160 x 160 x 80 held as int16 add 94 MiB, 1.10 x the 943 MiB at N = 8; growth within half of
that, 47 MiB, leaves room for the per-volume bookkeeping, 1 MiB). The bound is sized for volumes of about that
size: for much smaller ones it falls below the bookkeeping's own growth.

The child runs with glibc's mmap threshold fixed (``ctprep.memory.FIXED_MALLOC``, as ``train_stream.py``;
``--malloc default`` leaves it alone): with glibc's own the peak followed how transient buffers fragmented the
heap, 971 and 993 MiB at 2 and 8 volumes and a 17 MiB spread at one size, so the verdict passed or failed on
allocator noise. Fixed: 942.4 / 942.6 MiB at ``--n 2``, 942.6 / 943.7 MiB at the defaults.

    python benchmarks/evaluate_scale.py [--n 8] [--shape 160 160 80] [--malloc fixed|default] [--workdir /tmp/ctgen-eval-bench]
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
import pandas as pd
import torch

from ctgen.jobs.text import fit_text_tokenizer
from ctgen.models.classifier3d import Classifier3D
from ctgen.models.clip3d import CLIP3D
from ctgen.models.slicenet import SliceNet
from ctprep.memory import FIXED_MALLOC, growth_verdict
from ctprep.shards import merge_manifests, write_shards
from ctprep.volume import Volume, save_nifti

REPO = Path(__file__).resolve().parents[1]
SPACING = (2.5, 2.5, 5.0)


def cohort(root: Path, n: int, shape: tuple[int, int, int], seed: int = 0) -> Path:
    """n volumes in shards and as NIfTI predictions; returns the manifest."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    affine = np.diag([*SPACING, 1.0])

    def samples():
        for v in range(n):
            body = (i / 0.8) ** 2 + (j / 0.6) ** 2 < 1
            lungs = ((np.abs(i) - 0.4) / 0.3) ** 2 + (j / 0.4) ** 2 < 1 - 0.3 * k ** 2
            hu = np.where(body, np.where(lungs, -850, 40), -1000) + rng.normal(0, 20, shape)
            vol = Volume.from_3d(hu.astype(np.int16), affine)
            save_nifti(vol, root / "preds" / f"valid_{v}_a_1.nii.gz")
            yield {"key": f"valid_{v}_a_1", "volume": vol, "prompt": f"{40 + v % 30} years old male: finding {v % 5}.",
                   "prompts": {}, "meta": {}, "labels": (rng.random(18) < 0.3).astype(np.uint8)}

    (root / "preds").mkdir(parents=True)
    write_shards(samples(), root / "c0", prefix="valid-c000", shard_size=8, split="valid")
    return merge_manifests([root / "c0" / "valid-c000.manifest.json"], root / "manifest.json", split="valid")["n_samples"]


def models(root: Path, shape: tuple[int, int, int], n: int) -> Path:
    """Untrained demo-size networks and a cascade.json with the grid and the text side."""
    folder = root / "models"
    folder.mkdir()
    prompts = pd.DataFrame({"VolumeName": [f"valid_{v}_a_1.nii.gz" for v in range(n)], "split": "valid",
                            "p": [f"{40 + v % 30} years old male: finding {v % 5}." for v in range(n)]})
    prompts.to_parquet(root / "prompts.parquet")
    fit_text_tokenizer(root / "prompts.parquet", "p", folder / "text_tokenizer.json", vocab_size=200, splits=None)
    torch.manual_seed(0)
    text = {"dim": 32, "depth": 1, "heads": 2, "dropout": 0.1, "vocab_size": 200, "max_length": 64}
    CLIP3D(CLIP3D.config_from_dict({"stem_stride": [2, 4, 4], "channels": [16, 32, 64], "blocks": [1, 1, 1],
                                    "embed_dim": 64, "text_dim": 32, "text_encoder": text})).save_pretrained(folder / "clip")
    Classifier3D(Classifier3D.config_from_dict({"stem_stride": [2, 4, 4], "channels": [16, 32, 64],
                                                "blocks": [1, 1, 1]})).save_pretrained(folder / "classifier")
    SliceNet(SliceNet.config_from_dict({"image_size": 64, "channels": [16, 32, 64],
                                        "blocks": [1, 1, 1]})).save_pretrained(folder / "slicenet")
    spec = {"grid": {"spacing": list(SPACING), "shape": list(shape), "clip": [-1000, 1000], "lowres_scale": 2},
            "text_encoder": {"kind": "small", "path": None, "max_length": 64, "tokenizer": "text_tokenizer.json"}}
    (folder / "cascade.json").write_text(json.dumps(spec))
    return folder


verdict = growth_verdict  # the targets: ctprep.memory (GROWTH_LIMIT, HELD_SHARE), shared with the other benchmarks

#: runs the CLI and prints the process's own peak RSS (KiB) as the last line of stderr, however it exits
CHILD = ("import runpy, sys\nfrom ctprep.memory import peak_rss_bytes\nsys.argv = ['ctgen'] + sys.argv[1:]\ntry:\n"
         "    runpy.run_module('ctgen.cli', run_name='__main__')\nfinally:\n"
         "    print(peak_rss_bytes() // 1024, file=sys.stderr)\n")


def run(root: Path, fixed_malloc: bool = True) -> tuple[float, float]:
    """(peak RSS MiB, seconds) of one ``ctgen evaluate`` in a fresh process."""
    cmd = [sys.executable, "-c", CHILD, "evaluate", "--generated", str(root / "preds"), "--real",
           str(root / "manifest.json"), "--models", str(root / "models"), "--out", str(root / "out"), "--device", "cpu",
           "--settings", json.dumps({"bootstrap": 200, "bootstrap_frechet": 20, "slices_per_volume": 8})]
    t0 = time.perf_counter()
    path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])  # this checkout's ctgen
    env = {**os.environ, "PYTHONPATH": path, **(FIXED_MALLOC if fixed_malloc else {})}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    return int(res.stderr.strip().splitlines()[-1]) / 1024, seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="volumes of the small run; the large one has 4n")
    ap.add_argument("--shape", type=int, nargs=3, default=[160, 160, 80], help="voxels along R, A, S")
    ap.add_argument("--workdir", default="/tmp/ctgen-eval-bench", help="scratch folder (emptied first)")
    ap.add_argument("--only", type=int, help="run one size only (volumes)")
    ap.add_argument("--malloc", default="fixed", choices=("fixed", "default"),
                    help="glibc's mmap threshold in the evaluate job: fixed at 128 KiB (a reproducible peak), or glibc's own")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    sizes = [args.only] if args.only else [args.n, 4 * args.n]
    peaks = []
    for n in sizes:
        root = Path(args.workdir) / f"n{n}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        cohort(root, n, tuple(args.shape))
        models(root, tuple(args.shape), n)
        peak, seconds = run(root, args.malloc == "fixed")
        peaks.append(peak)
        voxels = int(np.prod(args.shape))
        print(f"{n:4d} volumes of {'x'.join(map(str, args.shape))}: peak RSS {peak:7.1f} MiB, {seconds:6.1f} s "
              f"(all volumes as int16 would be {n * voxels * 2 / 2**20:.0f} MiB, as float32 {n * voxels * 4 / 2**20:.0f})")
    if len(peaks) == 2:
        ok, line = verdict(sizes, peaks, int(np.prod(args.shape)))
        print(line)
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
