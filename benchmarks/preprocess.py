"""Preprocessing throughput: ctprep presets beside the load floor and two reference recipes.

Each (recipe, volume) run is a fresh Python process that imports first, then times only the
work (cold: the first call; warm: the median of later calls in the same process, as in a chunk job): load + preprocess to a normalised float32 array in memory (no write). Reported: vol/s and
MB/s (uncompressed voxel bytes) on the real volumes in tests/data, seconds and peak memory on a
CT-RATE-size 512x512x300 int16 volume.

    python benchmarks/preprocess.py [--repeats 3] [--threads 2] [--out results/benchmarks/preprocess.json]

Recipes:
- ``load``: nibabel load of the voxels alone (zlib gunzip; the floor of a nibabel-based recipe).
- ``ctprep-load``: ``ctprep.volume.load_nifti`` alone (ISA-L gunzip, no voxel copy): the floor of
  ctprep's presets.
- ``output-floor``: load, then write the spacing preset's float32 output grid once on two
  threads, with no interpolation: a lower bound for every recipe that returns that grid.
- ``generatect``: GenerateCT-style: get_fdata (float64), clip, /1000, torch trilinear resize of
  the whole volume to 201x128x128 (needs torch).
- ``ctclip``: CT-CLIP-style: get_fdata, clip, torch trilinear to 0.75x0.75x1.5 mm, crop/pad to
  480x480x240 (needs torch).
- ``ctprep-spacing`` / ``ctprep-generatect``: this project's presets from config.yaml.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL = [REPO / "tests/data" / n for n in ("pulmonary_report_ct_cropped.nii.gz", "example_ct_sm.nii.gz", "example_ct.nii.gz")]

# The child: imports, then times the recipe on one file, prints JSON.
CHILD = r"""
import json, os, sys, time
recipe, path, repo = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, repo)
import numpy as np, nibabel as nib, yaml
if recipe in ("generatect", "ctclip"):
    import torch, torch.nn.functional as F
from ctprep.volume import load_nifti
from ctprep.preprocess import preprocess_volume
presets = yaml.safe_load(open(f"{repo}/config.yaml"))["presets"]
def hwm_mb():  # this process's own peak RSS (ru_maxrss would carry the parent's across exec)
    from ctprep.memory import peak_rss_bytes
    return peak_rss_bytes() / 2**20
base = hwm_mb()
times = []
for rep in range(int(sys.argv[4])):
  t0 = time.perf_counter()
  if recipe == "load":
      img = nib.load(path); out = np.asanyarray(img.dataobj)
  elif recipe == "ctprep-load":
      out = load_nifti(path).data
  elif recipe == "output-floor":
      # a lower bound for any recipe that returns the spacing preset's grid: load, then write
      # every output voxel once (no interpolation, no window)
      img = nib.load(path); a = np.asanyarray(img.dataobj)
      out = np.empty(presets["spacing"]["shape"], dtype=np.float32)
      from concurrent.futures import ThreadPoolExecutor
      n = int(os.environ.get("OMP_NUM_THREADS", "2"))  # every thread writes, as ctprep's fill does
      parts = np.array_split(np.arange(out.shape[0]), n)
      with ThreadPoolExecutor(n) as pool:
          list(pool.map(lambda rows: out[rows[0]:rows[-1] + 1].fill(-1.0), parts))
  elif recipe == "generatect":
      img = nib.load(path); a = img.get_fdata()
      a = np.clip(a, -1000, 1000) / 1000.0
      t = torch.from_numpy(a.astype(np.float32))[None, None]
      out = F.interpolate(t, size=(128, 128, 201), mode="trilinear", align_corners=False)
  elif recipe == "ctclip":
      img = nib.load(path); a = img.get_fdata()
      a = np.clip(a, -1000, 1000) / 1000.0
      sp = nib.affines.voxel_sizes(img.affine)
      size = [int(round(n * s / t)) for n, s, t in zip(a.shape, sp, (0.75, 0.75, 1.5))]
      t = F.interpolate(torch.from_numpy(a.astype(np.float32))[None, None], size=size, mode="trilinear",
                        align_corners=False)[0, 0]
      out = torch.full((480, 480, 240), -1.0)
      src, dst = [], []
      for n, m in zip(t.shape, (480, 480, 240)):
          if n >= m:
              s = (n - m) // 2; src.append(slice(s, s + m)); dst.append(slice(0, m))
          else:
              s = (m - n) // 2; src.append(slice(0, n)); dst.append(slice(s, s + n))
      out[tuple(dst)] = t[tuple(src)]
  else:
      preset = presets[recipe.split("-", 1)[1]]
      vol = load_nifti(path)
      out = preprocess_volume(vol, None, preset, {"geometry": "header"}, normalise=True).data
  times.append(time.perf_counter() - t0)
