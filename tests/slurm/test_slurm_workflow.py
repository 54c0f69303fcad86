"""The demo workflow through a real one-node Slurm cluster (tests/slurm/cluster.sh) with the Slurm profile.

The cluster comes from ``cluster.sh run`` (CI: ``SLURM_CONF`` and ``CTGEN_SLURM_STATE`` are set) or is
started here when this runs as root; elsewhere the tests skip and say why. ``CTGEN_REQUIRE_SLURM=1``
turns that skip into a failure, so CI cannot pass without the cluster.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.slurm.testcluster import HERE, slurm_job_ids, snakemake

pytestmark = pytest.mark.workflow


def test_demo_workflow_runs_through_slurm(cluster, tiny_demo):
    # the whole demo workflow (rule all: data, models, samples, evaluation, figures) on the tiny config: the
    # session's tiny demo, which went through this cluster (tests/conftest.py)
    run = tiny_demo
    assert run.slurm
    print(f"demo workflow through Slurm: {run.seconds:.0f} s")  # shown with pytest -s; the CI note quotes it
    work, out = run.work, run.output

    R = work / "results"
    for path in ("cohort/cohort.parquet", "shards/train/manifest.json", "rejects.csv",
                 "models/tokenizer/model.safetensors", "models/generator/model.safetensors",
                 "models/superres/model.safetensors", "samples/volumes/samples.csv", "evaluation/cascade/metrics.json",
                 "figures/samples.png"):
        assert (R / path).is_file(), path
    # every job went through sbatch, and Slurm ran each one to a clean exit
    ids = slurm_job_ids(out)
    total = re.search(r"^total\s+(\d+)", out, re.M)
    # `all` and the bookkeeping rules (localrules, the manifest checkpoints among them: "localcheckpoint") run in the
    # Snakemake process itself
    local = len(re.findall(r"^local(?:rule|checkpoint) \w+:", out, re.M))
    assert total and len(ids) == int(total.group(1)) - local, (len(ids), local, total and total.group(0))
    ctld = (cluster.state / "log/slurmctld.log").read_text()
    for slurm_id in ids.values():
        # the main scheduler logs "Allocate JobId=N", the backfill scheduler "Started JobId=N"
        assert re.search(rf"(Allocate|Started) JobId={slurm_id} ", ctld), slurm_id
        assert re.search(rf"_job_complete: JobId={slurm_id} WEXITSTATUS 0", ctld), slurm_id
    # the profile's GPU request reached Slurm: training jobs held the (fake) GPU in the gpu partition
    logs = list((work / ".snakemake/slurm_logs/rule_train_tokenizer").rglob("*.log"))
    assert logs, "no Slurm log kept for train_tokenizer"
    slurm_id = int(logs[0].stem)
    job = subprocess.run(["scontrol", "show", "job", str(slurm_id)], env=cluster.env, capture_output=True,
                         text=True).stdout
    assert "Partition=gpu" in job and "TresPerJob=gres:gpu:1" in job, job


def test_a_failing_job_fails_the_run_and_names_its_log(cluster, tmp_path):
    work = tmp_path / "fail"
    work.mkdir()
    res = snakemake(work, HERE / "Snakefile.fail", cluster.env, "--retries", "0", limit=240)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-4000:]
    assert "logs/broken.log" in out, out[-4000:]  # the rule's log is named in the error
    assert (work / "results/ok.txt").is_file()  # the job beside it went through
    ids = slurm_job_ids(out)
    assert len(ids) == 2, out[-4000:]
    ctld = (cluster.state / "log/slurmctld.log").read_text()
    exits = {int(i): int(c) for i, c in re.findall(r"_job_complete: JobId=(\d+) WEXITSTATUS (\d+)", ctld)}
    assert sorted(exits[i] != 0 for i in ids.values()) == [False, True], {i: exits.get(i) for i in ids.values()}
    assert "deliberate failure" in (work / "logs/broken.log").read_text()
