"""``ctprep parse-report``: one report from stdin (text or JSON) -> sections, mentions, labels, prompts.

``--jsonl IN OUT`` parses a whole file, one JSON object per line each way, keeping each input's ``id``. A row whose
report text is empty, a line that is not a JSON object, or a row whose report field is not text (``{"findings": 5}``)
is written with ``"error"`` saying which, empty sections, no mentions, no labels (each unknown, as a reference row's
missing label is to ``evaluate-parser``) and null prompts, named in a warning and counted in the last log line; a row
with no report field, or a file without a single row to parse, stops the run.
Prompts are the structured prompt plus every template under ``prompts.templates`` of the config
(``--config FILE``, default ``$CTGEN_CONFIG`` or ``./config.yaml`` if present, its ``prompts`` section checked as the
other commands check theirs), rendered with ``ctprep.prompts.render``; a template needing a field the input lacks
(age, sex, impression, ...) gives null.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator

from ctprep.cli import load_config
from ctprep.errors import UserError, read_text
from ctprep.prompts import render, template_fields
from ctprep.reports.pipeline import ParsedReport, get_parser
from ctprep.reports.sections import SECTIONS, report_fields, split_sections
from ctprep.reports.structured import structured_prompt

logger = logging.getLogger(__name__)

#: Input keys copied into the prompt-template row besides the sections.
META_FIELDS = ("age", "sex")


def load_templates(path: str | None) -> tuple[dict[str, str], int]:
    """(templates, max_chars) from the config's ``prompts`` block; none without a config.

    Loaded and checked against the workflow's schema as the other commands' sections are: a config that is a list,
    ``prompts: [1]`` or a list of templates failed with an AttributeError, ``max_chars: abc`` without naming the key.
    """
    prompts = (load_config(path, required=False, sections=("prompts",)) or {}).get("prompts") or {}
    templates = dict(prompts.get("templates") or {})
    for name, template in templates.items():  # an unbalanced "{nope" said "expected '}'" and no more
        try:
            template_fields(template)
        except ValueError as err:
            raise UserError(f"config prompts.templates.{name}: {err}") from None
    return templates, int(prompts.get("max_chars") or 0)


def _read_input(raw: str) -> str | dict:
    """A JSON object if the text is one, else the plain report text."""
    text = raw.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
            if isinstance(obj, dict):
                return obj
        except json.JSONDecodeError:
            logger.warning("input starts with '{' but is not JSON; parsing it as report text")
    return raw


def check_fields(report: str | dict, where: str) -> None:
    """Refuse, in one line naming ``where``, a JSON input with no report field (a misnamed field)."""
    if isinstance(report, dict) and not report_fields(report):
        raise UserError(f"{where}: no report field among the keys {sorted(map(str, report))[:8]}; expected "
                        f"{', '.join(SECTIONS)}, text or a CT-RATE column such as Findings_EN (in any case)")


def non_text_field(report: str | dict) -> str:
    """What is wrong with a report field of ``report`` that holds neither text nor null, "" where none does: the parser
    read ``{"findings": {"a": 1}}`` or ``{"findings": 5}`` as the text "{'a': 1}" or "5"."""
    if isinstance(report, dict):
        for key in report_fields(report):
            if report[key] is not None and not isinstance(report[key], str):
                return f"field {key!r} is not text but a JSON {_JSON_TYPES.get(type(report[key]), 'value')}"
    return ""


_JSON_TYPES = {dict: "object", list: "array", int: "number", float: "number", bool: "boolean"}


def is_empty(report: str | dict) -> bool:
    """True if the parser would read ``report`` as an empty report (all labels 0, "no acute findings")."""
    sections = split_sections(report)
    return not any(sections[name] for name in SECTIONS)


def check_report(report: str | dict, where: str) -> None:
    """Refuse, in one line naming ``where``, an input the parser would read as an empty report: its labels would all
    be 0 and its prompt "no acute findings", a normal report where the input was a mistake (a misnamed field, an
    empty pipe)."""
    check_fields(report, where)
    wrong = non_text_field(report)
    if wrong:
        raise UserError(f"{where}: {wrong}")
    if is_empty(report):
        raise UserError(f"{where}: the report text is empty")


#: What an empty row of ``--jsonl`` says in its ``error``.
EMPTY_REPORT = "the report text is empty"
#: What a line of ``--jsonl`` that is not a JSON object says in its ``error``.
NOT_JSON = "not a JSON object"


def empty_json(report: dict, templates: dict[str, str], error: str = EMPTY_REPORT) -> dict:
    """The output object for an input row with no report text to parse (``error`` says why): the shape of
    ``result_json``'s, with ``error``, no labels and null prompts, so that the rows stay one for one with the input and
    nothing reads it as a normal scan."""
    out = {"id": report["id"]} if "id" in report else {}
    out.update({"error": error, "sections": dict.fromkeys(SECTIONS, ""), "mentions": [], "labels": {},
                "prompts": dict.fromkeys(["structured", *templates])})
    return out


def result_json(report: str | dict, parsed: ParsedReport, templates: dict[str, str], max_chars: int = 0) -> dict:
    """The output object for one input."""
    row = dict(parsed.sections)
    meta = report if isinstance(report, dict) else {}
    row.update({k: meta.get(k) for k in META_FIELDS})
    prompts: dict[str, str | None] = {"structured": structured_prompt(parsed.mentions)}
    for name, template in templates.items():
        try:
            prompts[name] = render(template, row, max_chars)
        except KeyError:
            prompts[name] = None
    out = {"id": meta["id"]} if "id" in meta else {}
    out.update(parsed.to_json())
    out["prompts"] = prompts
    return out


def _read_stdin() -> str:
    """Stdin as UTF-8, or a one-line error as ``--jsonl`` gives for its file: the stream's own decoding replaced
    bytes that are not UTF-8 with U+FFFD and parsed the rest without a word."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # already text (a test's StringIO)
        return sys.stdin.read()
    data = stream.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"stdin is not UTF-8 text ({err.reason} at byte {err.start})") from None