seconds = times[0]
peak = hwm_mb()
warm = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else seconds
print(json.dumps({"seconds": seconds, "warm_seconds": warm, "peak_mb": peak, "work_mb": peak - base,
                  "voxel_mb": nib.load(path).get_data_dtype().itemsize * np.prod(nib.load(path).shape) / 2**20}))
"""


def run(recipe: str, path: Path, threads: int, reps: int = 1) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    res = subprocess.run(["taskset", "-c", ",".join(str(i) for i in range(threads)), sys.executable, "-c", CHILD,
                          recipe, str(path), str(REPO), str(reps)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{recipe} on {path.name} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def big_volume(folder: Path) -> Path:
    """A CT-RATE-size volume (512x512x300 int16, 0.7x0.7x1.0 mm) with real anatomy and noise.

    benchmarks/prep_scale.py's recipe (a real scan resampled up, 20 HU scanner-like noise, padding
    outside the reconstruction circle), so gzip sees realistic entropy (a smooth or constant
    array would decompress unrealistically fast).
    """
    sys.path.insert(0, str(Path(__file__).parent))
    from prep_scale import ctrate_size_volume

    return ctrate_size_volume(folder / "ctrate_size_512x512x300_v2.nii.gz", 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipes", nargs="+", default=["load", "ctprep-load", "output-floor", "generatect", "ctclip",
                                                     "ctprep-spacing", "ctprep-generatect"])
    ap.add_argument("--out", default=str(REPO / "results/benchmarks/preprocess.json"))
    args = ap.parse_args()
    if importlib.util.find_spec("torch") is None:  # checked, not imported: the children time their own imports
        args.recipes = [r for r in args.recipes if r not in ("generatect", "ctclip")]
        print("torch not installed: reference recipes skipped", file=sys.stderr)
    tmp = Path(tempfile.gettempdir()) / "ctgen-bench"
    tmp.mkdir(exist_ok=True)
    big = big_volume(tmp)
    results = {}
    for recipe in args.recipes:
        per_real = [statistics.median(run(recipe, p, args.threads)["seconds"] for _ in range(args.repeats)) for p in REAL]
        # warm: the same process preprocesses again, as a chunk job does volume after volume
        warm_real = [run(recipe, p, args.threads, reps=4)["warm_seconds"] for p in REAL]
        real_mb = sum(run("load", p, args.threads)["voxel_mb"] for p in REAL)
        big_runs = [run(recipe, big, args.threads) for _ in range(args.repeats)]
        results[recipe] = {
            "real_vol_per_s": round(len(REAL) / sum(per_real), 2),
            "real_mb_per_s": round(real_mb / sum(per_real), 1),
            "real_vol_per_s_warm": round(len(REAL) / sum(warm_real), 2),
            "big_seconds": round(statistics.median(r["seconds"] for r in big_runs), 3),
            "big_peak_mb": round(max(r["peak_mb"] for r in big_runs)),
            "big_work_mb": round(max(r["work_mb"] for r in big_runs)),
        }
        print(f"{recipe:20s} {json.dumps(results[recipe])}", flush=True)
    floor = results.get("load", {}).get("real_vol_per_s")
    for recipe in ("output-floor", "ctprep-spacing"):
        if floor and recipe in results:
            results[recipe]["fraction_of_load_floor"] = round(results[recipe]["real_vol_per_s"] / floor, 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "results": results}, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
