"""Two runs scored on the same reports, compared pair by pair: ``ctgen compare`` and the families' comparison.

A run is an evaluation's ``per_volume.csv``. Rows of the two runs are paired by report (``prompt_id``) and
repeat, so two generator families sampled from one ``prompts.csv`` with one base seed pair as
(report, seed). Every compared quantity is a :class:`~ctgen.metrics.summary.MetricValue` named
``<prefix>.<metric>``: the difference A - B, its bootstrap 95% CI over pairs (both runs resampled
together; whole reports or CT-RATE patients where one has several volumes), the paired permutation test's
p-value (which likewise swaps whole reports or patients then),
n pairs, and both runs' names (``a``, ``b``) and own values (``value_a``, ``value_b``) in ``extra``.

* per-volume metrics (CLIP score, image similarity, retrieval top-k): the mean difference, with
  :func:`~ctgen.metrics.permutation.paired_permutation_test`;
* faithfulness: the classifier's macro AUROC on the run's volumes against their reports' labels
  (``p_<label>``, ``y_<label>`` columns of per_volume.csv, over the labels both evaluations averaged),
  with :func:`~ctgen.metrics.permutation.paired_swap_test` (a macro AUROC is not a mean over volumes);
  and the per-volume agreement with the report (mean over known labels of p or 1 - p).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ctgen.jobs.eval_config import EvalConfig
from ctgen.metrics.faithfulness import auroc
from ctgen.metrics.permutation import paired_permutation_test, paired_swap_test
from ctgen.jobs.score import ONE_CLASS
from ctgen.metrics.summary import MetricValue, bootstrap_ci, dropped_flag, join_flags, report_groups, stems_hash, thin
from ctprep.errors import UserError, describe, read_json
from ctprep.volume import atomic_write

log = logging.getLogger(__name__)

#: per-volume columns compared by their mean difference
PER_VOLUME = ("clip_score", "image_similarity", "retrieval_top1", "retrieval_top5")
KEY = "prompt_id"


def label_columns(table: pd.DataFrame) -> list[str]:
    """The labels whose classifier probability (``p_<label>``) and report label (``y_<label>``) a run holds."""
    return [c[2:] for c in table.columns if c.startswith("p_") and f"y_{c[2:]}" in table.columns]


def pair_runs(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``a`` and ``b`` of one report and repeat side by side (suffixes ``_a``, ``_b``).

    By the ``repeat`` column where both runs have one (a volume one run lost, listed in its ``skipped.csv``,
    leaves its pair out rather than shifting the others onto other seeds); by order within the report otherwise.
    """
    if "repeat" in a.columns and "repeat" in b.columns:
        a, b = a.assign(_n=a["repeat"]), b.assign(_n=b["repeat"])
    else:
        order = [c for c in ("seed",) if c in a.columns and c in b.columns]
        a = a.sort_values([KEY, *order], kind="stable")
        b = b.sort_values([KEY, *order], kind="stable")
        a = a.assign(_n=a.groupby(KEY).cumcount())
        b = b.assign(_n=b.groupby(KEY).cumcount())
    return a.merge(b, on=[KEY, "_n"], suffixes=("_a", "_b"))


def _macro_auroc(p: np.ndarray, y: np.ndarray) -> float:
    """Mean AUROC over the columns; NaN when a column holds one class (a resample then drops out)."""
    values = [auroc(p[:, j], y[:, j]) for j in range(p.shape[1])]
    return float(np.mean(values)) if values and not any(math.isnan(v) for v in values) else math.nan


