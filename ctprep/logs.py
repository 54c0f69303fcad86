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
