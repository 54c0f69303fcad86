"""A process's own peak memory, as training summaries and benchmarks report it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from ctprep.memory import peak_rss_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_a_child_does_not_report_its_parents_peak():
    """Linux carries a process's peak over exec (ru_maxrss of a job that bash started was its parent's):
    the child's own high-water mark is what a job used."""
    ballast = np.ones(400 * 2**20 // 8)  # 400 MiB touched in this process before the child starts
    assert peak_rss_bytes() >= ballast.nbytes
    code = ("import resource; from ctprep.memory import peak_rss_bytes; "
            "print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    own, inherited = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                             check=True).stdout.split())
    assert own < 150 * 2**20, own  # a bare interpreter and numpy-free import: tens of MiB
    assert inherited >= own
    del ballast
