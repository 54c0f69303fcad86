"""The small rehearsal (CI): a cohort four times larger trains with the same peak memory per training job.

N is the tests' tiny demo run (3 training patients); 4N is the same config with 12, run here.

The full rehearsal (CT-RATE-size scans, the paper models) is benchmarks/rehearsal.py --profile full.
"""

from __future__ import annotations

import importlib.util

import pytest
import yaml

from tests.workflow.wf import REPO

pytestmark = pytest.mark.workflow
spec = importlib.util.spec_from_file_location("rehearsal", REPO / "benchmarks" / "rehearsal.py")
rehearsal = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rehearsal)


def test_training_memory_does_not_grow_with_the_cohort(demo_run, tmp_path):
    targets = [f"results/models/{m.removeprefix('train_')}/model.safetensors" for m in rehearsal.TRAINING]
    config = yaml.safe_load((demo_run / "config.yaml").read_text())
    assert rehearsal.merge(config, rehearsal.overrides("small", 3)) == config  # the demo run is the size N = 3
    small = {"n": 3, "rules": rehearsal.read_benchmarks(demo_run / "results" / "benchmarks")}
    large = rehearsal.run("small", 12, tmp_path, 2, targets)
    rows = rehearsal.flatness(small, large)
    assert {r["job"] for r in rows} == set(rehearsal.TRAINING)  # every training job was measured at both sizes
    assert all(r["ok"] for r in rows), rows
