"""The report's metric tables (HTML to read, CSV to reuse) and their captions, from ``metrics.json``.

Every number of each generator family's ``metrics.json`` (and of ``families.json``, their paired
comparison) lands in exactly one table, by the first part of its name (:data:`GROUPS`), as one row:
the family, value, 95% CI, n, profile, stems hash, flag and the rest of what its record holds. Each table gets a caption snippet (reStructuredText) naming its n and its profiles,
which the report's static captions include; ``intro.rst`` puts the faithfulness figure (embedded)
and its caption at the top of the report's front page.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from ctgen.jobs.figure_list import TABLES
from ctgen.metrics.summary import n_text
from ctprep.tables import html_table

log = logging.getLogger(__name__)

#: first part of a metric's name -> its table
GROUPS = {"faithfulness": "faithfulness", "families": "families", "fid_2d": "distribution", "fd_3d": "distribution",
          "clip_score": "alignment", "image_similarity": "alignment", "retrieval": "alignment", "tstr": "tstr", "hu": "hu"}
COLUMNS = ["family", "metric", "value", "ci_low", "ci_high", "n", "profile", "stems", "flag", "details"]


def _num(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x)
    return f"{float(x):.4g}"


def metric_rows(records: list[dict]) -> pd.DataFrame:
    """metrics.json records (each with its ``family``) -> one row each, in :data:`COLUMNS`."""
    rows = []
    for r in records:
        ci = r.get("ci") or (None, None)
        details = "; ".join(f"{k}={v}" for k, v in (r.get("extra") or {}).items() if not isinstance(v, (dict, list)))
        rows.append({"family": r.get("family", ""), "metric": r["name"], "value": r.get("value"), "ci_low": ci[0],
                     "ci_high": ci[1], "n": r.get("n"), "profile": r.get("profile"), "stems": r.get("stems"),
                     "flag": r.get("flag"), "details": details})
    return pd.DataFrame(rows, columns=COLUMNS)


def group_records(metrics: Mapping[str, dict]) -> dict[str, list[dict]]:
    """{table: [records, each tagged with its family]} over :data:`GROUPS` (every table present, possibly empty);
    ``metrics``: {family: its metrics.json}."""
    out: dict[str, list[dict]] = {g: [] for g in dict.fromkeys(GROUPS.values())}
    for family, summary in metrics.items():
        for r in summary.get("metrics", []):
            head = r["name"].split(".")[0]
            if head not in GROUPS:
                raise ValueError(f"metric {r['name']!r} belongs to no table: add {head!r} to ctgen.jobs.tables.GROUPS")
            out[GROUPS[head]].append({**r, "family": family})
    return out


def caption(table: str, records: list[dict], metrics: Mapping[str, dict]) -> str:
    """The caption snippet: n and profile of the table's numbers, the flags, and what was not computed."""
    parts = []
    # n as the figures word it: "6 (2 patients)" where the CIs resample patients or reports, which they rest on
    pairs = list(dict.fromkeys((n_text(r), r.get("profile") or "-") for r in records))
    if pairs:
        shown = ", ".join(f"n = {n} (``{p}``)" for n, p in pairs[:4]) + (f" and {len(pairs) - 4} more" if len(pairs) > 4 else "")
        parts.append(f"**n and profile:** {shown}.")
        stems = sorted({r.get("stems") for r in records if r.get("stems")})
        if stems:
            parts.append(f"Scored stems (hash): {', '.join(f'``{s}``' for s in stems[:3])}.")
    flagged = sum(1 for r in records if r.get("flag"))
    if flagged:
        parts.append(f"**{flagged} of {len(records)} numbers are flagged** (see the flag column for why): "
                     "do not read them as results.")
    for family, summary in metrics.items():
        for miss in summary.get("not_computed", []):
            if GROUPS.get(miss["group"], miss["group"]) == table or miss["group"] == table:
                parts.append(f"Not computed ({family.replace('_', ' ')}): {miss['reason']}.")
    if not parts:
        parts.append("No numbers in this table.")
    return " ".join(parts) + "\n"


def _sweep_records(sweep: pd.DataFrame) -> list[dict]:
    """The sweep table's rows as records for :func:`caption` (an empty cell None, not NaN, which reads as a flag)."""
    return sweep.astype(object).where(sweep.notna(), None).to_dict("records")


