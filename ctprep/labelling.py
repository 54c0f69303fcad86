"""The cohort's reports read by the parser: a mentions table, a labels table, and where they disagree.

``parse_cohort`` runs :mod:`ctprep.reports` over every cohort row (CT-RATE's section columns) and
writes two Parquet tables: one row per finding mention, and one row per volume holding the
dataset's 18 labels beside the parsed ones (``parsed_<label>``). ``cohort.parquet`` itself is left
untouched on purpose: every preprocessing job reads it, so a parser change would otherwise rerun the
whole (expensive) volume preparation. ``label_agreement`` compares the two label sets.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pandas as pd

from ctprep import ctrate
from ctprep.tables import html_table

logger = logging.getLogger(__name__)

SECTION_FIELDS = ("clinical_information", "technique", "findings", "impression")
PARSED = "parsed_"


def _fields(rec: dict) -> dict:
    out = {}
    for name in SECTION_FIELDS:
        value = rec.get(name)
        out[name] = "" if value is None or (isinstance(value, float) and value != value) else str(value)
    return out


def parse_cohort(cohort_path, mentions_out, labels_out, batch_size: int = 64) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Parse every report of the cohort; write (mentions, labels) Parquet tables and return them."""
    from ctprep.reports import get_parser

    cohort = pd.read_parquet(cohort_path)
    records = cohort.to_dict("records")
    parser = get_parser()
    mentions, labels = [], []
    start = time.perf_counter()
    for rec, parsed in zip(records, parser.pipe((_fields(r) for r in records), batch_size=batch_size)):
        key = {"VolumeName": rec["VolumeName"], "split": rec["split"]}
        for i, m in enumerate(parsed.mentions):
            row = m.to_dict()
            mentions.append({**key, "mention": i, **{k: _flat(v) for k, v in row.items()}})
        labels.append({**key, **{lab: None if pd.isna(rec[lab]) else int(rec[lab]) for lab in ctrate.LABELS if lab in rec},
                       **{PARSED + lab: int(parsed.labels[lab]) for lab in ctrate.LABELS}})
    seconds = time.perf_counter() - start
    mentions_df = pd.DataFrame(mentions)
    labels_df = pd.DataFrame(labels, columns=["VolumeName", "split", *ctrate.LABELS, *(PARSED + l for l in ctrate.LABELS)])
    present = [lab for lab in ctrate.LABELS if lab in labels_df.columns]
    labels_df[present] = labels_df[present].astype("Int8")  # the dataset's blank cells stay missing (not 0)
    mentions_df.to_parquet(mentions_out, index=False)
    labels_df.to_parquet(labels_out, index=False)
    logger.info("parsed %d reports in %.1f s (%.0f/s): %d mentions", len(records), seconds,
                len(records) / max(seconds, 1e-9), len(mentions_df))
    return mentions_df, labels_df


def _flat(value):
    """Parquet-friendly cell: nested lists/dicts become JSON strings."""
    return json.dumps(value) if isinstance(value, (list, dict, tuple)) else value


