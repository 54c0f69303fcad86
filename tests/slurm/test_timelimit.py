"""A training job whose Slurm time limit is far shorter than its work: it stops ahead of the limit with a
checkpoint, Snakemake's retry resubmits it with more time, it resumes, and it ends with the weights of an
uninterrupted run. Through the real one-node cluster (tests/slurm/cluster.sh) and the Slurm profile."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml

from tests.slurm.testcluster import REPO, SUBMITTED, snakemake
from tests.workflow import wf

TOKENIZER = "results/models/tokenizer/model.safetensors"
# the tokenizer of the tiny demo config, 250 steps (300 took 25-90 s on 2 cores, idle or not), stopping 40 s
# (+ 2 steps) before its limit: a first attempt of 1 minute (at most 20 s of training) cannot finish, the
# third (4 minutes) surely can (600 steps, and 300 beside a training reference: on a busy machine all
# three attempts ran out of time, stopping correctly each time)
OVERRIDES = {
    "models": {"resources": {"tokenizer": {"threads": 2, "mem_mb": 4000, "runtime": 1, "gpu": 0}}},
    "model_presets": {"demo": {"tokenizer": {"train": {"max_steps": 250, "batch_size": 2, "warmup_steps": 1,
                                                       "ckpt_every": 1000, "log_every": 50, "tensorboard": False,
                                                       "stop_margin_s": 40}}}},
}


def workdir(demo_run: Path, path: Path) -> Path:
    """A copy of the finished tiny demo run (its data, with mtimes and Snakemake's records: not built again)
    with the tokenizer settings above: the tokenizer is the one job that its target needs again."""
    shutil.copytree(demo_run, path, symlinks=True, ignore=shutil.ignore_patterns("slurm_logs"))
    cfg = wf.merge(yaml.safe_load((path / "config.yaml").read_text()), OVERRIDES)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_training_survives_its_time_limit(cluster, demo_run, tmp_path):
    env = {k: v for k, v in cluster.env.items() if k != "CTGEN_JOB_DEADLINE"}
    work = workdir(demo_run, tmp_path / "slurm")
    reference = Path(shutil.copytree(work, tmp_path / "reference", symlinks=True))
    # the uninterrupted reference (local, no time limit) first: trained beside the Slurm run, on a busy machine
    # it slowed the Slurm attempts so much that the last one ran out of time as well
    wf.snakemake(reference, TOKENIZER)
    # the target before --configfile, which takes every following word as a config file
    res = snakemake(work, REPO / "Snakefile", env, TOKENIZER, "--configfile", str(work / "config.yaml"), limit=900)
    out = res.stdout + res.stderr
    (tmp_path / "snakemake.out").write_text(out)
    assert res.returncode == 0, out[-6000:]
    attempts = [int(slurm) for _, slurm in SUBMITTED.findall(out)]  # the Slurm jobs of the one rule, in order
    logs = sorted((work / ".snakemake/slurm_logs/rule_train_tokenizer").rglob("*.log"))
    assert len(logs) == len(attempts) >= 2, out[-4000:]
    # the training exits 75 ahead of the limit; the job itself ends with the status of the snakemake
    # process that ran the rule (1), not Slurm's TIMEOUT: it stopped, it was not killed
    ctld = (cluster.state / "log/slurmctld.log").read_text()
    first = min(int(p.stem) for p in logs)
    assert re.search(rf"_job_complete: JobId={first} WEXITSTATUS [1-9]", ctld), ctld[-3000:]
    assert not re.search(rf"Time limit exhausted for JobId={first}\b", ctld), ctld[-3000:]
    stops = json.loads((work / "results/models/tokenizer/train_summary.json").read_text())["stops"]
    assert [s["job"] for s in stops] == [str(job) for job in attempts[:-1]], (stops, attempts)  # all but the last
    assert all(s["reason"] == "time limit" and s["exit_code"] == 75 and s["step"] > 0 for s in stops), stops
    assert [s["step"] for s in stops] == sorted({s["step"] for s in stops}), stops  # each attempt got further
    train_log = (work / "results/logs/train_tokenizer.log").read_text()  # the last attempt's
    assert re.search(r"resumed from .* at step [1-9]\d*", train_log), train_log[-2000:]
    a = (reference / TOKENIZER).read_bytes()
    b = (work / TOKENIZER).read_bytes()
    assert a == b, "the resumed run's weights differ from the uninterrupted run's"
