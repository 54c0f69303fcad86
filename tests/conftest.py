"""Shared fixtures: real scans copied from ../shared (see tests/data/NOTICE.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
REAL_NIFTI = ["pulmonary_report_ct_cropped.nii.gz", "example_ct_sm.nii.gz", "example_ct.nii.gz"]
REPO = Path(__file__).resolve().parents[1]

# `make test` runs two pytest workers (pytest -n 2): about half of the suite's wall time was waiting
# (Slurm's polls and time limits, subprocess start-up) with a core idle. A module runs whole on one
# worker (its module fixtures are built once), and these share a worker as well: the workflow tests
# one tiny demo run (a session fixture), the Slurm tests the one two-CPU test cluster, and the
# paper-geometry training steps (up to ~13 GiB each) must not run side by side on a 24 GiB machine.
GROUPS = {"tests/workflow/": "workflow", "tests/slurm/": "slurm", "tests/ctgen/test_paper_geometry.py": "paper",
          "tests/ctgen/test_latent_flow.py": "paper"}


def worker_group(nodeid: str) -> str:
    path = nodeid.split("::")[0]
    return next((group for prefix, group in GROUPS.items() if path.startswith(prefix)), path)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: plain `pytest` runs without it
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's module scheduling with the groups above (its xdist_group marks do not group under
    pytest 9: the node id they rename is no longer the one the scheduler reads)."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid)

    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: worker_group(item.nodeid) != "slurm")  # the longest group starts first


@pytest.fixture(params=REAL_NIFTI)
def real_nifti(request) -> Path:
    return DATA / request.param


@pytest.fixture
def data_dir() -> Path:
    return DATA


@pytest.fixture
def repo_config() -> Path:
    return REPO / "config.yaml"
