"""Helpers of the workflow tests: a working folder with an edited config, snakemake runs, dry-run plans."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def make_workdir(path: Path, overrides: dict) -> Path:
    """A working folder with an edited copy of config.yaml, as a user would make one."""
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    tiny = yaml.safe_load((REPO / "tests/workflow/configs/tiny.yaml").read_text())
    cfg = _merge(_merge(base, tiny), overrides)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [*SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile", str(workdir / "config.yaml"),
           "--cores", "2", *args]
    # the rules' shell commands (ctgen ...) come from the environment running the tests, as with `make`
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, env=env)
    if check and res.returncode != 0:
        raise AssertionError(f"snakemake failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


def planned_rules(workdir: Path, cfg_edit: dict | None = None) -> dict[str, int]:
    """Rules a dry run would run (with rerun triggers) after an optional config edit."""
    if cfg_edit:
        cfg = yaml.safe_load((workdir / "config.yaml").read_text())
        (workdir / "config.yaml").write_text(yaml.safe_dump(_merge(cfg, cfg_edit), sort_keys=False))
    res = snakemake(workdir, "-n", "--quiet", "rules")
    counts = {}
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("total", "job"):
            counts[parts[0]] = int(parts[1])
    return counts
