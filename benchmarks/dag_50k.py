"""Scale: a 50,000-volume CT-RATE-layout cohort: cohort table build time and the dry-run DAG.

Writes CT-RATE tables with 50k rows (metadata rows copied from the demo cohort's, names and
patients renumbered) and 50k empty volume files, then times ``build_cohort`` (reads every table,
walks every folder) and ``snakemake -n`` with 500 chunks: once plain, once through the Slurm
workflow profile (the plugin loaded, its per-rule resources applied to every job).

    python benchmarks/dag_50k.py [--n 50000] [--chunks 500]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctprep import ctrate  # noqa: E402
from ctprep.cohort import build_cohort  # noqa: E402
from ctprep.demo import write_demo_cohort  # noqa: E402


def make_dataset(root: Path, n: int) -> None:
    seed_root = root.parent / "seed"
    write_demo_cohort(seed_root, {"n_train_patients": 1, "n_valid_patients": 1, "matrix": 32, "slices": [8, 8], "faults": []})
    for split in ("train", "valid"):
        k = int(n * (0.94 if split == "train" else 0.06))
        names = [f"{split}_{i // 2 + 1}_a_{i % 2 + 1}.nii.gz" for i in range(k)]
        for kind, path_of in (("metadata", ctrate.metadata_csv), ("report", ctrate.report_csv), ("labels", ctrate.labels_csv)):
            row = pd.read_csv(path_of(seed_root, split), dtype=str, keep_default_na=False).iloc[0]
            df = pd.DataFrame([row] * k).assign(VolumeName=names)
            path_of(root, split).parent.mkdir(parents=True, exist_ok=True)
            df.to_csv(path_of(root, split), index=False)
        for name in names:
            p = root / ctrate.volume_relpath(name)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.touch()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--chunks", type=int, default=500)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ctgen-50k-"))
    try:
        print(json.dumps(run(tmp, args.n, args.chunks), indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # 50k files


def run(tmp: Path, n: int, chunks: int) -> dict:
    """Write the cohort under ``tmp``, then time the cohort build and the dry runs."""
    root = tmp / "dataset"
    t0 = time.perf_counter()
    make_dataset(root, n)
    made = time.perf_counter() - t0
    t0 = time.perf_counter()
    cohort, rejects = build_cohort(root, n_chunks=chunks)
    cohort_s = time.perf_counter() - t0
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["demo"]["enabled"] = False
    cfg["dataset"]["root"] = str(root)
    cfg["prep"]["n_chunks"] = chunks
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = {"volumes": len(cohort), "rejected": len(rejects), "chunks": chunks, "dataset_write_s": round(made, 1),
           "cohort_build_s": round(cohort_s, 2)}
    profiles = {"dry_run_dag_s": [], "dry_run_slurm_profile_s": ["--workflow-profile", str(REPO / "workflow/profiles/slurm")]}
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        del profiles["dry_run_slurm_profile_s"]  # the Slurm profile needs the executor plugin
    for key, extra in profiles.items():
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp),
                              "--configfile", str(tmp / "config.yaml"), *extra, "-n", "--quiet", "rules"],
                             capture_output=True, text=True)
        out[key] = round(time.perf_counter() - t0, 2)
        if res.returncode != 0:
            raise SystemExit(res.stdout + res.stderr)
        jobs = [ln.split() for ln in res.stdout.splitlines() if ln.split()[:1] == ["total"]]
        out["jobs"] = int(jobs[0][1]) if jobs else None
    return out


if __name__ == "__main__":
    main()
