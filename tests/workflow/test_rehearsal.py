"""The small rehearsal (CI): a cohort four times larger trains with the same peak memory per training job.

N is the tests' tiny demo run (3 training patients); 4N is the same config with 12, run beside it
(tests/conftest.py: rehearsal_large).

The full rehearsal (CT-RATE-size scans, the paper models) is benchmarks/rehearsal.py --profile full.
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.workflow import wf

pytestmark = pytest.mark.workflow
rehearsal = wf.benchmark("rehearsal")


def test_training_memory_does_not_grow_with_the_cohort(demo_run, rehearsal_large):
    config = yaml.safe_load((demo_run / "config.yaml").read_text())
    assert rehearsal.merge(config, rehearsal.overrides("small", 3)) == config  # the demo run is the size N = 3
    small = {"n": 3, "rules": rehearsal.read_benchmarks(demo_run / "results" / "benchmarks")}
    large = rehearsal_large.result()  # 4N, run beside the demo (tests/conftest.py)
    assert large["n"] == wf.REHEARSAL_N == 4 * small["n"]
    rows = rehearsal.flatness(small, large)
    assert rehearsal.coverage(small, large, rehearsal.TARGETS) == []  # every network's training measured at both sizes
    assert all(r["ok"] for r in rows), rows


def test_a_training_job_measured_at_one_size_only_fails():
    """flatness() leaves out a job that one size lacks, and no rows at all passed as within the limit; a job the
    rehearsal does not set out to measure may run at one size (the demo run's TSTR classifiers)."""
    job = {"s": 10.0, "max_rss_mb": 500.0}
    small = {"n": 3, "rules": {"prep": job, "train_clip": job, "train_tstr/real": job}}
    large = {"n": 12, "rules": {"prep": job, "train_clip": job}}
    assert [r["job"] for r in rehearsal.flatness(small, large)] == ["train_clip"]  # the tstr job is not compared
    assert rehearsal.coverage(small, large, ("train_clip",)) == []
    assert rehearsal.coverage(small, large, ("train_clip", "train_tstr")) == ["train_tstr was measured at N=3 only"]
    assert rehearsal.coverage(large, small, ("train_tstr",)) == ["train_tstr was measured at N=3 only"]
    nothing = {"n": 3, "rules": {"prep": job}}
    assert rehearsal.coverage(nothing, {**nothing, "n": 12}, ("train_clip",)) == ["train_clip was measured at neither size"]


def test_a_training_jobs_peak_is_the_larger_of_the_sampled_and_the_kernel_one(tmp_path):
    """Snakemake's sampled max_rss can miss a short job's peak; the loop's VmHWM cannot."""
    bench, models = tmp_path / "results" / "benchmarks", tmp_path / "results" / "models"
    header = "s\th:m:s\tmax_rss\tmax_vms\n"
    bench.mkdir(parents=True)
    (bench / "train_tstr").mkdir()
    for job, rss in (("train_latent_flow", 664.0), ("train_clip", 480.0), ("prep", 300.0), ("train_tstr/real", 500.0)):
        (bench / f"{job}.tsv").write_text(header + f"24.1\t0:00:24\t{rss}\t900\n")
    for model, peak_mb, kind in (("latent_flow", 845.0, "cpu_max_rss_bytes"), ("clip", 2000.0, "cuda_max_allocated_bytes"),
                                 ("tstr_real", 600.0, "cpu_max_rss_bytes")):
        (models / model).mkdir(parents=True)
        (models / model / "train_summary.json").write_text(
            json.dumps({"peak_memory_bytes": int(peak_mb * 2**20), "peak_memory_kind": kind}))
    got = rehearsal.read_benchmarks(bench)
    assert got["train_latent_flow"]["max_rss_mb"] == 845.0  # the kernel's peak, above the sampled 664
    assert got["train_clip"]["max_rss_mb"] == 480.0  # a GPU's memory is not the job's RSS
    assert got["prep"]["max_rss_mb"] == 300.0 and got["prep"]["s"] == 24.1
    assert got["train_tstr/real"]["max_rss_mb"] == 600.0  # a wildcard job's model folder: models/tstr_real
