"""The peak memory of this process: what training summaries and benchmarks report.

Why not ``resource.getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries a process's peak across ``exec``
into the program it runs, so a job that bash or Snakemake started reads its parent's peak (626 MiB for a
child that allocated nothing, under Snakemake). ``VmHWM`` in ``/proc/self/status`` is the high-water
mark of this program's own memory; ``ru_maxrss`` is the fallback where there is no ``/proc``.
"""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """This process's own peak resident memory, in bytes."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
