"""Reading the files users hand to ``ctgen sample``: CSV or JSON-lines rows with their line numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ctprep.errors import UserError


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a CSV (line 1: the header) or a JSON-lines file."""
    if path.suffix == ".csv":
        with open(path, newline="") as fh:
            return [(n, row) for n, row in enumerate(csv.DictReader(fh), 2)]
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{n}: not JSON ({err.msg}); one JSON object per line is expected") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{n}: a JSON object is expected, not {type(row).__name__}")
        rows.append((n, row))
    return rows