def agreement(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per volume: mean over its known labels of p where the report says present and 1 - p where absent."""
    known = ~np.isnan(y)
    agree = np.where(known, np.where(y == 1, p, 1.0 - p), 0.0)
    n = known.sum(axis=1)
    return np.where(n > 0, agree.sum(axis=1) / np.maximum(n, 1), np.nan)


def paired_differences(a: pd.DataFrame, b: pd.DataFrame, names: tuple[str, str] = ("a", "b"), *,
                       prefix: str = "compare", labels: Sequence[str] | None = None, profile: str = "",
                       n_boot: int = 1000, n_permutations: int = 10_000, seed: int = 0) -> list[MetricValue]:
    """Every quantity both runs hold, compared pair by pair (see the module doc). ``labels``: the labels of the
    macro AUROC (default: every label both runs hold)."""
    m = pair_runs(a, b)
    if m.empty:
        raise UserError("the two runs share no reports: nothing to pair")
    out: list[MetricValue] = []
    base = {"a": names[0], "b": names[1], "n_rows": {names[0]: len(a), names[1]: len(b)}}
    stems = stems_hash(list(m[KEY].astype(str)))
    # several volumes of one report (repeats), or of one CT-RATE patient, share labels and anatomy: the CIs and
    # the tests then resample and swap whole reports or patients, not pairs
    units, clusters = report_groups(list(m[KEY].astype(str)), len(m))
    repeated = units is not None
    base.update(clusters)

    def record(metric: str, d_value, ci, n, test, own_a, own_b, left_out, extra=None, flag=None,
               groups=None) -> None:
        ok = d_value is not None and math.isfinite(d_value)
        # the CI resamples units where one has several pairs: the count that must be large enough is that of the
        # units (``groups``) of the pairs the metric holds (clip_score is NaN where a report has no text)
        n_units = {"n_resampled": len(np.unique(groups))} if repeated else {}
        few = thin(n_units["n_resampled"], base["resampled"]) if n_units else thin(n, "pairs")
        out.append(MetricValue(f"{prefix}.{metric}", float(d_value) if ok else None, n, ci, profile, stems,
                               join_flags(few, flag) if ok else "not defined on these pairs",
                               {**base, **n_units, "value_a": own_a, "value_b": own_b, "p_value": test.get("p_value"),
                                "exact": test.get("exact"), "n_left_out": left_out, **(extra or {})}))

    for metric in PER_VOLUME:
        cols = [f"{metric}_a", f"{metric}_b"]
        if not all(c in m for c in cols):
            continue
        both = m[cols].dropna().to_numpy(np.float64)
        if len(both) == 0:
            continue
        d = both[:, 0] - both[:, 1]
        groups = units[m[cols].notna().all(axis=1).to_numpy()] if repeated else None
        ci, _ = bootstrap_ci(lambda idx: d[idx].mean(), len(d), n_boot=n_boot, seed=seed, groups=groups)
        test = paired_permutation_test(both[:, 0], both[:, 1], n_permutations=n_permutations, seed=seed, groups=groups)
        record(f"{metric}_diff", float(d.mean()), ci, len(d), test, float(both[:, 0].mean()), float(both[:, 1].mean()),
               len(m) - len(d), groups=groups)
    shared = [x for x in (labels if labels is not None else label_columns(a)) if x in label_columns(a)
              and x in label_columns(b)]
    if shared:
        pa = m[[f"p_{x}_a" for x in shared]].to_numpy(np.float64)
        pb = m[[f"p_{x}_b" for x in shared]].to_numpy(np.float64)
        y = m[[f"y_{x}_a" for x in shared]].to_numpy(np.float64)
        if not np.array_equal(np.isnan(y), np.isnan(m[[f"y_{x}_b" for x in shared]].to_numpy(np.float64))) or \
                not np.allclose(np.nan_to_num(y), np.nan_to_num(m[[f"y_{x}_b" for x in shared]].to_numpy(np.float64))):
            raise UserError("the two runs hold different labels for the same reports: they were not scored alike")
        # an AUROC needs both classes: a label that holds one class on these reports is left out (and listed)
        both_classes = [j for j in range(y.shape[1]) if {0.0, 1.0} <= set(y[~np.isnan(y[:, j]), j].tolist())]
        one_class = [shared[j] for j in range(len(shared)) if j not in both_classes]
        shared = [shared[j] for j in both_classes]
        pa, pb, y = pa[:, both_classes], pb[:, both_classes], y[:, both_classes]
    if shared:
        n = len(y)
        # the two runs stacked on the last axis, so that one resample or one swap moves both columns of a pair
        both = np.stack([pa, pb, y], axis=-1)  # (N, L, 3)

        def diff(x: np.ndarray) -> float:
            return _macro_auroc(x[..., 0], x[..., 2]) - _macro_auroc(x[..., 1], x[..., 2])

        ci, dropped = bootstrap_ci(lambda idx: diff(both[idx]), n, n_boot=n_boot, seed=seed, groups=units)
        test = paired_swap_test(lambda u, v: _macro_auroc(u, y) - _macro_auroc(v, y), pa, pb,
                                n_permutations=min(n_permutations, 2_000), seed=seed, groups=units)
        record("faithfulness.macro_auroc_diff", diff(both), ci, n, test, _macro_auroc(pa, y), _macro_auroc(pb, y), 0,
               {"labels": list(shared), "labels_one_class": one_class, "dropped_resamples": dropped,
                "dropped_permutations": test.get("dropped")}, dropped_flag(ci, dropped, ONE_CLASS), units)
        ga, gb = agreement(pa, y), agreement(pb, y)
        ok = ~(np.isnan(ga) | np.isnan(gb))
        if ok.any():
            d = ga[ok] - gb[ok]
            g = units[ok] if repeated else None
            ci, _ = bootstrap_ci(lambda idx: d[idx].mean(), len(d), n_boot=n_boot, seed=seed, groups=g)
            test = paired_permutation_test(ga[ok], gb[ok], n_permutations=n_permutations, seed=seed, groups=g)
            record("faithfulness.agreement_diff", float(d.mean()), ci, len(d), test, float(ga[ok].mean()),
                   float(gb[ok].mean()), int((~ok).sum()), {"labels": list(shared)}, groups=g)
    if not out:
        raise UserError(f"the two runs share no metric with values to compare (per-volume: {', '.join(PER_VOLUME)}; "
                        "faithfulness: p_<label> and y_<label> columns)")
    return out


def as_table(records: Sequence[MetricValue]) -> pd.DataFrame:
    """One row per compared quantity: metric, n_pairs, n_left_out, mean_a, mean_b, diff, CI, p_value, exact."""
    rows = []
    for r in records:
        e = r.extra
        rows.append({"metric": r.name.split(".", 1)[1].removesuffix("_diff"), "a": e["a"], "b": e["b"],
                     "n_pairs": r.n, "n_left_out": e["n_left_out"], "mean_a": e["value_a"], "mean_b": e["value_b"],
                     "diff": r.value, "ci_low": r.ci[0] if r.ci else None, "ci_high": r.ci[1] if r.ci else None,
                     "p_value": e["p_value"], "exact": e["exact"], "flag": r.flag})
    return pd.DataFrame(rows)


def guarded_labels(table: pd.DataFrame, min_positives: int, min_negatives: int) -> list[str]:
    """The labels of a per_volume.csv with at least ``min_positives`` positive and ``min_negatives`` negative
    reports (distinct ``prompt_id``): the evaluation's AUROC guard, for a run whose metrics.json is not at hand."""
    keep = []
    for x in label_columns(table):
        y = table[[KEY, f"y_{x}"]].dropna()
        if (y.loc[y[f"y_{x}"] == 1, KEY].nunique() >= min_positives
                and y.loc[y[f"y_{x}"] == 0, KEY].nunique() >= min_negatives):
            keep.append(x)
    return keep


def compare_runs(a_csv, b_csv, out_csv=None, n_permutations: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """``ctgen compare``: two evaluations' per_volume.csv, compared pair by pair (the table of :func:`as_table`).

    The faithfulness macro averages the labels both evaluations averaged (each run's ``metrics.json`` beside its
    per_volume.csv), or, where one is missing, the labels that pass the evaluation's default AUROC guard in both.
    """
    tables, labels = [], []
    for path in (a_csv, b_csv):
        try:
            table = pd.read_csv(path, dtype={KEY: str})
        except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise UserError(f"{path} is not an evaluation's per_volume.csv: {describe(err)}") from None
        if KEY not in table.columns or not (set(PER_VOLUME) & set(table.columns) or label_columns(table)):
            raise UserError(f"{path} is not an evaluation's per_volume.csv: it needs a {KEY} column and a metric "
                            f"column ({', '.join(PER_VOLUME)} or p_<label> with y_<label>)")
        check_numeric(table, path)
        tables.append(table)
        metrics = Path(path).with_name("metrics.json")
        averaged = macro_labels(metrics) if metrics.is_file() else None
        if averaged is None:
            cfg = EvalConfig()
            averaged = guarded_labels(table, cfg.auroc_min_positives, cfg.auroc_min_negatives)
        labels.append(averaged)
    shared = [x for x in labels[0] if x in labels[1]]
    out = as_table(paired_differences(*tables, names=("a", "b"), labels=shared, n_permutations=n_permutations,
                                      seed=seed))
    if out_csv:
        atomic_write(out_csv, lambda tmp: out.to_csv(tmp, index=False))  # its folder made, as other outputs'
    return out


def check_numeric(table: pd.DataFrame, path) -> None:
    """Every metric column compared (``PER_VOLUME``, ``p_<label>``, ``y_<label>``) holds numbers or blanks: a
    hand-edited cell ("high", "0,7") is named by file, column and row, not numpy's bare conversion error."""
    columns = [c for c in PER_VOLUME if c in table.columns]
    columns += [f"{p}_{x}" for x in label_columns(table) for p in ("p", "y")]
    for column in columns:
        values = pd.to_numeric(table[column], errors="coerce")
        bad = values.isna() & table[column].notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise UserError(f"{path}: column {column} holds {table[column].iloc[row]!r} in row {row + 2} "
                            f"({KEY} {table[KEY].iloc[row]}), not a number")


def macro_labels(metrics_json: str | Path) -> list[str] | None:
    """The labels an evaluation averaged into its faithfulness macro AUROC (None: not computed)."""
    for r in read_json(metrics_json, "evaluation metrics.json").get("metrics", []):
        if r["name"].startswith("faithfulness.") and r["name"].endswith("macro") and "generated" in r["name"]:
            return list((r.get("extra") or {}).get("labels") or [])
    return None


def compare_families(evaluations: Mapping[str, tuple[str | Path, str | Path]], out_json: str | Path,
                     out_csv: str | Path, *, n_boot: int = 1000, n_permutations: int = 10_000,
                     seed: int = 0) -> dict:
    """The rule ``compare_families``: ``evaluations`` = {family: (metrics.json, per_volume.csv)} of the generator
    families scored on the same reports and seeds; every pair of families compared (first minus second, in the
    order given). Writes ``families.json`` (MetricValue records, as metrics.json) and its table as CSV."""
    families = list(evaluations)
    records: list[MetricValue] = []
    not_computed = []
    for i, fa in enumerate(families):
        for fb in families[i + 1:]:
            labels = [macro_labels(evaluations[f][0]) for f in (fa, fb)]
            shared = None if None in labels else [x for x in labels[0] if x in labels[1]]
            a, b = (pd.read_csv(evaluations[f][1], dtype={KEY: str}) for f in (fa, fb))
            records += paired_differences(a, b, (fa, fb), prefix=f"families.{fa}-{fb}", labels=shared,
                                          profile=f"{fa} - {fb}", n_boot=n_boot, n_permutations=n_permutations,
                                          seed=seed)
    if len(families) < 2:
        not_computed.append({"group": "families", "reason": f"one generator family configured ({families[0]}): "
                                                            "models.generators lists both to compare them"})
    summary = {"families": families, "metrics": [r.to_json() for r in records], "not_computed": not_computed,
               "settings": {"n_boot": n_boot, "n_permutations": n_permutations, "seed": seed}}
    Path(out_json).write_text(json.dumps(summary, indent=2) + "\n")
    table = as_table(records) if records else pd.DataFrame(columns=["metric", "a", "b", "n_pairs", "diff", "p_value"])
    table.to_csv(out_csv, index=False)
    for r in records:
        log.info("%s = %s (95%% CI %s, n = %d pairs, p = %s)", r.name, r.value, r.ci, r.n, r.extra["p_value"])
    return summary
