"""The test cluster (tests/slurm/testcluster.py) of the Slurm tests."""

from __future__ import annotations

import os

import pytest

from tests.slurm import testcluster


@pytest.fixture(scope="session")
def cluster(slurm_cluster) -> testcluster.Cluster:
    """The running test cluster, or one started here as root (tests/conftest.py: slurm_cluster); else the Slurm
    tests skip and say why (``CTGEN_REQUIRE_SLURM=1`` turns that skip into a failure, so CI cannot pass without
    the cluster)."""
    found, why = slurm_cluster
    if found is None:
        if os.environ.get("CTGEN_REQUIRE_SLURM") == "1":
            pytest.fail(f"Slurm is required here (CTGEN_REQUIRE_SLURM=1) but {why}")
        pytest.skip(why)
    return found
