"""The percentile bootstrap every reported number's 95% CI comes from (ctgen's metrics, the labeller's scores).

``bootstrap_ci(statistic, units, ...)`` resamples the independent units (volumes, reports, or chunks
where a protocol is chunked) with replacement and recomputes the statistic: the percentile interval of
the resampled values. A statistic that cannot be computed on a resample (e.g. an AUROC whose resample
holds one class) is dropped from that resample's set; the share dropped is reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

N_BOOTSTRAP = 1000  # resamples of the percentile bootstrap
CONFIDENCE = 0.95


def bootstrap_ci(statistic: Callable[[np.ndarray], float], n_units: int, *, n_boot: int = N_BOOTSTRAP,
                 seed: int = 0, confidence: float = CONFIDENCE,
                 groups: np.ndarray | None = None) -> tuple[tuple[float, float] | None, float]:
    """Percentile CI of ``statistic(indices)`` over resamples of ``range(n_units)`` with replacement.

    Returns ((low, high) or None, share of resamples where the statistic was not finite). ``statistic``
    gets an integer index array (with repeats) and returns a float (NaN where undefined). ``groups (n_units,)``:
    a cluster bootstrap, which draws whole groups (e.g. the volumes of one report, which share its labels)
    with replacement instead of single units, so that dependent units do not narrow the CI.
    """
    if n_units < 2:
        return None, 1.0
    rng = np.random.default_rng(seed)
    members = None if groups is None else group_members(groups)
    if members is not None and len(members) < 2:
        return None, 1.0
    draws = (resample(rng, n_units, members) for _ in range(n_boot))
    return percentile_ci([float(statistic(idx)) for idx in draws], n_boot, confidence)


def group_members(groups) -> list[np.ndarray]:
    """The unit indices of each group (groups in sorted order, indices ascending): what :func:`resample` draws."""
    _, codes = np.unique(np.asarray(groups), return_inverse=True)
    order = np.argsort(codes, kind="stable")
    return np.split(order, np.cumsum(np.bincount(codes))[:-1])


def resample(rng: np.random.Generator, n_units: int, members: list[np.ndarray] | None = None) -> np.ndarray:
    """One bootstrap resample of ``range(n_units)``: units drawn with replacement, or, with ``members`` (from
    :func:`group_members`), as many whole groups as there are, drawn with replacement."""
    if members is None:
        return rng.integers(0, n_units, n_units)
    return np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])


def percentile_ci(values: list[float], n_boot: int,
                  confidence: float = CONFIDENCE) -> tuple[tuple[float, float] | None, float]:
    """The percentile interval of bootstrap ``values`` (non-finite ones dropped and counted); None when more
    than half of the ``n_boot`` resamples were dropped."""
    finite = [v for v in values if math.isfinite(v)]
    dropped = 1.0 - len(finite) / n_boot
    if 2 * len(finite) < n_boot:
        return None, dropped
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(finite, [alpha, 1.0 - alpha])
    return (float(lo), float(hi)), dropped
