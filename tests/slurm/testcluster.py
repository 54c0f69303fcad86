"""The one-node test cluster (tests/slurm/cluster.sh) as the tests find or start it, and snakemake through it.

CI starts the cluster with ``cluster.sh run`` (``SLURM_CONF`` and ``CTGEN_SLURM_STATE`` are set); where
this runs as root without one, ``find_or_start`` starts one; elsewhere it says why there is none.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CLUSTER = HERE / "cluster.sh"
PROFILES = ["--workflow-profile", str(REPO / "workflow/profiles/slurm"), "--profile", str(HERE / "profile")]
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+)")


@dataclass
class Cluster:
    env: dict            # for snakemake and Slurm's clients: SLURM_CONF, the venv's bin first on PATH
    state: Path          # the cluster's folder (slurm.conf, log/slurmctld.log)
    started: bool        # started here (and stopped by ``stop``), not by CI's ``cluster.sh run``


def already_up() -> bool:
    """A cluster is up for this whole test session (CI's ``cluster.sh run``), so that any test can use it."""
    return bool(os.environ.get("CTGEN_SLURM_STATE"))


def find_or_start(folder: Path | None = None) -> tuple[Cluster | None, str]:
    """The running test cluster, or one started with its state in ``folder``; (None, why not) where neither
    (``folder`` None: find one, start none)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    state = os.environ.get("CTGEN_SLURM_STATE")  # set where already_up()
    started = False
    if not state:
        if folder is None:
            return None, "no test cluster is up (CTGEN_SLURM_STATE is not set) and none was to be started"
        if os.geteuid() != 0:
            return None, "starting munged/slurmctld/slurmd needs root (run tests/slurm/cluster.sh run pytest ...)"
        if not shutil.which("slurmctld") and not shutil.which("apt-get"):
            return None, "Slurm is not installed and there is no apt-get to install it"
        try:  # apt-get may install packages first
            res = subprocess.run(["bash", str(CLUSTER), "start", str(folder)], env={**env, "PYTHON": sys.executable},
                                 capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            res = subprocess.CompletedProcess([], 124, "", "cluster.sh start timed out after 600 s")
        if res.returncode != 0:
            subprocess.run(["bash", str(CLUSTER), "stop", str(folder)], timeout=60)
            return None, f"the test cluster did not start:\n{res.stderr[-2000:]}"
        state, started = str(folder), True
    env["SLURM_CONF"] = f"{state}/slurm.conf"
    if subprocess.run(["sinfo"], env=env, capture_output=True).returncode != 0:
        return None, f"sinfo fails with SLURM_CONF={env['SLURM_CONF']}"
    return Cluster(env, Path(state), started), ""


def stop(cluster: Cluster | None) -> None:
    if cluster is not None and cluster.started:
        subprocess.run(["bash", str(CLUSTER), "stop", str(cluster.state)], timeout=60)


def snakemake(workdir: Path, snakefile: Path, env: dict, *args: str, limit: int = 1500) -> subprocess.CompletedProcess:
    """snakemake with the Slurm profile and the test additions, its executor polling every 2 s (poll.py); SIGINT
    after ``limit`` seconds (SIGTERM would not stop it). The tiny demo takes 5-6 min alone, 11 min beside the
    other workers here and over 15 min in one CI run (2026-12-06; 49 of its 60 jobs done at 15 min): the default
    leaves it room, and still ends a hung run."""
    cmd = ["timeout", "-s", "INT", "-k", "60", str(limit), sys.executable, str(HERE / "poll.py"), "-s", str(snakefile),
           "-d", str(workdir), *PROFILES, "--latency-wait", "5", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, env=env)


def slurm_job_ids(output: str) -> dict[int, int]:
    """Snakemake job number -> Slurm job id, from the executor's submission lines."""
    return {int(job): int(slurm) for job, slurm in SUBMITTED.findall(output)}
