"""What every reported number carries: its n, a bootstrap 95% CI, the profile it was computed with,
a hash of the scored volumes, and a flag when it is too thin to be read as a result.

The bootstrap itself (``bootstrap_ci``, ``percentile_ci``) is ``ctprep.stats``'s, which the labeller's
scores use too.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ctprep.ctrate import parse_volume_name
from ctprep.stats import CONFIDENCE, N_BOOTSTRAP, bootstrap_ci, percentile_ci  # noqa: F401 (one bootstrap for both)

MIN_UNITS = 10  # fewer units and the percentile bootstrap's 95% interval holds the truth far less often: flagged
# a larger share of resamples dropped (the statistic undefined on them) and the interval is conditional on the kept
# ones (e.g. those that hold both classes of a label): flagged
MAX_DROPPED = 0.05


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


def dropped_flag(ci: tuple[float, float] | None, dropped: float, why: str) -> str | None:
    """The flag of a bootstrap CI that lost resamples (``ci``, ``dropped``: :func:`bootstrap_ci`'s): none computed
    (more than half dropped), or one over the kept resamples only (more than :data:`MAX_DROPPED`); ``why``: what
    the dropped resamples were, e.g. "held one class of a label"."""
    if ci is None:
        return f"no CI: {dropped:.0%} of the resamples {why} (the interval needs at least half)"
    if dropped > MAX_DROPPED:
        return f"CI conditional on the kept resamples: {dropped:.0%} {why} and were dropped"
    return None


def join_flags(*flags: str | None) -> str | None:
    """Several reasons in one flag ("; "-separated), None when there is none."""
    return "; ".join(f for f in flags if f) or None


def independent_units(stems: Sequence, fallback: str = "reports") -> tuple[np.ndarray, str]:
    """(the unit of each scored volume, what the units are) for a cluster bootstrap.

    The scans of one CT-RATE patient, their reconstructions (the same acquisition, one report) and every
    volume generated from their reports share anatomy and labels: where every stem is a CT-RATE VolumeName
    the unit is its patient. Other names say nothing of their patient: the unit is the stem itself, which
    is ``fallback`` (a generated volume's stem is its report's, so repeats of one report stay together).
    """
    stems = [str(s) for s in stems]
    try:
        patients = [parse_volume_name(s if ".nii" in s else f"{s}.nii.gz")["patient"] for s in stems]
    except ValueError:
        return np.asarray(stems), fallback
    # one stem per patient: the stems are the same partition, and keep the order (and the resamples) the
    # groups had when they were the stems
    return np.asarray(stems if len(set(patients)) == len(set(stems)) else patients), "patients"


def report_groups(groups: Sequence | None, n: int, fallback: str = "reports") -> tuple[np.ndarray | None, dict]:
    """(groups for :func:`bootstrap_ci`, what ``extra`` records) from the stems of ``n`` volumes (see
    :func:`independent_units`): None and {} where every unit holds one volume, else the units and
    ``{"resampled": "patients" or fallback, "n_resampled": their count}``."""
    if groups is None:
        return None, {}
    if len(groups) != n:
        raise ValueError(f"{len(groups)} groups for {n} volumes")
    units, what = independent_units(groups, fallback)
    n_groups = int(len(np.unique(units)))
    return (units, {"resampled": what, "n_resampled": n_groups}) if n_groups < n else (None, {})


def n_text(record: dict, what: str = "") -> str:
    """A record's n, then the reports or patients its CI and tests resample where a unit holds several volumes
    or pairs (that count is what the CI's reliability rests on, see :func:`report_groups`): "24 pairs (12 patients)".
    The one wording of the figures' titles and the tables' captions."""
    extra = record.get("extra") or {}
    units = f" ({extra['n_resampled']} {extra.get('resampled', 'units')})" if extra.get("n_resampled") else ""
    return f"{record.get('n')}{' ' + what if what else ''}{units}"


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


def mean_with_ci(values: Sequence[float], name: str, *, n_boot: int = N_BOOTSTRAP, seed: int = 0,
                 groups: Sequence | None = None, **kw: Any) -> MetricValue:
    """The mean of per-volume values with its bootstrap CI (NaN values are left out and counted).

    ``groups``: the stem of each value's volume; where a patient or a report has several, the CI resamples
    whole ones (:func:`report_groups`).
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
    units = thin(int(finite.size)) if g is None else thin(clusters["n_resampled"], clusters["resampled"])
    flag = join_flags(kw.pop("flag", None), units)
    return MetricValue(name, float(finite.mean()), int(finite.size), ci, flag=flag, extra=extra, **kw)