def label_agreement(labels: pd.DataFrame, mentions: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-label agreement table, one row per disagreeing volume x label with the parser's evidence).

    Volumes whose dataset label is blank (unknown) are left out of that label's row (``n`` counts the rest).
    """
    rows, diffs = [], []
    have = [lab for lab in ctrate.LABELS if lab in labels.columns]
    for lab in have:
        known = labels[lab].notna()
        sub = labels[known]
        truth, pred = sub[lab].astype(int), sub[PARSED + lab].astype(int)
        tp = int(((truth == 1) & (pred == 1)).sum())
        fp = int(((truth == 0) & (pred == 1)).sum())
        fn = int(((truth == 1) & (pred == 0)).sum())
        n = len(sub)
        rows.append({"label": lab, "n": n, "unknown": int((~known).sum()), "dataset_positive": int(truth.sum()),
                     "parsed_positive": int(pred.sum()),
                     "agreement": (n - fp - fn) / n if n else float("nan"), "false_positive": fp, "false_negative": fn,
                     "f1": 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else float("nan")})
        for vol in sub.loc[truth != pred, "VolumeName"]:
            evidence = ""
            if mentions is not None and len(mentions):
                hit = mentions[(mentions["VolumeName"] == vol) & (mentions["label"] == lab)]
                evidence = " | ".join(f"{r.status}: {r.text}" for r in hit.itertuples())
            diffs.append({"VolumeName": vol, "label": lab, "dataset": int(labels.loc[labels.VolumeName == vol, lab].iloc[0]),
                          "parsed": int(labels.loc[labels.VolumeName == vol, PARSED + lab].iloc[0]), "evidence": evidence})
    return pd.DataFrame(rows), pd.DataFrame(diffs, columns=["VolumeName", "label", "dataset", "parsed", "evidence"])


def write_agreement(labels_path, mentions_path, out_tsv, out_md, out_csv, out_html=None) -> pd.DataFrame:
    """The agreement table (TSV, and HTML for the report), the disagreements (CSV) and a short Markdown report."""
    labels = pd.read_parquet(labels_path)
    mentions = pd.read_parquet(mentions_path)
    table, diffs = label_agreement(labels, mentions)
    table.to_csv(out_tsv, sep="\t", index=False, float_format="%.4f")
    diffs.to_csv(out_csv, index=False)
    lines = [f"# Dataset labels vs parsed labels ({len(labels)} volumes)", "",
             "| label | dataset + | parsed + | agreement | FP | FN | F1 |", "|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.label} | {r.dataset_positive} | {r.parsed_positive} | {r.agreement:.3f} | "
                     f"{r.false_positive} | {r.false_negative} | {r.f1:.3f} |")
    lines += ["", f"## Disagreements ({len(diffs)})", ""]
    lines += [f"- {d.VolumeName}: {d.label}: dataset {d.dataset}, parsed {d.parsed}"
              + (f" ({d.evidence})" if d.evidence else "") for d in diffs.itertuples()] or ["none"]
    Path(out_md).write_text("\n".join(lines) + "\n")
    if out_html:
        Path(out_html).write_text(html_table(
            table, "Dataset labels vs parsed labels", f"n = {len(labels)} volumes ({len(diffs)} label disagreements, "
            f"listed in {Path(out_csv).name}); unknown: blank dataset labels, left out of each label's counts."))
    logger.info("label agreement: %d disagreements over %d volumes", len(diffs), len(labels))
    return table


def write_labeller_eval(jsonl_path, out_tsv, out_json, out_html=None) -> dict:
    """Score the labeller on radiologist-labelled reports: whole file, and its dev / held-out hash parts.

    The held-out part (``ctprep.reports.evaluate.split_of``) was kept aside while the rules were
    written; its score is the honest estimate of how the labeller does on unseen reports.
    """
    from ctprep.reports.evaluate import evaluate, read_labelled, split_of

    rows = read_labelled(jsonl_path)
    parts = {"all": None, "dev": [r["id"] for r in rows if split_of(r["id"]) == "dev"],
             "heldout": [r["id"] for r in rows if split_of(r["id"]) == "heldout"]}
    results = {name: evaluate(jsonl_path, ids) for name, ids in parts.items()}
    table = []
    for lab in ctrate.LABELS:
        row = {"label": lab}
        for name, res in results.items():
            m = res["per_label"][lab]
            ci = m["f1_ci"] or (None, None)
            row.update({f"{name}_precision": m["precision"], f"{name}_recall": m["recall"], f"{name}_f1": m["f1"],
                        f"{name}_f1_ci_low": ci[0], f"{name}_f1_ci_high": ci[1], f"{name}_support": m["support"],
                        f"{name}_n": m["n"]})
        table.append(row)
    for avg in ("micro_f1", "macro_f1"):
        row = {"label": avg.split("_")[0]}
        for n, r in results.items():
            ci = r[f"{avg}_ci"] or (None, None)
            row.update({f"{n}_f1": r[avg], f"{n}_f1_ci_low": ci[0], f"{n}_f1_ci_high": ci[1],
                        f"{n}_n_reports": r["n_reports"]})
        table.append(row)
    pd.DataFrame(table).to_csv(out_tsv, sep="\t", index=False, float_format="%.4f")
    if out_html:
        r = results
        Path(out_html).write_text(html_table(
            pd.DataFrame(table), "The labeller against radiologists' labels",
            f"{Path(jsonl_path).name}: n = {r['all']['n_reports']} reports (dev {r['dev']['n_reports']}, held out "
            f"{r['heldout']['n_reports']}, kept aside while the rules were written); F1 with bootstrap 95% CIs over "
            "reports; support: positive reports per label; n: reports whose labels give it."))
    summary = {name: {"n_reports": r["n_reports"], "micro_f1": r["micro_f1"], "micro_f1_ci": r["micro_f1_ci"],
                      "macro_f1": r["macro_f1"], "macro_f1_ci": r["macro_f1_ci"], "ci": r["ci"]}
               for name, r in results.items()}
    Path(out_json).write_text(json.dumps({"source": str(jsonl_path), **summary, "per_label": results["all"]["per_label"]},
                                         indent=2) + "\n")
    logger.info("labeller: macro-F1 all %.3f, dev %.3f, held-out %.3f", results["all"]["macro_f1"],
                results["dev"]["macro_f1"], results["heldout"]["macro_f1"])
    return summary
