"""The latent flow family at the report2ct geometry: flow-network forward, training step, sample, autoencoder decode.

Geometry (config.yaml: model_presets.report2ct, prep preset report2ct): latent
4 x 64 x 120 x 120 (model layout C, D, H, W) -> 256 x 480 x 480 voxels (480x480x256 at
0.75x0.75x1.5 mm); the MAISI U-Net 64/128/256/512 (~215M parameters), a 2 x 256-token report
context; NVIDIA's MAISI autoencoder. Every measurement runs in a fresh Python process with randomly
initialised weights (speed and memory do not depend on the values).

On the CPU (default; fp32, ``torch.set_num_threads(threads)``, peak = the process's VmHWM):

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
  size under an address-space limit (``--mem-limit-gib``) instead, which fails cleanly. Only running
  out of memory is reported as a failed decode; any other error is the script's and fails the run.
  MONAI's ``MaisiConvolution`` splits J correctly only where ``num_splits`` divides it into chunks of at
  least its overlap (3): elsewhere it crashes or silently drops rows. The split decode runs on the sub-latent
  with J rounded down to such a size (scaled by its own voxel ratio), and is skipped, saying so, where
  no such size is left (``--latent 8 16 16`` and ``16 32 32`` at 1/64).
- the 30-step sample time is extrapolated: 30 x the batch-2 forward (guidance batches the
  conditional and unconditional passes) + the window decode.

With ``--device cuda`` (the U-Net under bf16 autocast as the pipeline and the training loop run it
there, the decode in fp32; peak = CUDA's allocator): the same forwards (after a warm-up), a training
step (the loop's step functions, fused AdamW), a measured 30-step sample (the pipeline's Euler
sampler with guidance 5, then the window decode into host memory), all decode windows, and the
whole decode at full size. ``--decode-window``/``--decode-overlap`` try other windows.

    python benchmarks/latent_flow.py [--device cpu|cuda] [--threads 2] [--windows 2] [--whole-fraction 64]
                                     [--decode-window D H W] [--decode-overlap 0.25] [--skip flow,...]
                                     [--out results/benchmarks/latent_flow.json]
    python benchmarks/latent_flow.py --latent 8 16 16   # a quick smoke test of this script (minutes on 2 cores)

Figures: README, "Benchmarks" ("On a GPU").
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "config.yaml"  # model_presets.report2ct
TARGET_DECODE_GIB = 8.0
SPLITS = 4  # MAISI's tensor splitting in the whole decode: NVIDIA's num_splits, along J (dim_split 1)
def splittable(j: int) -> int:
    """The largest J <= ``j`` that MaisiConvolution splits correctly into SPLITS chunks (0: none): the autoencoder's
    own rule (``ctgen.models.autoencoder.splits_evenly``), which refuses other sizes."""
    from ctgen.models.autoencoder import splits_evenly

    return next((k for k in range(j, 0, -1) if splits_evenly(k, SPLITS)), 0)
log = logging.getLogger("latent_flow_bench")

# The child: builds the preset's network, runs the measurement, prints one JSON line.
CHILD = r"""
import json, math, os, resource, sys, time
mode, threads, repo, preset, arg = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
sys.path.insert(0, repo)
if arg.get("mem_limit_gib"):
    limit = int(arg["mem_limit_gib"] * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import contextlib, torch, yaml
torch.set_num_threads(threads)
section = yaml.safe_load(open(preset))["model_presets"]["report2ct"]
dev = torch.device(arg.get("device", "cpu"))
cuda = dev.type == "cuda"
# the pipeline's and the training loop's "auto" precision: bf16 autocast for the networks on CUDA
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
def hwm_gib():  # this process's own peak RSS
    from ctprep.memory import peak_rss_bytes
    return peak_rss_bytes() / 2**30
def sync():
    if cuda:
        torch.cuda.synchronize(dev)
def peak_gib():  # the device's peak: CUDA's allocator on a GPU, the process's peak RSS on the CPU
    sync()
    return torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else hwm_gib()
def base_gib():
    return torch.cuda.memory_allocated(dev) / 2**30 if cuda else hwm_gib()
def timed(fn, repeats=1):  # seconds of the last of ``repeats`` calls (the first is a warm-up on CUDA)
    for _ in range(repeats + (1 if cuda else 0)):
        sync()
        t0 = time.perf_counter()
        y = fn()
        sync()
        seconds = time.perf_counter() - t0
    return y, seconds
def gemm_gflops():  # the cores' fp32 throughput right now: how much other jobs slow this run
    a, b = torch.randn(4096, 512), torch.randn(512, 2048)
    a @ b
    t0 = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 4096 * 512 * 2048 / (time.perf_counter() - t0) / 1e9
gflops = gemm_gflops()
torch.manual_seed(0)
def flow_inputs(m, b):
    c = m.config
    text = {"findings": torch.randn(b, 180, 768), "findings_mask": torch.ones(b, 180, dtype=torch.bool),
            "impression": torch.randn(b, 40, 768), "impression_mask": torch.ones(b, 40, dtype=torch.bool)}
    return {k: v.to(dev) for k, v in text.items()}, torch.randn(b, c.latent_channels, *arg["latent_shape"], device=dev)
out = {"mode": mode, **arg}
if mode in ("flow", "train", "sample"):
    from ctgen.models.latent_flow import LatentFlow
    m = LatentFlow(LatentFlow.config_from_dict(section["latent_flow"]["model"])).to(dev)
    b = arg["batch"]
    text, x = flow_inputs(m, b)
    out["params_m"] = sum(p.numel() for p in m.parameters()) / 1e6
    out["base_gib"] = base_gib()
    if mode == "train":  # a warm-up step on CUDA, then the timed one: the training loop's step functions
        from ctgen.jobs.smoke import optimizer_steps
        batch = {"latent_mu": x, "latent_sigma": torch.full_like(x, 0.1), **text}
        r = optimizer_steps(m, batch, lr=float(section["latent_flow"]["train"]["lr"]), steps=2 if cuda else 1)
        out.update(loss=r["loss"], seconds=r["step_s"], precision=r["precision"], fused_adamw=r["fused_adamw"])
    else:
        m.eval()
        with torch.no_grad():
            ctx = m.encode_text(**text)
            out["context_tokens"] = ctx.shape[1]
            if mode == "flow":
                with autocast:
                    v, out["seconds"] = timed(lambda: m.velocity(x, torch.full((b,), 700.0, device=dev), ctx),
                                              repeats=arg.get("repeats", 1))
            else:  # the pipeline's sampler: Euler steps of the guided velocity, then the window decode
                from ctgen.models.autoencoder import MaisiAutoencoder
                from ctgen.pipelines.latent_flow import euler_sample
                ae_cfg = dict(section["autoencoder"]["model"], adv_weight=0.0)
                ae_cfg.update({k: arg[k] for k in ("decode_window", "decode_overlap") if arg.get(k)})
                ae = MaisiAutoencoder(MaisiAutoencoder.config_from_dict(ae_cfg)).to(dev).eval()
                null = m.null_context(b).to(dev)
                def velocity(z, t):
                    with autocast:
                        return m.guided_velocity(z, t, ctx, null, 5.0)
                sync()
                t0 = time.perf_counter()
                z = euler_sample(velocity, m.config.make_scheduler(), x, arg["steps"])
                sync()
                t1 = time.perf_counter()
                image = ae.decode(z, window="config", output_device="cpu")
                sync()
                out.update(decode_window=list(ae.config.decode_window), decode_overlap=ae.config.decode_overlap,
                           flow_seconds=t1 - t0, decode_seconds=time.perf_counter() - t1,
                           seconds=time.perf_counter() - t0, image_shape=list(image.shape[2:]))
else:
    from ctgen.models.autoencoder import MaisiAutoencoder
    model_cfg = dict(section["autoencoder"]["model"], adv_weight=0.0)
    if mode == "decode_whole":
        model_cfg.update(num_splits=arg["num_splits"], dim_split=1)
    model_cfg.update({k: arg[k] for k in ("decode_window", "decode_overlap") if arg.get(k)})
    ae = MaisiAutoencoder(MaisiAutoencoder.config_from_dict(model_cfg)).to(dev).eval()
    shape = arg["latent_shape"]
    z = torch.randn(1, 4, *shape, device=dev)
    out["base_gib"] = base_gib()
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
            sync()
            t0 = time.perf_counter()
            y = decode(zw)
            sync()
            times.append(time.perf_counter() - t0)
            return y
        ae.net.decode = limited  # the real inferer over the real latent, stopped after a few windows
        with torch.no_grad():
            try:
                ae.decode(z, output_device="cpu" if cuda else None)
                out["complete"] = True
            except Enough:
                out["complete"] = False
        out["window_seconds"] = times
        out["seconds"] = sum(times) if out["complete"] else min(times) * count["n"]
    else:
        with torch.no_grad():
            sync()
            t0 = time.perf_counter()
            try:
                y = ae.decode(z, window=None)
                sync()
                out["seconds"], out["failed"] = time.perf_counter() - t0, None
            except Exception as err:  # running out of memory is the measurement (--whole-full); anything else a bug
                text = str(err).lower()
                if not (isinstance(err, (torch.OutOfMemoryError, MemoryError)) or isinstance(err, RuntimeError)
                        and any(m in text for m in ("out of memory", "can't allocate", "not enough memory"))):
                    raise
                out["seconds"], out["failed"] = time.perf_counter() - t0, (str(err).splitlines() or [type(err).__name__])[0][:160]
out.update(peak_gib=peak_gib(), load=os.getloadavg()[0], gemm_gflops=[gflops, gemm_gflops()],
           device=torch.cuda.get_device_name(dev) if cuda else "cpu")
print(json.dumps(out))
"""


def measure(mode: str, threads: int, preset: Path, timeout: float | None = None, **arg) -> dict:
    """One measurement in a fresh process; a failure is recorded (``error``), not raised, so the others still run."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    try:
        res = subprocess.run([sys.executable, "-c", CHILD, mode, str(threads), str(REPO), str(preset), json.dumps(arg)],
                             capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        result = {"mode": mode, **arg, "error": f"no result within {timeout:.0f} s"}
    else:
        if res.returncode != 0:
            tail = res.stderr.strip().splitlines() or [f"exit {res.returncode}"]
            result = {"mode": mode, **arg, "error": tail[-1][:300]}
            log.error("%s %s failed:\n%s", mode, arg, res.stderr[-2000:])
        else:
            result = json.loads(res.stdout.strip().splitlines()[-1])
    log.info("%s", result)
    return result


def table(r: dict, threads: int, full_latent: list[int], fraction: int, device: str) -> str:
    cuda = device.startswith("cuda")
    where = next((v["device"] for v in r.values() if "device" in v), device) if cuda else f"{threads} CPU threads"
    rows = [f"| measurement ({where}, {'bf16 autocast for the U-Net, fp32 decode' if cuda else 'fp32'}) | time | "
            f"{'peak CUDA memory' if cuda else 'peak RSS'} | note |", "|---|---:|---:|---|"]
    failed = {k: v for k, v in r.items() if "error" in v}
    for key, name in (("flow_b1", "flow U-Net forward, batch 1"), ("flow_b2", "flow U-Net forward, batch 2 (CFG)"),
                      ("train", "flow U-Net training step, batch 1 (forward, backward, AdamW)")):
        if key in r and key not in failed:
            f = r[key]
            rows.append(f"| {name} | {f['seconds']:.2f} s | {f['peak_gib']:.2f} GiB | {f['params_m']:.0f}M parameters"
                        + (f", {f['context_tokens']} context rows |" if "context_tokens" in f else f", loss {f['loss']:.3f} |"))
    if "sample" in r and "sample" not in failed:
        x = r["sample"]
        rows.append(f"| {x['steps']}-step sample with guidance 5 (measured) | {x['seconds']:.1f} s | {x['peak_gib']:.2f} GiB "
                    f"| Euler steps {x['flow_seconds']:.1f} s + decode (window {x['decode_window']}, overlap "
                    f"{x['decode_overlap']}) {x['decode_seconds']:.1f} s to "
                    f"{'x'.join(map(str, x['image_shape']))} |")
    if "window" in r and "window" not in failed:
        w = r["window"]
        ok = "meets" if w["peak_gib"] <= TARGET_DECODE_GIB else "MISSES"
        rows.append(f"| decode, sliding window {w['window']} (overlap 0.4) | {w['seconds'] / 60:.2f} min "
                    f"({'measured' if w['complete'] else 'extrapolated'}: {w['windows_total']} windows, "
                    f"{min(w['window_seconds']):.2f} s the fastest) | {w['peak_gib']:.2f} GiB | {ok} the <= "
                    f"{TARGET_DECODE_GIB:.0f} GiB target |")
    for key, name in (("whole", "decode, whole latent, no splitting"),
                      ("whole_split", "decode, whole latent, MAISI tensor splitting (4 along J)")):
        if key in r and key not in failed and "skipped" not in r[key]:
            x = r[key]
            if x.get("failed"):
                limit = f"> {x['mem_limit_gib']:.0f} GiB" if x.get("mem_limit_gib") else "-"
                rows.append(f"| {name} | - | {limit} | failed: {x['failed']} |")
                continue
            scale = math.prod(full_latent) / math.prod(x["latent_shape"])  # 1/fraction, or less where J was rounded
            peak = x["base_gib"] + (x["peak_gib"] - x["base_gib"]) * scale
            how = "measured" if scale == 1 else f"measured on 1/{scale:.3g} of the latent " \
                f"({'x'.join(map(str, x['latent_shape']))}: {x['peak_gib']:.2f} GiB, {x['seconds']:.0f} s) and scaled by voxels"
            rows.append(f"| {name} | {x['seconds'] * scale / 60:.2f} min | {peak:.1f} GiB | {how} |")
    if "flow_b2" in r and "window" in r and not failed.keys() & {"flow_b2", "window"} and "sample" not in r:
        total = 30 * r["flow_b2"]["seconds"] + r["window"]["seconds"]
        rows.append(f"| 30-step sample with guidance (extrapolated) | {total / 3600:.2f} h | - | 30 x batch-2 forward "
                    f"({30 * r['flow_b2']['seconds'] / 60:.0f} min) + window decode ({r['window']['seconds'] / 60:.0f} min) |")
    for key, x in failed.items():
        rows.append(f"| {key} | failed | | {x['error']} |")
    for key, x in r.items():
        if "skipped" in x:
            rows.append(f"| {key} | skipped | | {x['skipped']} |")
    ok = {k: v for k, v in r.items() if k not in failed and "skipped" not in v}
    loads = ", ".join(f"{k} {v['load']:.1f}" for k, v in ok.items())
    gemm = ", ".join(f"{k} {v['gemm_gflops'][0]:.0f}/{v['gemm_gflops'][1]:.0f}" for k, v in ok.items())
    rows.append(f"\n1-min load average at the end of each run ({threads} = an idle machine): {loads}; CPU fp32 GEMM "
                f"GFLOPS before/after each run: {gemm}. Other jobs sharing the cores inflate the times.")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: every measurement on the GPU (peak: CUDA's "
                    "allocator), all decode windows, the whole decode at full size, a measured 30-step sample and "
                    "a training step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", type=Path, default=PRESET, help="config YAML whose model_presets.report2ct holds {autoencoder, latent_flow}")
    ap.add_argument("--windows", type=int, default=None, help="decode windows actually run (0: all of them; "
                    "default 2 on the CPU, all on a GPU)")
    ap.add_argument("--whole-fraction", type=int, default=None, choices=[1, 8, 64],
                    help="the whole-latent decode runs on 1/N of the latent (halved per axis for 8, quartered for "
                         "64; default 64 on the CPU, 1 on a GPU)")
    ap.add_argument("--whole-full", action="store_true", help="try the whole decode at full size (under --mem-limit-gib)")
    ap.add_argument("--mem-limit-gib", type=float, default=12.0, help="address-space limit of the full whole decode")
    ap.add_argument("--latent", type=int, nargs=3, metavar=("D", "H", "W"),
                    help="another latent than the preset's (e.g. 8 16 16: a quick smoke test of this script)")
    ap.add_argument("--decode-window", type=int, nargs=3, metavar=("D", "H", "W"),
                    help="another latent decode window than the preset's (sample and window measurements)")
    ap.add_argument("--decode-overlap", type=float, help="another window overlap than the preset's")
    ap.add_argument("--steps", type=int, default=30, help="Euler steps of the measured sample (GPU)")
    ap.add_argument("--skip", default="", help="comma-separated: flow, train, sample, window, whole")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per measurement")
    ap.add_argument("--out", type=Path, help="also write the raw results as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import yaml

    cuda = args.device.startswith("cuda")
    windows = args.windows if args.windows is not None else (0 if cuda else 2)
    fraction = args.whole_fraction or (1 if cuda else 64)
    full = args.latent or list(yaml.safe_load(args.preset.read_text())["model_presets"]["report2ct"]["latent_flow"]["model"]["latent_shape"])
    skip = set(filter(None, args.skip.split(",")))
    r: dict[str, dict] = {}

    def run(key: str, mode: str, **arg) -> None:
        if mode in ("sample", "decode_window"):
            arg.update(decode_window=args.decode_window, decode_overlap=args.decode_overlap)
        r[key] = measure(mode, args.threads, args.preset, args.timeout, device=args.device, **arg)
        if args.out:  # after every measurement: a run stopped at its limit keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(r, indent=2) + "\n")

    if "flow" not in skip:
        run("flow_b1", "flow", batch=1, latent_shape=full, repeats=3 if cuda else 1)
        run("flow_b2", "flow", batch=2, latent_shape=full, repeats=3 if cuda else 1)
    if cuda and "sample" not in skip:  # on a CPU this would take hours: extrapolated from the forward instead
        run("sample", "sample", batch=1, latent_shape=full, steps=args.steps)
    if cuda and "train" not in skip:
        run("train", "train", batch=1, latent_shape=full)
    if "window" not in skip:
        run("window", "decode_window", latent_shape=full, windows=windows or 10**9)
    if "whole" not in skip:
        div = {1: 1, 8: 2, 64: 4}[1 if args.whole_full else fraction]
        sub = [s // div for s in full]
        limit = args.mem_limit_gib if args.whole_full and not cuda else None
        run("whole", "decode_whole", latent_shape=sub, num_splits=1, mem_limit_gib=limit)
        j = splittable(sub[1])
        if j:
            run("whole_split", "decode_whole", latent_shape=[sub[0], j, sub[2]], num_splits=SPLITS, mem_limit_gib=limit)
        else:
            from ctgen.models.autoencoder import SPLIT_MIN_ROWS

            r["whole_split"] = {"skipped": f"the sub-latent {'x'.join(map(str, sub))} is too small to split: MAISI's "
                                f"splitting needs J (here {sub[1]}) of at least {SPLITS * SPLIT_MIN_ROWS}"}
            log.warning("whole_split skipped: %s", r["whole_split"]["skipped"])
    print(table(r, args.threads, full, 1 if args.whole_full else fraction, args.device))
    missed = "window" in r and "error" not in r["window"] and r["window"]["peak_gib"] > TARGET_DECODE_GIB
    if missed:
        print(f"MISSES the target: the sliding-window decode peaked at {r['window']['peak_gib']:.2f} GiB "
              f"> {TARGET_DECODE_GIB:.0f} GiB", file=sys.stderr)
    return 0 if not (missed or any("error" in v for v in r.values())) else 1


if __name__ == "__main__":
    sys.exit(main())
