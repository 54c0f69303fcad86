"""Score the labeller against radiologist labels: per-label precision/recall/F1, micro and macro F1.

Every F1 comes with its bootstrap 95% CI over reports (``ctprep.stats``): 150 reports leave a macro-F1
of 0.96 uncertain by about +-0.02, and a label with a dozen positives by far more.

The reference file is JSON lines with ``id``, the report (``findings``/``impression`` or ``text``) and
``labels`` (the 18 CT-RATE names, 0/1; a name left out is unknown for that report, and the report is left out of that
label's counts), like ``reports_dev.jsonl``. ``split_of`` assigns each id to
``dev`` (~2/3) or ``heldout`` (~1/3) by a stable hash, so rule development can keep a part aside.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ctprep.ctrate import LABELS
from ctprep.errors import UserError, read_text
from ctprep.reports.pipeline import get_parser
from ctprep.stats import bootstrap_ci

logger = logging.getLogger(__name__)


def split_of(report_id: str) -> str:
    """``heldout`` for ~1/3 of ids (SHA-1 of the id mod 3 == 0), else ``dev``; stable across runs and machines."""
    return "heldout" if int(hashlib.sha1(str(report_id).encode()).hexdigest(), 16) % 3 == 0 else "dev"


def _report_input(row: dict) -> dict | str:
    """What the parser reads from a reference row: the split sections if present, else the text."""
    if row.get("findings") or row.get("impression"):
        return {"findings": row.get("findings") or "", "impression": row.get("impression") or "",
                "text": row.get("text") or ""}
    return row.get("text") or ""


def _f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else (1.0 if tp + fn == 0 else 0.0)
    r = tp / (tp + fn) if tp + fn else 1.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def _counts(pred: np.ndarray, ref: np.ndarray, known: np.ndarray | None = None) -> np.ndarray:
    """(L, 3) true positives, false positives, false negatives per label of (N, L) 0/1 arrays, over the reports whose
    reference ``known`` that label (all, without it)."""
    if known is not None:
        pred, ref = pred & known, ref & known
    return np.stack([(pred & ref).sum(0), (pred & ~ref).sum(0), (ref & ~pred).sum(0)], axis=1)


def _macro_micro(counts: np.ndarray) -> tuple[float, float]:
    """(macro-F1, micro-F1). The macro averages only labels with positives in the reference: a label without
    any scores F1 1.0 when nothing is predicted and 0.0 on a single false positive, which says nothing about
    recall and would pull the mean towards either end; NaN when no label has a positive."""
    supported = [_f1(*c)[2] for c in counts if c[0] + c[2] > 0]
    return (float(np.mean(supported)) if supported else float("nan")), _f1(*counts.sum(0))[2]


def score(pairs: Iterable[tuple[dict[str, int], dict[str, int]]], n_boot: int = 1000, seed: int = 0) -> dict:
    """Metrics from (predicted, reference) label dicts, each F1 with its bootstrap 95% CI over reports.

    A label the reference row does not give is unknown for that report, which is left out of that label's counts
    (``n`` per label), not scored as 0: a row labelled only {"Cardiomegaly": 1} made every effusion it states a false
    positive."""
    rows = [([int(pred.get(x, 0)) for x in LABELS], [int(ref.get(x, -1)) for x in LABELS]) for pred, ref in pairs]
    pred = np.array([p for p, _ in rows], dtype=bool).reshape(-1, len(LABELS))
    given = np.array([r for _, r in rows], dtype=np.int8).reshape(-1, len(LABELS))
    known, ref = given >= 0, given == 1
    n = len(rows)
    counts = _counts(pred, ref, known)

    def ci(statistic):
        interval, _ = bootstrap_ci(lambda idx: statistic(_counts(pred[idx], ref[idx], known[idx])), n, n_boot=n_boot,
                                   seed=seed)
        return list(interval) if interval else None

    per_label = {}
    for j, label in enumerate(LABELS):
        tp, fp, fn = (int(c) for c in counts[j])
        p, r, f = _f1(tp, fp, fn)
        per_label[label] = {"precision": p, "recall": r, "f1": f, "f1_ci": ci(lambda c, j=j: _f1(*c[j])[2]),
                            "support": tp + fn, "n": int(known[:, j].sum()), "tp": tp, "fp": fp, "fn": fn}
    unknown = {label: n - v["n"] for label, v in per_label.items() if v["n"] < n}
    if unknown:
        logger.warning("reference rows without some labels, left out of those labels' counts: %s",
                       ", ".join(f"{k} {v} of {n}" for k, v in unknown.items()))
    macro, micro = _macro_micro(counts)
    return {"n_reports": n, "per_label": per_label, "micro_f1": micro, "micro_f1_ci": ci(lambda c: _macro_micro(c)[1]),
            "macro_f1": macro, "macro_f1_ci": ci(lambda c: _macro_micro(c)[0]),
            "macro_labels": sum(v["support"] > 0 for v in per_label.values()),
            "ci": f"bootstrap 95% over the {n} reports, {n_boot} resamples"}


def read_labelled(jsonl_path: str | Path) -> list[dict]:
    """The reference rows, each checked: a JSON object with an ``id``, the report, and ``labels`` naming CT-RATE
    labels with 0/1 (a misspelt label counted as absent and changed the F1 without a word); named by line."""
    rows = []
    for n, line in enumerate(read_text(jsonl_path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{jsonl_path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not valid JSON: {err}") from None
        if not isinstance(row, dict) or "id" not in row or not isinstance(row.get("labels"), dict):
            raise UserError(f"{where}: expected an object with an id, the report and its labels")
        unknown = sorted(set(row["labels"]) - set(LABELS))
        if unknown:
            raise UserError(f"{where}: not CT-RATE labels: {unknown}")
        if any(v not in (0, 1) for v in row["labels"].values()):
            raise UserError(f"{where}: labels are 0 or 1")
        rows.append(row)
    if not rows:
        raise UserError(f"{jsonl_path}: no labelled reports")
    return rows


def evaluate(jsonl_path: str | Path, ids: Iterable[str] | None = None) -> dict:
    """Score the parser's labels on the reference JSONL (only rows whose id is in ``ids``, if given)."""
    keep = None if ids is None else set(ids)
    rows = [r for r in read_labelled(jsonl_path) if keep is None or r["id"] in keep]
    if not rows:  # an empty split scored a perfect 1.000 and passed any --min-macro-f1
        raise UserError(f"{jsonl_path}: no labelled reports in the chosen split")
    parsed = get_parser().pipe(_report_input(r) for r in rows)
    result = score((p.labels, r["labels"]) for p, r in zip(parsed, rows))
    if not result["macro_labels"]:
        raise UserError(f"{jsonl_path}: no label is positive in the {len(rows)} reference reports: F1 is undefined")
    logger.info("evaluated %d reports: macro-F1 %.3f %s over the %d labels with positives, micro-F1 %.3f %s",
                result["n_reports"], result["macro_f1"], _interval(result["macro_f1_ci"]), result["macro_labels"],
                result["micro_f1"], _interval(result["micro_f1_ci"]))
    return result


