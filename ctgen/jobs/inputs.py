"""Reading the files users hand to ``ctgen sample``: CSV or JSON-lines rows with their line numbers."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ctprep.errors import UserError, read_text


def row_id(row: dict, index: int, where: str | None = None) -> str:
    """A row's id: its ``id`` or ``VolumeName``, else its place among the rows (0 for the first, in every format).

    ``where`` (``file:line``): the id names the row's output files, so one that would name a path outside the output
    folder ("site1/p3", "../../x") is a :class:`UserError` naming it and the line.
    """
    from ctgen.export.samples import check_file_id

    pid = str(row.get("id") or row.get("VolumeName") or index)
    if where is not None:
        try:
            check_file_id(pid)
        except ValueError as err:
            raise UserError(f"{where}: {err}") from None
    return pid


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a CSV (line 1: the header) or a JSON-lines file; a CSV row's number is the line it
    starts on (a quoted report over several lines moved every later one's)."""
    text = read_text(path)
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        reader.fieldnames  # noqa: B018 - reads the header, so that line_num counts from it
        rows, last = [], reader.line_num
        for row in reader:
            rows.append((last + 1, row))
            last = reader.line_num
        return rows
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
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
