"""The rejects table: every input that could not be used, with the stage and the reason.

Bad input never stops the cohort (unless ``strict``); it is named here and the rest goes on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

logger = logging.getLogger(__name__)

COLUMNS = ["VolumeName", "split", "stage", "reason"]
#: Kept where a stage gives them: ``layout``, the CT-RATE tree (fixed, original) of the rejected copy.
OPTIONAL = ["layout"]


class RejectedInput(ValueError):
    """Raised in strict mode: the message names the rejects (a user's data, so a one-line error on the command line)."""


def frame(rows: list[dict]) -> pd.DataFrame:
    """A rejects table from dicts with (a subset of) :data:`COLUMNS`, and the :data:`OPTIONAL` ones any row has."""
    columns = COLUMNS + [c for c in OPTIONAL if any(r.get(c) is not None for r in rows)]
    df = pd.DataFrame(rows, columns=columns)
    return df.astype({c: "string" for c in columns})


def check(rejects: pd.DataFrame, strict: bool, what: str) -> None:
    """Log the rejects; in strict mode raise with all of them named."""
    for row in rejects.itertuples(index=False):
        logger.warning("reject %s (%s): %s", row.VolumeName, row.stage, row.reason)
    if strict and len(rejects):
        rows = list(rejects.itertuples(index=False))
        listing = "; ".join(f"{r.VolumeName}: {r.reason}" for r in rows[:5])
        more = f"; and {len(rows) - 5} more (the log lists them)" if len(rows) > 5 else ""
        raise RejectedInput(f"strict mode: {len(rows)} input(s) rejected during {what}: {listing}{more}")


def merge(paths: list[str | Path], out_csv: str | Path, out_parquet: str | Path | None = None) -> pd.DataFrame:
    """Concatenate per-stage rejects tables into the cohort's one table (CSV, and Parquet)."""
    parts = [pd.read_parquet(p) for p in paths]
    parts = [p for p in parts if len(p)]
    df = pd.concat(parts, ignore_index=True) if parts else frame([])
    df = df.sort_values(["stage", "VolumeName"], kind="stable").reset_index(drop=True)
    df.to_csv(out_csv, index=False)
    if out_parquet is not None:
        df.to_parquet(out_parquet, index=False)
    return df
