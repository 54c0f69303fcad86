"""The latent flow family at the report2ct geometry on the CPU: flow-network forward, autoencoder decode, sample time.

Geometry (config.yaml: model_presets.report2ct, prep preset report2ct): latent
4 x 64 x 120 x 120 (model layout C, D, H, W) -> 256 x 480 x 480 voxels (480x480x256 at
0.75x0.75x1.5 mm); the MAISI U-Net 64/128/256/512 (~215M parameters), a 2 x 256-token report
context; NVIDIA's MAISI autoencoder; fp32, ``torch.set_num_threads(threads)``. Every measurement
runs in a fresh Python process (peak RSS is the process's VmHWM), with randomly initialised weights
(speed and memory do not depend on the values):

- ``flow``: one U-Net forward under ``torch.no_grad()`` at batch 1 and at batch 2 (the CFG batch);
- ``decode_window``: the sliding-window decode of a whole 4x64x120x120 latent (the preset's
  ``decode_window``, overlap 0.4), stopped after ``--windows`` windows: the peak is real (MONAI's
  full-size output buffers are allocated at the first window, and each window's memory is freed
  before the next), the time per window is measured and multiplied by the window count MONAI's
  inferer reports for the whole latent (counted with a network-free predictor);
- ``decode_whole``: one decode of the whole latent at once, without and with MAISI's tensor
  splitting (``num_splits 4, dim_split 1``, NVIDIA's setting). At full size it needs ~30 GiB or
  more, so it runs on a ``1/--whole-fraction`` sub-latent and its memory above the model is
  scaled by the voxel ratio (activations are linear in voxels); ``--whole-full`` tries the full
  size under an address-space limit (``--mem-limit-gib``) instead, which fails cleanly.

The 30-step sample time is extrapolated: 30 x the batch-2 forward (guidance batches the
conditional and unconditional passes) + the window decode.

    python benchmarks/latent_flow.py [--threads 2] [--windows 2] [--whole-fraction 64] [--skip flow,...]
                                     [--out results/benchmarks/latent_flow.json]
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
PRESET = REPO / "config.yaml"  # model_presets.report2ct
TARGET_DECODE_GIB = 8.0
log = logging.getLogger("latent_flow_bench")

# The child: builds the preset's network, runs the measurement, prints one JSON line.
CHILD = r"""
import json, math, os, resource, sys, time
mode, threads, repo, preset, arg = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
sys.path.insert(0, repo)
if arg.get("mem_limit_gib"):
    limit = int(arg["mem_limit_gib"] * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import torch, yaml
torch.set_num_threads(threads)
section = yaml.safe_load(open(preset))["model_presets"]["report2ct"]
def hwm_gib():  # this process's own peak RSS
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 2**20
def gemm_gflops():  # the cores' fp32 throughput right now: how much other jobs slow this run
    a, b = torch.randn(4096, 512), torch.randn(512, 2048)
    a @ b
    t0 = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 4096 * 512 * 2048 / (time.perf_counter() - t0) / 1e9
gflops = gemm_gflops()
torch.manual_seed(0)
out = {"mode": mode, **arg}
if mode == "flow":
    from ctgen.models.latent_flow import LatentFlow
    m = LatentFlow(LatentFlow.config_from_dict(section["latent_flow"]["model"])).eval()
    c = m.config
    b = arg["batch"]
    text = {"findings": torch.randn(b, 180, 768), "findings_mask": torch.ones(b, 180, dtype=torch.bool),
            "impression": torch.randn(b, 40, 768), "impression_mask": torch.ones(b, 40, dtype=torch.bool)}
    x = torch.randn(b, c.latent_channels, *arg["latent_shape"])
    out["params_m"] = sum(p.numel() for p in m.parameters()) / 1e6
    out["base_gib"] = hwm_gib()
    with torch.no_grad():
        ctx = m.encode_text(**text)
        out["context_tokens"] = ctx.shape[1]
        t0 = time.perf_counter()
        v = m.velocity(x, torch.full((b,), 700.0), ctx)
        out["seconds"] = time.perf_counter() - t0
else:
    from ctgen.models.autoencoder import MaisiAutoencoder
    model_cfg = dict(section["autoencoder"]["model"], adv_weight=0.0)
    if mode == "decode_whole":
        model_cfg.update(num_splits=arg["num_splits"], dim_split=1)
    ae = MaisiAutoencoder(MaisiAutoencoder.config_from_dict(model_cfg)).eval()
    shape = arg["latent_shape"]
    z = torch.randn(1, 4, *shape)
    out["base_gib"] = hwm_gib()
    if mode == "decode_window":
        from monai.inferers import SlidingWindowInferer
        window = tuple(ae.config.decode_window)
        d, h, w = (min(s, n) for s, n in zip(shape, window))
        count = {"n": 0}
        def dry(zw):  # network-free: the window count MONAI's inferer makes for this latent
            count["n"] += 1
            return torch.zeros(zw.shape[0], 1, *(4 * s for s in zw.shape[2:]))
        SlidingWindowInferer(roi_size=(w, h, d), sw_batch_size=1, overlap=ae.config.decode_overlap,
                             mode="gaussian")(torch.zeros(1, 4, shape[2], shape[1], shape[0]), dry)
        out["windows_total"], out["window"] = count["n"], list(window)
        class Enough(Exception):
            pass
        times, decode = [], ae.net.decode
        def limited(zw):
            if len(times) >= arg["windows"]:
                raise Enough
            t0 = time.perf_counter()
            y = decode(zw)
            times.append(time.perf_counter() - t0)
            return y
        ae.net.decode = limited  # the real inferer over the real latent, stopped after a few windows
        with torch.no_grad():
            try:
                ae.decode(z)
                out["complete"] = True
            except Enough:
                out["complete"] = False
        out["window_seconds"] = times
        out["seconds"] = sum(times) if out["complete"] else min(times) * count["n"]
    else:
        with torch.no_grad():
            t0 = time.perf_counter()
            try:
                y = ae.decode(z, window=None)
                out["seconds"], out["failed"] = time.perf_counter() - t0, None
            except (RuntimeError, MemoryError) as err:
                out["seconds"], out["failed"] = time.perf_counter() - t0, str(err).splitlines()[0][:160]
out.update(peak_gib=hwm_gib(), load=os.getloadavg()[0], gemm_gflops=[gflops, gemm_gflops()])
print(json.dumps(out))
"""


def measure(mode: str, threads: int, preset: Path, **arg) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    res = subprocess.run([sys.executable, "-c", CHILD, mode, str(threads), str(REPO), str(preset), json.dumps(arg)],
                         capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{mode} {arg} failed:\n{res.stderr[-2000:]}")
    result = json.loads(res.stdout.strip().splitlines()[-1])
    log.info("%s", result)
    return result


def table(r: dict, threads: int, full_latent: list[int], fraction: int) -> str:
    rows = [f"| measurement ({threads} CPU threads, fp32) | time | peak RSS | note |", "|---|---:|---:|---|"]
    for key, name in (("flow_b1", "flow U-Net forward, batch 1"), ("flow_b2", "flow U-Net forward, batch 2 (CFG)")):
        if key in r:
            f = r[key]
            rows.append(f"| {name} | {f['seconds']:.1f} s | {f['peak_gib']:.2f} GiB | {f['params_m']:.0f}M parameters, "
                        f"{f['context_tokens']} context rows |")
    if "window" in r:
        w = r["window"]
        ok = "meets" if w["peak_gib"] <= TARGET_DECODE_GIB else "MISSES"
        rows.append(f"| decode, sliding window {w['window']} (overlap 0.4) | {w['seconds'] / 60:.1f} min "
                    f"({'measured' if w['complete'] else 'extrapolated'}: {w['windows_total']} windows x "
                    f"{min(w['window_seconds']):.1f} s) | {w['peak_gib']:.2f} GiB | {ok} the <= {TARGET_DECODE_GIB:.0f} "
                    "GiB target |")
    for key, name in (("whole", "decode, whole latent, no splitting"),
                      ("whole_split", "decode, whole latent, MAISI tensor splitting (4 along J)")):
        if key in r:
            x = r[key]
            if x.get("failed"):
                rows.append(f"| {name} | - | > {x['mem_limit_gib']:.0f} GiB | refused under the address-space limit: "
                            f"{x['failed']} |")
                continue
            scale = 1 if x["latent_shape"] == full_latent else fraction
            peak = x["base_gib"] + (x["peak_gib"] - x["base_gib"]) * scale
            how = "measured" if scale == 1 else f"measured on 1/{fraction} of the latent ({x['peak_gib']:.2f} GiB, " \
                                                f"{x['seconds']:.0f} s) and scaled by voxels"
            rows.append(f"| {name} | {x['seconds'] * scale / 60:.1f} min | {peak:.1f} GiB | {how} |")
    if "flow_b2" in r and "window" in r:
        total = 30 * r["flow_b2"]["seconds"] + r["window"]["seconds"]
        rows.append(f"| 30-step sample with guidance (extrapolated) | {total / 3600:.2f} h | - | 30 x batch-2 forward "
                    f"({30 * r['flow_b2']['seconds'] / 60:.0f} min) + window decode ({r['window']['seconds'] / 60:.0f} min) |")
    loads = ", ".join(f"{k} {v['load']:.1f}" for k, v in r.items())
    gemm = ", ".join(f"{k} {v['gemm_gflops'][0]:.0f}/{v['gemm_gflops'][1]:.0f}" for k, v in r.items())
    rows.append(f"\n1-min load average at the end of each run ({threads} = an idle machine): {loads}; fp32 GEMM GFLOPS "
                f"before/after each run: {gemm}. Other jobs sharing the cores inflate the times.")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", type=Path, default=PRESET, help="config YAML whose model_presets.report2ct holds {autoencoder, latent_flow}")
    ap.add_argument("--windows", type=int, default=2, help="decode windows actually run (0: all of them)")
    ap.add_argument("--whole-fraction", type=int, default=64, choices=[1, 8, 64],
                    help="the whole-latent decode runs on 1/N of the latent (halved per axis for 8, quartered for 64)")
    ap.add_argument("--whole-full", action="store_true", help="try the whole decode at full size (under --mem-limit-gib)")
    ap.add_argument("--mem-limit-gib", type=float, default=12.0, help="address-space limit of the full whole decode")
    ap.add_argument("--latent", type=int, nargs=3, metavar=("D", "H", "W"),
                    help="another latent than the preset's (e.g. 8 16 16: a quick smoke test of this script)")
    ap.add_argument("--skip", default="", help="comma-separated: flow, window, whole")
    ap.add_argument("--out", type=Path, help="also write the raw results as JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import yaml

    full = args.latent or list(yaml.safe_load(args.preset.read_text())["model_presets"]["report2ct"]["latent_flow"]["model"]["latent_shape"])
    skip = set(filter(None, args.skip.split(",")))
    r: dict[str, dict] = {}
    if "flow" not in skip:
        r["flow_b1"] = measure("flow", args.threads, args.preset, batch=1, latent_shape=full)
        r["flow_b2"] = measure("flow", args.threads, args.preset, batch=2, latent_shape=full)
    if "window" not in skip:
        r["window"] = measure("decode_window", args.threads, args.preset, latent_shape=full,
                              windows=args.windows or 10**9)
    if "whole" not in skip:
        div = {1: 1, 8: 2, 64: 4}[1 if args.whole_full else args.whole_fraction]
        sub = [s // div for s in full]
        limit = args.mem_limit_gib if args.whole_full else None
        for key, splits in (("whole", 1), ("whole_split", 4)):
            r[key] = measure("decode_whole", args.threads, args.preset, latent_shape=sub, num_splits=splits,
                             mem_limit_gib=limit)
    text = table(r, args.threads, full, 1 if args.whole_full else args.whole_fraction)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
