"""Logging for workflow jobs: everything (logging, warnings, tqdm progress) into the rule's log."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def log_to(path: str | Path, level: int = logging.INFO) -> None:
    """Send logging, warnings and stderr (tqdm's progress bars) to ``path``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    stream = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the job
    sys.stderr = stream
    logging.basicConfig(stream=stream, level=level, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)


def progress(iterable=None, *, total: int | None = None, desc: str | None = None, unit: str = "it", **kwargs):
    """A tqdm bar on stderr, which :func:`log_to` sends to the rule's log.

    On a terminal it redraws every second; in a log file every 30 s (as the training loop's bar),
    so a long job leaves a readable trail instead of a line per item.
    """
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, mininterval=1.0 if tty else 30.0,
                dynamic_ncols=tty, **kwargs)
