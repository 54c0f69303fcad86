"""Helpers of the workflow tests: a working folder with an edited config, snakemake runs, dry-run plans."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.slurm import testcluster

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def make_workdir(path: Path, overrides: dict) -> Path:
    """A working folder with an edited copy of config.yaml, as a user would make one."""
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    tiny = yaml.safe_load((REPO / "tests/workflow/configs/tiny.yaml").read_text())
    cfg = merge(merge(base, tiny), overrides)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def snakemake(workdir: Path, *args: str, check: bool = True, repo: Path = REPO) -> subprocess.CompletedProcess:
    """``repo``: the checkout whose Snakefile runs (another copy of the workflow where a test needs one)."""
    cmd = [*SNAKEMAKE, "-s", str(repo / "Snakefile"), "-d", str(workdir), "--configfile", str(workdir / "config.yaml"),
           "--cores", "2", *args]
    # the rules' shell commands (ctgen ...) come from the environment running the tests, as with `make`
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, env=env)
    if check and res.returncode != 0:
        raise AssertionError(f"snakemake failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


@dataclass
class DemoRun:
    work: Path       # the working folder (config.yaml, results/, .snakemake/)
    output: str      # snakemake's stdout and stderr
    seconds: float
    slurm: bool      # every job went through the test cluster's sbatch (else the local executor)


def run_tiny_demo(work: Path, cluster: testcluster.Cluster | None = None) -> DemoRun:
    """The whole workflow on the tiny config (rule all: data, models, samples, evaluation, figures), from
    nothing; through ``cluster`` with the Slurm profile where one is given."""
    make_workdir(work, {})
    t0 = time.perf_counter()
    if cluster is None:
        res = snakemake(work, check=False)
    else:
        res = testcluster.snakemake(work, REPO / "Snakefile", cluster.env, "--configfile", str(work / "config.yaml"))
    seconds, out = time.perf_counter() - t0, res.stdout + res.stderr
    (work.parent / f"{work.name}.snakemake.out").write_text(out)
    how = "through Slurm" if cluster else "locally"
    assert res.returncode == 0, f"the tiny demo failed {how} ({res.returncode}) after {seconds:.0f} s:\n{out[-6000:]}"
    return DemoRun(work, out, seconds, cluster is not None)


def planned_rules(workdir: Path, cfg_edit: dict | Callable | None = None, *args: str,
                  repo: Path = REPO) -> dict[str, int]:
    """Rules a dry run would run (with rerun triggers) after an optional config edit (a dict merged into the
    config, or a function of the config); ``args``: more snakemake options, ``repo``: as :func:`snakemake`."""
    if cfg_edit:
        cfg = yaml.safe_load((workdir / "config.yaml").read_text())
        cfg = cfg_edit(cfg) if callable(cfg_edit) else merge(cfg, cfg_edit)
        (workdir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    res = snakemake(workdir, "-n", "--quiet", "rules", *args, repo=repo)
    counts = {}
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("total", "job"):
            counts[parts[0]] = int(parts[1])
    return counts


@functools.cache
def benchmark(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REHEARSAL_N = 12  # the small rehearsal's 4N: 4 x the tiny demo's 3 training patients


def run_rehearsal_large(root: Path) -> dict:
    """The small rehearsal at 4N (tiny config, 12 training patients), every training job, from nothing."""
    r = benchmark("rehearsal")
    targets = [f"results/models/{m.removeprefix('train_')}/model.safetensors" for m in r.TARGETS]
    return r.run("small", REHEARSAL_N, root, 2, targets)
