"""Shared fixtures: real scans copied from ../shared (see tests/data/NOTICE.md), and the tiny demo run."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.slurm import testcluster
from tests.workflow.wf import DemoRun, run_rehearsal_large, run_tiny_demo

DATA = Path(__file__).parent / "data"
REAL_NIFTI = ["pulmonary_report_ct_cropped.nii.gz", "example_ct_sm.nii.gz", "example_ct.nii.gz"]
REPO = Path(__file__).resolve().parents[1]

# `make test` runs three pytest workers (pytest -n 3) on 2 cores: with two, about a third of the cores' time
# was idle (Slurm's polls and time limits, subprocess start-up; user + sys 23.4 CPU-min in 19.3 min), and a
# third worker cut the suite from 17.4 to 15.2 min (2026-12-05). A module runs whole on one
# worker (its module fixtures are built once), and these groups share a worker as well: the workflow and
# Slurm tests (one tiny demo run, a session fixture, and the one two-CPU test cluster), and the
# paper-geometry training steps (up to ~13 GiB each must not run side by side on a 24 GiB machine).
# The two long groups start first, each on its own worker, and the other modules fill in beside them
# (pytest-xdist's own order, by test count, had put the Slurm tests last on a busy worker: 24.6 min
# against 14.9 min for the other).
# The workflow modules that do not read the demo run (rules, schema, envs: dry runs) fill in on either worker.
GROUPS = {"tests/workflow/test_workflow.py": "workflow", "tests/workflow/test_report.py": "workflow",
          "tests/workflow/test_rehearsal.py": "workflow", "tests/slurm/": "workflow",
          "tests/ctgen/test_paper_geometry.py": "paper", "tests/ctgen/test_latent_flow.py": "paper"}
FIRST = ("workflow", "paper")  # group start order
# Last in its group: the time-limit test's training must finish in its second Slurm attempt (2 minutes). Run
# right after the tiny demo, beside the paper-geometry steps on the other worker (2 threads each), its tokenizer
# trained at half speed and needed a third attempt: 466 s in CI (134 s on an idle machine); last, 120-123 s in CI;
# once the rehearsal's 4N run went beside the demo, the group's end met the last paper steps again: 170 s.
LAST = ("tests/slurm/test_timelimit.py",)


def worker_group(nodeid: str) -> str:
    path = nodeid.split("::")[0]
    return next((group for prefix, group in GROUPS.items() if path.startswith(prefix)), path)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: plain `pytest` runs without it
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's module scheduling with the groups above, in collection order (its xdist_group marks do
    not group under pytest 9: the node id they rename is no longer the one the scheduler reads)."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid)

    config.option.loadscopereorder = False  # as --no-loadscope-reorder: the order of pytest_collection_modifyitems
    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    rank = {group: i for i, group in enumerate(FIRST)}
    items.sort(key=lambda item: (rank.get(worker_group(item.nodeid), len(FIRST)),  # stable: modules keep their order
                                 item.nodeid.startswith(LAST)))


@pytest.fixture(params=REAL_NIFTI)
def real_nifti(request) -> Path:
    return DATA / request.param


@pytest.fixture
def data_dir() -> Path:
    return DATA


@pytest.fixture
def repo_config() -> Path:
    return REPO / "config.yaml"


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> tuple[testcluster.Cluster | None, str]:
    """(the one-node test cluster, "") or (None, why there is none): CI's (``cluster.sh run``), or one started
    here as root and stopped at the session's end (tests/slurm/testcluster.py)."""
    folder = None if testcluster.already_up() else tmp_path_factory.mktemp("slurm")
    found, why = testcluster.find_or_start(folder)
    yield found, why
    testcluster.stop(found)


@pytest.fixture(scope="session")
def tiny_demo(request, tmp_path_factory) -> DemoRun:
    """The whole workflow (tiny config) from nothing to samples, metrics and figures, once per session (the
    slowest fixture; the workflow, report, rehearsal, Slurm and time-limit tests read it): through the test
    Slurm cluster where one is up (CI's ``cluster.sh run``) or where this session runs the Slurm tests and can
    start one, so that the Slurm test checks this very run; else locally. (A plain ``make test`` as root had run
    it twice, locally and through the cluster the Slurm test started: 6 min of a worker.) Where the session runs
    the small rehearsal, its 4N run starts first, in a thread beside this one (rehearsal_large)."""
    def session_runs(prefix: str) -> bool:
        return any(item.nodeid.startswith(prefix) for item in request.session.items)

    if session_runs(REHEARSAL_TEST):
        request.getfixturevalue("rehearsal_large")  # starts beside the demo
    cluster = None
    if testcluster.already_up() or session_runs("tests/slurm/"):
        cluster, why = request.getfixturevalue("slurm_cluster")
        assert cluster is not None or not testcluster.already_up(), why  # CI's cluster must be found
    return run_tiny_demo(tmp_path_factory.mktemp("demo") / "wf", cluster)


REHEARSAL_TEST = "tests/workflow/test_rehearsal.py::test_training_memory_does_not_grow_with_the_cohort"


@pytest.fixture(scope="session")
def rehearsal_large(tmp_path_factory) -> Future:
    """The small rehearsal's 4N run (tests/workflow/test_rehearsal.py), in a thread: started by the tiny demo
    fixture where the session runs that test, so that it runs beside the demo (its N) rather than after it,
    at the end of the workflow worker's chain while the other workers had finished (3 min of one core)."""
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(run_rehearsal_large, tmp_path_factory.mktemp("rehearsal"))


@pytest.fixture(scope="session")
def demo_run(tiny_demo) -> Path:
    return tiny_demo.work
