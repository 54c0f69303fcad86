"""When the job's time runs out: the training loop checkpoints and stops ahead of a scheduler's time limit.

Why not a warning signal (``sbatch --signal``): under Snakemake's Slurm executor the training process is
the great-grandchild of the job's shell (batch shell -> snakemake -> srun step -> snakemake -> rule shell
-> ctgen). Measured on the test cluster (Slurm 22, the plugin's batch script and job step as they are):
``--signal=B:USR1@T`` kills the batch shell, which ends the job and SIGTERMs the training process before
it can checkpoint; ``--signal=USR1@T`` reaches every process of the step, so the two snakemake
processes and the rule's shell die of the unhandled USR1 and the training process is left to race the
step's clean-up. The loop therefore asks the scheduler for the job's time left once, keeps its own
deadline, and stops ``stop_margin_s`` plus two step times before it: it writes the checkpoint and exits
with status 75, the job fails, and Snakemake's retry (``retries`` in the profile, ``runtime`` growing
with ``attempt``) resumes from the checkpoint. SIGTERM and SIGUSR1 still stop it the same way
(pre-emption, ``scancel --signal``).

Where the time left comes from: ``CTGEN_JOB_DEADLINE`` (Unix time; any scheduler, tests), else Slurm's
``squeue -h -j $SLURM_JOB_ID -o %L`` (time left as ``[days-]hours:minutes:seconds``), else none.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time

log = logging.getLogger(__name__)

ENV = "CTGEN_JOB_DEADLINE"
_LEFT = re.compile(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)$")


def parse_time_left(text: str) -> float | None:
    """Seconds from squeue's ``%L`` ("1-02:03:04", "02:03:04", "03:04"); None for UNLIMITED, NOT_SET, etc."""
    m = _LEFT.match(text.strip())
    if not m:
        return None
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def job_deadline(now: float | None = None) -> float | None:
    """The job's end as a ``time.time()`` value, or None when there is no limit to honour."""
    now = time.time() if now is None else now
    if os.environ.get(ENV):
        try:
            return float(os.environ[ENV])
        except ValueError:  # float()'s own message names neither the variable nor what it should hold
            raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected the job's end as Unix time in seconds "
                             "(e.g. 1735689600)") from None
    job = os.environ.get("SLURM_JOB_ID")
    if not job or not shutil.which("squeue"):
        return None
    try:
        res = subprocess.run(["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("could not ask Slurm for the time left of job %s: %s", job, err)
        return None
    left = parse_time_left(res.stdout.strip().splitlines()[0]) if res.returncode == 0 and res.stdout.strip() else None
    if left is None and res.returncode == 0 and res.stdout.strip() in ("UNLIMITED", "NOT_SET"):
        log.info("Slurm job %s: no time limit to honour (squeue says %r)", job, res.stdout.strip())
        return None
    if left is None:  # a limit may be there all the same: the run relies on Slurm's SIGTERM alone (KillWait)
        log.warning("Slurm job %s: could not read its time left (squeue exit %d: %r): not stopping ahead of a time "
                    "limit", job, res.returncode, (res.stdout or res.stderr).strip()[:200])
        return None
    log.info("Slurm job %s ends in %.0f s", job, left)
    return now + left


class Deadline:
    """``due(step_seconds)``: True once the time left is below the margin plus two steps."""

    def __init__(self, margin_s: float, end: float | None = None):
        self.margin_s, self.end = margin_s, end

    @classmethod
    def from_environment(cls, margin_s: float) -> Deadline:
        return cls(margin_s, job_deadline())

    def left(self) -> float | None:
        return None if self.end is None else self.end - time.time()

    def due(self, step_seconds: float) -> bool:
        left = self.left()
        return left is not None and left < self.margin_s + 2 * step_seconds
