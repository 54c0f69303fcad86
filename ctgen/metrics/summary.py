"""What every reported number carries: its n, a bootstrap 95% CI, the profile it was computed with,
a hash of the scored volumes, and a flag when it is too thin to be read as a result.

``bootstrap_ci(statistic, units, ...)`` resamples the independent units (volumes, or chunks where a
protocol is chunked) with replacement and recomputes the statistic: the percentile interval of the
resampled values. A statistic that cannot be computed on a resample (e.g. an AUROC whose resample
holds one class) is dropped from that resample's set; the share dropped is reported.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

N_BOOTSTRAP = 1000  # resamples of the percentile bootstrap
CONFIDENCE = 0.95
MIN_UNITS = 10  # fewer units and the percentile bootstrap's 95% interval holds the truth far less often: flagged


def stems_hash(stems: Iterable[str]) -> str:
    """sha256 (16 hex) of the sorted volume stems a number was computed on: two numbers with the same hash
    were computed on the same volumes."""
    return hashlib.sha256("\n".join(sorted(map(str, stems))).encode()).hexdigest()[:16]


@dataclass
class MetricValue:
    """One reported number with what it needs to be read."""

    name: str  # e.g. "fid_2d.axial", "faithfulness.macro_auroc"
    value: float | None  # None where it cannot be computed (the flag says why)
    n: int  # independent units it was computed on (volumes, or chunks)
    ci: tuple[float, float] | None = None  # bootstrap 95% interval over the units
    profile: str = ""  # the protocol/backbone/feature space, e.g. "proxy:classifier3d", "vlm3d-2026:squeezenet1.1"
    stems: str = ""  # stems_hash of the scored volumes
    flag: str | None = None  # why the number should not be read as a result (too few samples, ...)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. dimensions, chance level, dropped resamples

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ci"] = list(self.ci) if self.ci is not None else None
        for k in ("value",):
            if out[k] is not None and not math.isfinite(out[k]):
                out[k] = None
        return out

    def row(self) -> dict[str, Any]:
        """One table row: :meth:`to_json` without ``extra``, the CI as ``ci_low`` and ``ci_high`` columns."""
        row = {k: v for k, v in self.to_json().items() if k not in ("ci", "extra")}
        return {**row, "ci_low": self.ci[0] if self.ci else None, "ci_high": self.ci[1] if self.ci else None}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> MetricValue:
        """The inverse of :meth:`to_json` (a metrics.json record back to a MetricValue)."""
        known = {f: record[f] for f in cls.__dataclass_fields__ if f in record}
        if known.get("ci") is not None:
            known["ci"] = tuple(known["ci"])
        return cls(**known)


def thin(n: int, what: str = "volumes") -> str | None:
    """The flag of a number computed on fewer than :data:`MIN_UNITS` units, else None."""
    return f"only {n} {what}: too few for a reliable bootstrap CI (< {MIN_UNITS})" if n < MIN_UNITS else None


def join_flags(*flags: str | None) -> str | None:
    """Several reasons in one flag ("; "-separated), None when there is none."""
    return "; ".join(f for f in flags if f) or None


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
    if groups is None:
        return percentile_ci([float(statistic(rng.integers(0, n_units, n_units))) for _ in range(n_boot)], n_boot,
                             confidence)
    _, codes = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(codes == g) for g in range(codes.max() + 1)]
    if len(members) < 2:
        return None, 1.0
    draws = (np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))]) for _ in range(n_boot))
    return percentile_ci([float(statistic(idx)) for idx in draws], n_boot, confidence)


def report_groups(groups: Sequence | None, n: int) -> tuple[np.ndarray | None, dict]:
    """(groups for :func:`bootstrap_ci`, what ``extra`` records): None and {} where no report has two volumes."""
    if groups is None:
        return None, {}
    groups = np.asarray(groups)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} groups for {n} volumes")
    n_groups = int(len(np.unique(groups)))
    return (groups, {"resampled": "reports", "n_reports": n_groups}) if n_groups < n else (None, {})


def bootstrap_ci_two(statistic: Callable[[np.ndarray, np.ndarray], float], n_a: int, n_b: int, *,
                     n_boot: int = N_BOOTSTRAP, seed: int = 0,
                     confidence: float = CONFIDENCE) -> tuple[tuple[float, float] | None, float]:
    """:func:`bootstrap_ci` for a statistic of two independent samples (generated and real volumes):
    each resample draws ``range(n_a)`` and ``range(n_b)`` with replacement, independently."""
    if n_a < 2 or n_b < 2:
        return None, 1.0
    rng = np.random.default_rng(seed)
    draws = ((rng.integers(0, n_a, n_a), rng.integers(0, n_b, n_b)) for _ in range(n_boot))
    return percentile_ci([float(statistic(a, b)) for a, b in draws], n_boot, confidence)


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


def mean_with_ci(values: Sequence[float], name: str, *, n_boot: int = N_BOOTSTRAP, seed: int = 0,
                 groups: Sequence | None = None, **kw: Any) -> MetricValue:
    """The mean of per-volume values with its bootstrap CI (NaN values are left out and counted).

    ``groups``: the report of each value; where some report has several, the CI resamples whole reports.
    """
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    finite = v[ok]
    extra = {"n_nan": int(v.size - finite.size), **kw.pop("extra", {})}
    if finite.size == 0:
        return MetricValue(name, None, 0, flag=join_flags(kw.pop("flag", None), "no finite values"), extra=extra, **kw)
    g, clusters = report_groups(None if groups is None else np.asarray(groups)[ok], finite.size)
    extra.update(clusters)
    ci, _ = bootstrap_ci(lambda idx: finite[idx].mean(), finite.size, n_boot=n_boot, seed=seed, groups=g)
    units = thin(int(finite.size)) if g is None else thin(clusters["n_reports"], "reports")
    flag = join_flags(kw.pop("flag", None), units)
    return MetricValue(name, float(finite.mean()), int(finite.size), ci, flag=flag, extra=extra, **kw)