def _iter_jsonl(path: str) -> Iterator[tuple[int, dict, str]]:
    """(line number, object, error) of each non-blank line, the error "" where the row is to be parsed; a line that
    is not a JSON object is the object {} and its error, as one with empty or non-text report fields (one such line
    stopped the whole run); an object with no report field at all stops the run (a misnamed field, as a rule in every
    row)."""
    # split at "\n" only: a JSON string may hold U+2028, which splitlines() would cut
    for n, line in enumerate(read_text(path).split("\n"), 1):
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                obj = None
            if not isinstance(obj, dict):
                yield n, {}, NOT_JSON
                continue
            check_fields(obj, f"{path}:{n}")
            yield n, obj, non_text_field(obj) or (EMPTY_REPORT if is_empty(obj) else "")


def parse_report_main(argv: list[str] | None = None) -> int:
    """CLI entry: ``parse-report [--config FILE] [--jsonl IN OUT]``; prints JSON (stdin mode)."""
    ap = argparse.ArgumentParser(prog="ctprep parse-report", description=__doc__)
    ap.add_argument("--config", help="config YAML with prompts.templates (default: $CTGEN_CONFIG or ./config.yaml if present)")
    ap.add_argument("--jsonl", nargs=2, metavar=("IN", "OUT"), help="parse a JSON-lines file into another")
    args = ap.parse_args(argv)
    templates, max_chars = load_templates(args.config)
    parser = get_parser()
    if args.jsonl:
        src, dst = args.jsonl
        rows = list(_iter_jsonl(src))
        errors: dict[str, list[int]] = {}  # error -> its rows' line numbers
        for n, _, error in rows:
            if error:
                errors.setdefault(error, []).append(n)
        n_errors = sum(map(len, errors.values()))
        if rows and n_errors == len(rows):  # a mistake about the whole file (not JSON lines, no text), not N rows
            error, lines = next(iter(errors.items()))
            raise UserError(f"{src}:{lines[0]}: {error}, and no row of the file has a report to parse")
        for error, lines in errors.items():
            more = f" and {len(lines) - 5} more" if len(lines) > 5 else ""
            logger.warning("%s: %d row(s) written with \"error\" (%s) and no labels: %s%s", src, len(lines),
                           error, ", ".join(f"{src}:{n}" for n in lines[:5]), more)
        parsed = iter(parser.pipe([report for _, report, error in rows if not error]))
        with open(dst, "w") as out:
            for _, report, error in rows:
                obj = (empty_json(report, templates, error) if error
                       else result_json(report, next(parsed), templates, max_chars))
                out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        logger.info("parsed %d reports from %s into %s%s", len(rows) - n_errors, src, dst,
                    f"; {n_errors} row(s) written with an error instead (see the warnings)" if n_errors else "")
        return 0
    report = _read_input(_read_stdin())
    check_report(report, "stdin")
    json.dump(result_json(report, parser.parse(report), templates, max_chars), sys.stdout, ensure_ascii=False, indent=1)
    sys.stdout.write("\n")
    return 0
