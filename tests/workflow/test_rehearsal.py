"""The small rehearsal (CI): a cohort four times larger trains with the same peak memory per training job.

The full rehearsal (CT-RATE-size scans, the paper models) is benchmarks/rehearsal.py --profile full.
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.workflow.wf import REPO

pytestmark = pytest.mark.workflow
spec = importlib.util.spec_from_file_location("rehearsal", REPO / "benchmarks" / "rehearsal.py")
rehearsal = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rehearsal)


def test_training_memory_does_not_grow_with_the_cohort(tmp_path):
    targets = [f"results/models/{m.removeprefix('train_')}/model.safetensors" for m in rehearsal.TRAINING]
    small = rehearsal.run("small", 3, tmp_path, 2, targets)
    large = rehearsal.run("small", 12, tmp_path, 2, targets)
    rows = rehearsal.flatness(small, large)
    assert {r["job"] for r in rows} == set(rehearsal.TRAINING)  # every training job was measured at both sizes
    assert all(r["ok"] for r in rows), rows
