"""``python tests/slurm/poll.py <snakemake arguments>`` (testcluster.snakemake runs it so): snakemake whose Slurm
executor polls at the profile's ``seconds-between-status-checks`` every time, for the one-node test cluster.

The plugin (2.x) adds 10 s to its poll interval after every poll in which no job ended (up to 180 s): on
the test cluster, whose jobs take seconds, a job of 8 s was seen to end after 14 s and one of 60 s after
68 s (the tiny demo's jobs ended on a 14-s beat, 35 Slurm jobs in 302 s). A real cluster wants that
back-off; the tests want their jobs seen when they end. Only the waiting changes: submission, status
queries and failure handling are the plugin's own. Measured on an idle machine: the tiny demo 302 -> 307 s
(its jobs are CPU-bound once several run), the time-limit test 144 -> 134 s (its long attempts are seen
when they end, not up to 40 s later).
"""

from __future__ import annotations

import sys

import snakemake_executor_plugin_slurm as slurm
from snakemake.cli import main

_check_active_jobs = slurm.Executor.check_active_jobs


async def check_active_jobs(self, active_jobs):
    async for job in _check_active_jobs(self, active_jobs):
        yield job
    self.next_seconds_between_status_checks = None  # the executor then sleeps seconds_between_status_checks


slurm.Executor.check_active_jobs = check_active_jobs

if __name__ == "__main__":
    sys.exit(main())
