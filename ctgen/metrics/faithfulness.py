"""Abnormality faithfulness: the classifier's AUROC per label, written via Mann-Whitney U.

``auroc = U / (n_pos n_neg)`` where U counts (positive, negative) pairs ranked correctly, ties
counting one half; U comes from the average ranks of all scores (ties share their mean rank), so
it is O(N log N) rather than the O(N^2) pair count. A label whose column has only one class has
no AUROC (NaN) and is left out of the macro mean. NaN labels (unknown) are skipped per label.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata

MACRO = "macro"  # key of the macro mean in the per-label dicts


def auroc(scores, labels) -> float:
    """scores (N,), labels (N,) in {0, 1} (NaN = unknown, skipped) -> AUROC, NaN if one class."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ")
    known = ~np.isnan(y)
    s, y = s[known], y[known]
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0, 1 or NaN")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(s)  # average ranks for ties, 1-based
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def auroc_per_label(scores, labels, names) -> dict[str, float]:
    """scores (N, L), labels (N, L), L names -> {name: AUROC or NaN, ..., 'macro': mean of the non-NaN}."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    names = list(names)
    if s.ndim != 2 or s.shape != y.shape or s.shape[1] != len(names):
        raise ValueError(f"expected scores and labels (N, {len(names)}), got {s.shape} and {y.shape}")
    if MACRO in names or len(set(names)) != len(names):
        raise ValueError(f"label names must be unique and not {MACRO!r}")
    out = {n: auroc(s[:, i], y[:, i]) for i, n in enumerate(names)}
    out[MACRO] = macro_mean(out.values())
    return out


def macro_mean(values) -> float:
    """Mean of the finite values; NaN when there are none."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    return float(v.mean()) if v.size else math.nan


def tstr_summary(scores_real_trained, scores_synthetic_trained, labels, names) -> dict[str, dict[str, float]]:
    """Train-on-synthetic, test-on-real, per label, on the same real test set.

    scores_real_trained (N, L): the classifier trained on real volumes (TRTR, the reference);
    scores_synthetic_trained (N, L): the one trained on generated volumes (TSTR); labels (N, L).
    -> {name or 'macro': {'trtr', 'tstr', 'gap' = trtr - tstr}}.
    """
    trtr = auroc_per_label(scores_real_trained, labels, names)
    tstr = auroc_per_label(scores_synthetic_trained, labels, names)
    return {k: {"trtr": trtr[k], "tstr": tstr[k], "gap": trtr[k] - tstr[k]} for k in trtr}
