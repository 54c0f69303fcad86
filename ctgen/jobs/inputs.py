"""Reading the files users hand to ``ctgen sample``: CSV or JSON-lines rows with their line numbers."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

from ctprep.errors import UserError, read_text

log = logging.getLogger(__name__)


def row_id(row: dict, index: int, where: str | None = None) -> str:
    """A row's id: its ``id`` or ``VolumeName``, else its place among the rows (0 for the first, in every format).

    ``where`` (``file:line``): the id names the row's output files, so one that would name a path outside the output
    folder ("site1/p3", "../../x") is a :class:`UserError` naming it and the line.
    """
    from ctgen.export.samples import check_file_id

    given = (row.get(k) for k in ("id", "VolumeName"))  # an id 0 is an id: only None and blanks are not
    pid = next((str(v).strip() for v in given if v is not None and str(v).strip()), str(index))
    if where is not None:
        try:
            check_file_id(pid)
        except ValueError as err:
            raise UserError(f"{where}: {err}") from None
    return pid


def check_unique_ids(ids: list[str], path: Path) -> None:
    """Two rows with one id would write one output and pair their volumes with one report: named."""
    seen: set[str] = set()
    for pid in ids:
        if pid in seen:
            raise UserError(f"{path}: the id {pid!r} is given to more than one row; ids name the output files")
        seen.add(pid)


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a CSV (line 1: the header) or a JSON-lines file; a CSV row's number is the line it
    starts on (a quoted report over several lines moved every later one's)."""
    text = read_text(path)
    if path.suffix == ".csv":
        # strict: a quote left open ran on to the end of the file, taking every later row into one prompt, unsaid
        reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
        rows, last = [], 0
        try:
            header = reader.fieldnames or []  # reads the header, so that line_num counts from it
            last = reader.line_num
            for row in reader:
                # DictReader keeps extra cells in a list under None, and gives a missing cell None
                extra, missing = len(row.get(None) or ()), sum(v is None for k, v in row.items() if k is not None)
                cells = len(header) + extra - missing
                if cells != len(header):  # an unquoted comma put the prompt's tail under no column, unsaid
                    raise UserError(f"{path}:{last + 1}: {cells} cells, the header has {len(header)} (quote a prompt "
                                    "that holds commas)")
                rows.append((last + 1, row))
                last = reader.line_num
        except csv.Error as err:
            raise UserError(f"{path}:{last + 1}: not CSV ({err}; a quote left open?)") from None
        return rows
    if path.suffix == ".json" and text.lstrip().startswith("["):  # a whole-file JSON list, as a VLM3D prompts.json
        try:
            json.loads(text)
        except json.JSONDecodeError:
            pass  # not one JSON value: read line by line, which names the line
        else:
            raise UserError(f"{path} is a JSON list, where one JSON object per line is expected (a VLM3D "
                            "prompts.json is read by --vlm3d)")
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


def given_text(report: str | dict) -> str:
    """A report as one text, for a record of what was given: a free text as it is, sections named."""
    if not isinstance(report, dict):
        return str(report)
    return " ".join(f"{k.capitalize()}: {report[k]}" for k in ("findings", "impression")
                    if isinstance(report.get(k), str) and report[k].strip())


def render_structured(report: str | dict, rendering: dict | None = None, pid: str | None = None) -> str:
    """``report`` (a free text, or a dict with ``findings``/``impression``) parsed and rendered as a structured prompt
    (:func:`ctprep.prompts.report_prompt`), with a WARNING naming ``pid`` where a text with content comes out as the
    no-findings prompt although the parser found no finding in it at all, present or absent: an abnormality outside
    its vocabulary ("massive pulmonary embolism") or a report in another language is then sampled as a normal chest.
    A report that states findings absent ("No pleural effusion.") is understood, and says nothing."""
    from ctprep.prompts import STRUCTURED, report_prompt
    from ctprep.reports.structured import NO_FINDINGS

    how = dict(rendering or {})
    rendered = report_prompt(report, STRUCTURED, **how)
    sections = [report] if not isinstance(report, dict) else [
        report[k] for k in ("findings", "impression") if isinstance(report.get(k), str) and report[k].strip()]
    if rendered != NO_FINDINGS or all(t.strip().lower().rstrip(".! ") in ("", NO_FINDINGS) for t in sections):
        return rendered  # findings found, or nothing but the no-findings statement itself given
    if report_prompt(report, STRUCTURED, **{**how, "negated": "state"}) == NO_FINDINGS:  # no negated finding either
        log.warning("prompt %s: the report parser found none of the findings it knows (present or absent) in %r: the "
                    "structured model samples it as %r, a normal chest (a finding outside the parser's vocabulary, or "
                    "a report not in English, is not seen)", pid if pid is not None else "",
                    given_text(report).strip()[:100], NO_FINDINGS)
    return rendered
