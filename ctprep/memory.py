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


#: the benchmarks' "a job's memory does not grow with the cohort": the peak at 4N over the peak at N, with room for
#: bookkeeping; and the growth from N to 4N under this share of the added volumes' int16 size (no job holds them)
GROWTH_LIMIT = 1.2
HELD_SHARE = 0.5

#: the environment a benchmark's measured child runs in: glibc's mmap threshold fixed at its starting value, 128 KiB.
#: By default glibc raises it whenever a large mapped block is freed; later transient buffers then come from the heap
#: and the high-water mark follows how they fragment it (train_stream: 47 MiB spread over 6 runs, no trend with the
#: size), more than the growth bound. Fixed, every block of 128 KiB or more is mapped on its own and returned when
#: freed, so the peak is the live memory; a held volume is such a block and stays counted.
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def growth_verdict(sizes: list[int], peaks: list[float], voxels: int, what: str = "peak",
                   unit: str = "volumes as int16") -> tuple[bool, str]:
    """(within both targets, the line that says so) of the peaks (MiB) at ``sizes`` volumes of ``voxels`` each: the
    ratio alone cannot see held volumes on a large baseline, the bound on the growth can. ``voxels``: a sample's
    2-byte values (a derived sample's int16 codes or float16 mu and sigma, named by ``unit``)."""
    ratio, growth = peaks[1] / peaks[0], peaks[1] - peaks[0]
    added = sizes[1] - sizes[0]
    bound = HELD_SHARE * added * voxels * 2 / 2**20
    ok = ratio <= GROWTH_LIMIT and growth <= bound
    return ok, (f"{what} at {sizes[1]} over {sizes[0]} volumes: {ratio:.2f} (target <= {GROWTH_LIMIT}), growth "
                f"{growth:.0f} MiB (target <= {bound:.0f} MiB, {HELD_SHARE:g} x the {added} added {unit}): "
                f"{'within' if ok else 'MISSES'} the targets")