def write_tables(metrics_jsons: Mapping[str, str | Path], skipped_csvs: Mapping[str, str | Path], sweep_csv,
                 families_json, outputs: Mapping[str, str], text_reliance_json: str | Path | None = None) -> None:
    """Every table of :data:`ctgen.jobs.figure_list.TABLES`. ``metrics_jsons``, ``skipped_csvs``: {family: path}
    per generator family; ``sweep_csv``: the cascade's guidance sweep (None without a cascade);
    ``families_json``: the families' comparison; ``outputs`` maps ``<name>_html``, ``_csv``, ``_caption`` to paths;
    ``text_reliance_json``: the latent flow network's text-reliance probe (None without that family)."""
    metrics = {family: json.loads(Path(p).read_text()) for family, p in metrics_jsons.items()}
    families = json.loads(Path(families_json).read_text())
    groups = group_records(metrics)
    groups["families"] = [{**r, "family": r.get("profile", "")} for r in families.get("metrics", [])]
    tables: dict[str, tuple[pd.DataFrame, str]] = {}
    for name in TABLES:
        if name in groups:
            scope = {"families": families} if name == "families" else metrics
            tables[name] = (metric_rows(groups[name]), caption(name, groups[name], scope))
    if sweep_csv:
        sweep = pd.read_csv(sweep_csv)
        tables["guidance_sweep"] = (sweep, "The cascade's volumes of the same prompts and seeds at every guidance scale. "
                                           + caption("guidance_sweep", _sweep_records(sweep), {}))
    else:
        tables["guidance_sweep"] = (pd.DataFrame(columns=["guidance_scale", "metric", "value"]),
                                    "Not computed: no cascade in models.generators.\n")
    tables["text_reliance"] = _text_reliance(text_reliance_json)
    skipped, counts = [], []
    for family, path in skipped_csvs.items():
        table = pd.read_csv(path)
        skipped.append(table.assign(family=family)[["family", *table.columns]])
        n = metrics[family].get("n", {})
        counts.append(f"{family.replace('_', ' ')}: {len(table)} volumes left out ({n.get('skipped_predictions', 0)} "
                      f"predictions and {n.get('skipped_ground_truth', 0)} ground-truth volumes), "
                      f"n = {n.get('scored')} predictions scored of {n.get('predictions')}")
    tables["skipped"] = (pd.concat(skipped, ignore_index=True), "**" + "; ".join(counts) + ".**\n")
    for name, (df, cap) in tables.items():
        df.to_csv(outputs[f"{name}_csv"], index=False)
        Path(outputs[f"{name}_html"]).write_text(html_table(df, TABLES[name][1], cap.replace("*", "").replace("``", "")))
        Path(outputs[f"{name}_caption"]).write_text(cap)
        log.info("table %s: %d rows", name, len(df))


def _text_reliance(path: str | Path | None) -> tuple[pd.DataFrame, str]:
    """The probe's rows (``ctgen.jobs.text_reliance``) and a caption that says how to read them."""
    if path is None:
        return metric_rows([]), "Not computed: no latent_flow in models.generators.\n"
    records = [{**r, "family": "latent_flow"} for r in json.loads(Path(path).read_text())]
    if not records:
        return metric_rows([]), "Not computed: the preset's data.text_probe_latents is 0.\n"
    levels = ", ".join(dict.fromkeys(r["name"].rpartition("@")[2] for r in records))  # as the probe named them
    heldout = any(r["name"].startswith("text_reliance.heldout.") for r in records)
    where = ("On the training latents and (text_reliance.heldout.*) on held-out latents of the evaluation split, never "
             "trained on: a gain on the training latents alone is what a network that memorised its training reports "
             "also shows; a held-out loss above the null's means the report does not predict an unseen patient's "
             "latent, not that the findings are missing (the faithfulness figure scores those)" if heldout
             else "On the training latents (no held-out latents: a gain may be memorisation)")
    how = (f"{where}; at t/T = {levels} (1: pure noise) with the same noise under each context: "
           "gain_vs_null and gain_vs_other are the relative loss reductions of the own report over the null context and over "
           "another report (0: the network ignores the text); velocity_shift is norm(v_report - v_null) / norm(v_report). ")
    return metric_rows(records), how + caption("text_reliance", records, {})


def write_intro(faithfulness_png, faithfulness_caption, out_rst) -> Path:
    """The report's front-page snippet: the faithfulness figure, embedded, with its n and profile.

    The data URI is wrapped at 76 characters: docutils refuses input lines over 10,000 characters, and a
    URL parser drops the line breaks again (they are not part of the URL).
    """
    data = base64.b64encode(Path(faithfulness_png).read_bytes()).decode()
    lines = "\n".join(f"   {data[i:i + 76]}" for i in range(0, len(data), 76))
    cap = Path(faithfulness_caption).read_text().strip()
    text = ("Faithfulness: are the findings of the report in the generated volume?\n"
            "-----------------------------------------------------------------------\n\n"
            "The classifier's AUROC per finding on each generator family's volumes (against the labels of the reports "
            "that produced them) beside the real ceiling (the same classifier on the real scans of the same reports), "
            f"with bootstrap 95% CIs over volumes (over reports or patients where one has several volumes). {cap}\n\n"
            ".. raw:: html\n\n   <img alt=\"faithfulness\" style=\"max-width:100%\"\n"
            f"   src=\"data:image/png;charset=utf8;filename={Path(faithfulness_png).name};base64,\n{lines}\">\n")
    Path(out_rst).write_text(text)
    return Path(out_rst)
