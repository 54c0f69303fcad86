"""``ctprep parse-report``: one report from stdin (text or JSON) -> sections, mentions, labels, prompts.

``--jsonl IN OUT`` parses a whole file, one JSON object per line each way, keeping each input's ``id``. A row whose
report text is empty is written with ``"error"``, empty sections, no mentions, no labels (each unknown, as a
reference row's missing label is to ``evaluate-parser``) and null prompts, and named in a warning; a line that is not
a JSON object or has no report field, or a file with no report text at all, stops the run.
Prompts are the structured prompt plus every template under ``prompts.templates`` of the config
(``--config FILE``, default ``./config.yaml`` if present), rendered with ``ctprep.prompts.render``;
a template needing a field the input lacks (age, sex, impression, ...) gives null.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

from ctprep.errors import UserError, read_text
from ctprep.prompts import render
from ctprep.reports.pipeline import ParsedReport, get_parser
from ctprep.reports.sections import SECTIONS, report_fields, split_sections
from ctprep.reports.structured import structured_prompt

logger = logging.getLogger(__name__)

#: Input keys copied into the prompt-template row besides the sections.
META_FIELDS = ("age", "sex")


def load_templates(path: str | None) -> tuple[dict[str, str], int]:
    """(templates, max_chars) from the config's ``prompts`` block; none without a config."""
    candidate = Path(path) if path else Path("config.yaml")
    if not candidate.is_file():
        if path:
            raise SystemExit(f"config {path} not found")
        return {}, 0
    cfg = yaml.safe_load(candidate.read_text()) or {}
    prompts = cfg.get("prompts") or {}
    return dict(prompts.get("templates") or {}), int(prompts.get("max_chars") or 0)


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


def is_empty(report: str | dict) -> bool:
    """True if the parser would read ``report`` as an empty report (all labels 0, "no acute findings")."""
    sections = split_sections(report)
    return not any(sections[name] for name in SECTIONS)


def check_report(report: str | dict, where: str) -> None:
    """Refuse, in one line naming ``where``, an input the parser would read as an empty report: its labels would all
    be 0 and its prompt "no acute findings", a normal report where the input was a mistake (a misnamed field, an
    empty pipe)."""
    check_fields(report, where)
    if is_empty(report):
        raise UserError(f"{where}: the report text is empty")


#: What an empty row of ``--jsonl`` says in its ``error``.
EMPTY_REPORT = "the report text is empty"


def empty_json(report: dict, templates: dict[str, str]) -> dict:
    """The output object for an input row with no report text: the shape of ``result_json``'s, with ``error``, no
    labels and null prompts, so that the rows stay one for one with the input and nothing reads it as a normal scan."""
    out = {"id": report["id"]} if "id" in report else {}
    out.update({"error": EMPTY_REPORT, "sections": dict.fromkeys(SECTIONS, ""), "mentions": [], "labels": {},
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


def _iter_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line; a line that is not a JSON object or has no report field stops
    the run."""
    # split at "\n" only: a JSON string may hold U+2028, which splitlines() would cut
    for n, line in enumerate(read_text(path).split("\n"), 1):
        if line.strip():
            obj = _read_input(line)
            if not isinstance(obj, dict):
                raise SystemExit(f"{path}:{n}: not a JSON object")
            check_fields(obj, f"{path}:{n}")
            yield n, obj


def parse_report_main(argv: list[str] | None = None) -> int:
    """CLI entry: ``parse-report [--config FILE] [--jsonl IN OUT]``; prints JSON (stdin mode)."""
    ap = argparse.ArgumentParser(prog="ctprep parse-report", description=__doc__)
    ap.add_argument("--config", help="config YAML with prompts.templates (default: ./config.yaml if present)")
    ap.add_argument("--jsonl", nargs=2, metavar=("IN", "OUT"), help="parse a JSON-lines file into another")
    args = ap.parse_args(argv)
    templates, max_chars = load_templates(args.config)
    parser = get_parser()
    if args.jsonl:
        src, dst = args.jsonl
        rows = list(_iter_jsonl(src))
        empty = [n for n, report in rows if is_empty(report)]
        if rows and len(empty) == len(rows):
            raise UserError(f"{src}:{empty[0]}: {EMPTY_REPORT}, as is every row's of the file")
        if empty:
            more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
            logger.warning("%s: %d report(s) with empty text, written with \"error\" and no labels: %s%s", src,
                           len(empty), ", ".join(f"{src}:{n}" for n in empty[:5]), more)
        skip = set(empty)
        reports = [report for n, report in rows if n not in skip]
        parsed = iter(parser.pipe(reports))
        with open(dst, "w") as out:
            for n, report in rows:
                obj = empty_json(report, templates) if n in skip else result_json(report, next(parsed), templates,
                                                                                    max_chars)
                out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        logger.info("parsed %d reports from %s into %s", len(rows), src, dst)
        return 0
    report = _read_input(_read_stdin())
    check_report(report, "stdin")
    json.dump(result_json(report, parser.parse(report), templates, max_chars), sys.stdout, ensure_ascii=False, indent=1)
    sys.stdout.write("\n")
    return 0
