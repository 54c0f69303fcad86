"""The demo workflow through a real one-node Slurm cluster (tests/slurm/cluster.sh) with the Slurm profile.

The cluster comes from ``cluster.sh run`` (CI: ``SLURM_CONF`` and ``CTGEN_SLURM_STATE`` are set) or is
started here when this runs as root; elsewhere the tests skip and say why. ``CTGEN_REQUIRE_SLURM=1``
turns that skip into a failure, so CI cannot pass without the cluster.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CLUSTER = HERE / "cluster.sh"
PROFILES = ["--workflow-profile", str(REPO / "workflow/profiles/slurm"), "--profile", str(HERE / "profile")]
pytestmark = pytest.mark.workflow
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+)")


def _unavailable(reason: str):
    if os.environ.get("CTGEN_REQUIRE_SLURM") == "1":
        pytest.fail(f"Slurm is required here (CTGEN_REQUIRE_SLURM=1) but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Environment for snakemake and Slurm's clients: SLURM_CONF, the venv's bin first on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    state = os.environ.get("CTGEN_SLURM_STATE")
    started = None
    if not state:
        if os.geteuid() != 0:
            _unavailable("starting munged/slurmctld/slurmd needs root (run tests/slurm/cluster.sh run pytest ...)")
        if not shutil.which("slurmctld") and not shutil.which("apt-get"):
            _unavailable("Slurm is not installed and there is no apt-get to install it")
        started = tmp_path_factory.mktemp("slurm")
        try:  # apt-get may install packages first
            res = subprocess.run(["bash", str(CLUSTER), "start", str(started)], env={**env, "PYTHON": sys.executable},
                                 capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            res = subprocess.CompletedProcess([], 124, "", "cluster.sh start timed out after 600 s")
        if res.returncode != 0:
            subprocess.run(["bash", str(CLUSTER), "stop", str(started)], timeout=60)
            _unavailable(f"the test cluster did not start:\n{res.stderr[-2000:]}")
        state = str(started)
    env["SLURM_CONF"] = f"{state}/slurm.conf"
    if subprocess.run(["sinfo"], env=env, capture_output=True).returncode != 0:
        _unavailable(f"sinfo fails with SLURM_CONF={env['SLURM_CONF']}")
    yield {"env": env, "state": Path(state)}
    if started:
        subprocess.run(["bash", str(CLUSTER), "stop", str(started)], timeout=60)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def snakemake(workdir: Path, snakefile: Path, env: dict, *args: str, limit: int = 900) -> subprocess.CompletedProcess:
    """snakemake with the Slurm profile and the test additions; SIGINT on timeout (SIGTERM would not stop it)."""
    cmd = ["timeout", "-s", "INT", "-k", "60", str(limit), sys.executable, "-m", "snakemake", "-s", str(snakefile),
           "-d", str(workdir), *PROFILES, "--latency-wait", "5", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, env=env)


def slurm_job_ids(output: str) -> dict[int, int]:
    """Snakemake job number -> Slurm job id, from the executor's submission lines."""
    return {int(job): int(slurm) for job, slurm in SUBMITTED.findall(output)}


def test_demo_workflow_runs_through_slurm(cluster, tmp_path):
    work = tmp_path / "wf"
    work.mkdir()
    cfg = _merge(yaml.safe_load((REPO / "config.yaml").read_text()),
                 yaml.safe_load((REPO / "tests/workflow/configs/tiny.yaml").read_text()))
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.perf_counter()
    # the whole demo workflow (rule all: data, models, samples, evaluation, figures) on the tiny config
    res = snakemake(work, REPO / "Snakefile", cluster["env"], "--configfile", str(work / "config.yaml"))
    seconds = time.perf_counter() - t0
    out = res.stdout + res.stderr
    (tmp_path / "snakemake.out").write_text(out)
    assert res.returncode == 0, f"snakemake via Slurm failed ({res.returncode}) after {seconds:.0f} s:\n{out[-6000:]}"
    print(f"demo workflow through Slurm: {seconds:.0f} s")  # shown with pytest -s; the CI note quotes it

    R = work / "results"
    for path in ("cohort/cohort.parquet", "shards/train/manifest.json", "rejects.csv",
                 "models/tokenizer/model.safetensors", "models/generator/model.safetensors",
                 "models/superres/model.safetensors", "samples/volumes/samples.csv", "evaluation/cascade/metrics.json",
                 "figures/samples.png"):
        assert (R / path).is_file(), path
    # every job went through sbatch, and Slurm ran each one to a clean exit
    ids = slurm_job_ids(out)
    total = re.search(r"^total\s+(\d+)", out, re.M)
    local = len(re.findall(r"^localrule \w+:", out, re.M))  # `all` runs in the Snakemake process itself
    assert total and len(ids) == int(total.group(1)) - local, (len(ids), local, total and total.group(0))
    ctld = (cluster["state"] / "log/slurmctld.log").read_text()
    for slurm_id in ids.values():
        # the main scheduler logs "Allocate JobId=N", the backfill scheduler "Started JobId=N"
        assert re.search(rf"(Allocate|Started) JobId={slurm_id} ", ctld), slurm_id
        assert re.search(rf"_job_complete: JobId={slurm_id} WEXITSTATUS 0", ctld), slurm_id
    # the profile's GPU request reached Slurm: training jobs held the (fake) GPU in the gpu partition
    logs = list((work / ".snakemake/slurm_logs/rule_train_tokenizer").rglob("*.log"))
    assert logs, "no Slurm log kept for train_tokenizer"
    slurm_id = int(logs[0].stem)
    job = subprocess.run(["scontrol", "show", "job", str(slurm_id)], env=cluster["env"], capture_output=True,
                         text=True).stdout
    assert "Partition=gpu" in job and "TresPerJob=gres:gpu:1" in job, job


def test_a_failing_job_fails_the_run_and_names_its_log(cluster, tmp_path):
    work = tmp_path / "fail"
    work.mkdir()
    res = snakemake(work, HERE / "Snakefile.fail", cluster["env"], "--retries", "0", limit=240)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-4000:]
    assert "logs/broken.log" in out, out[-4000:]  # the rule's log is named in the error
    assert (work / "results/ok.txt").is_file()  # the job beside it went through
    ids = slurm_job_ids(out)
    assert len(ids) == 2, out[-4000:]
    ctld = (cluster["state"] / "log/slurmctld.log").read_text()
    exits = {int(i): int(c) for i, c in re.findall(r"_job_complete: JobId=(\d+) WEXITSTATUS (\d+)", ctld)}
    assert sorted(exits[i] != 0 for i in ids.values()) == [False, True], {i: exits.get(i) for i in ids.values()}
    assert "deliberate failure" in (work / "logs/broken.log").read_text()
