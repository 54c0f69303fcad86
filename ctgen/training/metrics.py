"""Training metrics to ``metrics.csv`` and TensorBoard, safe to resume (rank 0 only).

The rows belong to the run, not to the output folder: each checkpoint keeps a copy
(:meth:`MetricsWriter.snapshot`), and a resumed run starts from that copy's rows up to the
checkpoint's step. The rows a killed run wrote after its last checkpoint are replayed, not
duplicated; an output folder that was deleted (``make clean``, a rerun elsewhere) gets the whole
history back, and a folder left by another run never lends it rows. TensorBoard's ``purge_step``
hides the old events past the step. A logged term that first appears later (e.g. an adversarial loss
switched on at some step) widens the CSV header: the file is rewritten once with the new column.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

FIRST_COLUMNS = ["step", "epoch", "lr", "loss", "grad_norm"]
LAST_COLUMNS = ["steps_per_s", "samples_per_s", "elapsed_s"]


class MetricsWriter:
    """Append one row per logged step to ``out_dir/metrics.csv`` and ``out_dir/tb``."""

    def __init__(self, out_dir: str | os.PathLike, resume_step: int = 0, tensorboard: bool = True,
                 history: str | os.PathLike | None = None):
        """``history``: the checkpoint folder whose :meth:`snapshot` holds this run's rows."""
        self.path = Path(out_dir) / "metrics.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns: list[str] = []
        self.rows: list[dict[str, str]] = []
        kept = Path(history) / self.path.name if history is not None else None
        # a checkpoint written before snapshots existed: the output folder's rows are all there is
        source = kept if kept is not None and kept.exists() else self.path
        if resume_step and source.exists():
            with source.open(newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or [])
                rows = list(reader)
            self.rows = [r for r in rows if r.get("step") and int(r["step"]) <= resume_step]
            dropped = len(rows) - len(self.rows)
            if dropped:
                log.info("metrics.csv: dropping %d rows past the checkpoint step %d", dropped, resume_step)
        if resume_step or self.path.exists():
            self._rewrite()
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: slow, rank 0 only

            self.tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, row: dict[str, float]) -> None:
        new = [k for k in row if k not in self.columns]
        if new:
            middle = [c for c in self.columns if c not in FIRST_COLUMNS + LAST_COLUMNS]
            middle += [k for k in new if k not in FIRST_COLUMNS + LAST_COLUMNS]
            self.columns = ([c for c in FIRST_COLUMNS if c in self.columns or c in row] + sorted(middle)
                            + [c for c in LAST_COLUMNS if c in self.columns or c in row])
            self._rewrite()
        text = {k: _fmt(v) for k, v in row.items()}
        self.rows.append(text)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns, restval="").writerow(text)
        if self.tb is not None:
            step = int(row["step"])
            for k, v in row.items():
                if k not in ("step", "epoch", "elapsed_s"):
                    self.tb.add_scalar(f"train/{k}", v, step)

    def snapshot(self, folder: str | os.PathLike) -> None:
        """Copy the rows so far to ``folder/metrics.csv`` (the checkpoint's; call before saving it)."""
        self._rewrite(Path(folder) / self.path.name)

    def _rewrite(self, path: Path | None = None) -> None:
        """Write the header and all kept rows through a temporary file (atomic)."""
        path = path or self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, restval="")
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, path)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt(v) -> str:
    """Integers as integers, floats with full precision (``repr``), so losses round-trip exactly."""
    return str(v) if isinstance(v, int) else repr(float(v))