def _interval(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "[no CI]"


def table_rows(result: dict) -> list[dict]:
    """One row per label plus micro/macro rows, for TSV output (F1 with its CI's bounds)."""
    def bounds(ci):
        return {"f1_ci_low": ci[0] if ci else None, "f1_ci_high": ci[1] if ci else None}

    rows = [{"label": k, **{m: v[m] for m in ("precision", "recall", "f1")}, **bounds(v["f1_ci"]),
             **{m: v[m] for m in ("support", "n", "tp", "fp", "fn")}} for k, v in result["per_label"].items()]
    rows.append({"label": "micro", "f1": result["micro_f1"], **bounds(result["micro_f1_ci"]),
                 "support": sum(v["support"] for v in result["per_label"].values())})
    rows.append({"label": "macro", "f1": result["macro_f1"], **bounds(result["macro_f1_ci"])})
    return rows


def evaluate_main(argv: list[str] | None = None) -> int:
    """CLI: ``evaluate JSONL [--split all|dev|heldout] [--out table.tsv|table.json] [--min-macro-f1 X]``."""
    ap = argparse.ArgumentParser(prog="ctprep evaluate-parser", description=__doc__)
    ap.add_argument("jsonl", help="reference reports with radiologist labels (JSON lines)")
    ap.add_argument("--split", default="all", choices=["all", "dev", "heldout"], help="which hash split to score")
    ap.add_argument("--out", help="write the table here (.json: full result; otherwise TSV); default: stdout TSV")
    ap.add_argument("--min-macro-f1", type=float, default=0.0, help="exit 1 if macro-F1 is below this (0 to 1)")
    args = ap.parse_args(argv)
    if not 0 <= args.min_macro_f1 <= 1:  # 5 could never be met: every run failed
        ap.error(f"--min-macro-f1 must be from 0 to 1, not {args.min_macro_f1}")
    ids = None
    if args.split != "all":
        ids = [r["id"] for r in read_labelled(args.jsonl)]
        ids = [i for i in ids if split_of(i) == args.split]
    result = evaluate(args.jsonl, ids)
    result["split"] = args.split
    fields = ["label", "precision", "recall", "f1", "f1_ci_low", "f1_ci_high", "support", "n", "tp", "fp", "fn"]
    if args.out and args.out.endswith(".json"):
        Path(args.out).write_text(json.dumps(result, indent=2))
    else:
        fh = open(args.out, "w", newline="") if args.out else sys.stdout  # noqa: SIM115 - closed below
        writer = csv.DictWriter(fh, fields, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        for row in table_rows(result):
            writer.writerow({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in row.items()})
        if args.out:
            fh.close()
    if result["macro_f1"] < args.min_macro_f1:  # the status alone said nothing of why
        logger.error("macro-F1 %.3f is below --min-macro-f1 %.3f", result["macro_f1"], args.min_macro_f1)
        return 1
    return 0
