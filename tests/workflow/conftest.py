"""The finished tiny demo run, shared by the workflow and report tests (it is the slowest fixture)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.workflow.wf import make_workdir, snakemake


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """The whole workflow (tiny config) from nothing to samples, metrics and figures."""
    work = make_workdir(tmp_path_factory.mktemp("wf"), {})
    snakemake(work)
    return work
