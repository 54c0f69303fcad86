"""Fréchet distances as reported numbers: the sample-size guard, a stated dimension, a CI over volumes.

A Fréchet distance fits a Gaussian to each feature set. With fewer feature rows ``n`` than feature
dimensions ``F`` the covariance has rank ``n - 1 < F`` and the distance mostly measures that
rank deficiency (it falls as ``n`` grows, whatever the generator), so :func:`frechet_value` never
reports it at full dimension then: it projects both sets onto the top ``k = n - 1`` principal
axes of the real features (fitted once, on all real rows), computes the distance there, and says
so (``extra.dim``, ``extra.full_dim``, and a ``flag``: a reduced-dimension distance is not
comparable with a full-dimension one).

The bootstrap resamples volumes, not rows: a 2D FID has many slices per volume, which are not
independent (and whole reports or patients where one has several volumes: ``groups_fake``/``groups_real``).
Each resample draws generated and real volumes with replacement (independently) and
weights every feature row by how often its volume was drawn; the weighted mean and covariance
equal those of the gathered rows, without gathering them (O(rows x F^2) per resample, on the
features' device). Resamples hold duplicates, which lowers their diversity, so bootstrap distances
sit above the point estimate, often all of them (a percentile interval would then not contain the
number it qualifies). The interval reported is the percentile interval shifted by the bootstrap's
own bias (mean of the resampled distances minus the estimate, recorded as ``extra.bootstrap_bias``),
floored at 0: the spread over volumes, centred where the estimate is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ctgen.metrics.frechet import frechet_distance_from_stats
from ctgen.metrics.summary import MetricValue, join_flags, percentile_ci, report_groups, thin
from ctprep.stats import group_members, resample


@dataclass
class FeatureRows:
    """Feature rows of one set and the volume each row came from (a volume gives one row, or one per slice)."""

    feats: np.ndarray  # (R, F) float
    owner: np.ndarray  # (R,) int: index of the row's volume in [0, n_units)
    n_units: int  # volumes

    @classmethod
    def per_volume(cls, feats) -> FeatureRows:
        """One row per volume (3D features)."""
        feats = np.asarray(feats)
        return cls(feats, np.arange(len(feats)), len(feats))

    @classmethod
    def stacked(cls, blocks: list[np.ndarray]) -> FeatureRows:
        """One block of rows per volume (2D features of its slices), in volume order."""
        if not blocks:
            return cls(np.zeros((0, 0), np.float32), np.zeros(0, np.int64), 0)
        owner = np.concatenate([np.full(len(b), i, np.int64) for i, b in enumerate(blocks)])
        return cls(np.concatenate(blocks), owner, len(blocks))


def principal_axes(real: torch.Tensor, k: int) -> torch.Tensor:
    """(F, k): the top-k principal axes of the rows of ``real`` (R, F), by SVD of the centred rows."""
    centred = real - real.mean(dim=0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)  # vh (min(R, F), F)
    return vh[:k].T


def _weighted_stats(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (F,) and unbiased covariance (F, F) of rows ``x`` (R, F) repeated ``w`` (R,) times each."""
    total = w.sum()
    mu = (w[:, None] * x).sum(dim=0) / total
    xc = x - mu
    return mu, (xc * w[:, None]).T @ xc / (total - 1)  # O(R F^2)


class _Pair:
    """One real/generated feature pair on a device, reduced to a stated dimension where n <= F."""

    def __init__(self, real: FeatureRows, fake: FeatureRows, device):
        self.real, self.fake, self.device = real, fake, device
        self.full_dim = int(real.feats.shape[1])
        r = torch.as_tensor(real.feats, dtype=torch.float64, device=device)
        f = torch.as_tensor(fake.feats, dtype=torch.float64, device=device)
        n_rows = min(len(r), len(f))
        self.flag = None
        if n_rows <= self.full_dim:
            k = n_rows - 1
            axes = principal_axes(r, k)  # (F, k), from the real rows only
            r, f = r @ axes, f @ axes
            self.flag = (f"{n_rows} feature rows <= {self.full_dim} dimensions: computed on the top {k} principal "
                         "axes of the real features (not comparable with a full-dimension distance)")
        self.r, self.f = r, f
        self.owner_r = torch.as_tensor(real.owner, device=device)
        self.owner_f = torch.as_tensor(fake.owner, device=device)

    def distance(self, idx_f: np.ndarray, idx_r: np.ndarray) -> float:
        """The distance on a resample of generated (``idx_f``) and real (``idx_r``) volumes."""
        w_f = torch.as_tensor(np.bincount(idx_f, minlength=self.fake.n_units), dtype=torch.float64,
                              device=self.device)[self.owner_f]
        w_r = torch.as_tensor(np.bincount(idx_r, minlength=self.real.n_units), dtype=torch.float64,
                              device=self.device)[self.owner_r]
        if w_f.sum() < 2 or w_r.sum() < 2:
            return float("nan")
        return frechet_distance_from_stats(*_weighted_stats(self.r, w_r), *_weighted_stats(self.f, w_f))

    def extra(self) -> dict:
        return {"n_real": self.real.n_units, "rows_generated": int(len(self.fake.feats)),
                "rows_real": int(len(self.real.feats)), "dim": int(self.r.shape[1]), "full_dim": self.full_dim}


def frechet_values(real: dict[str, FeatureRows], fake: dict[str, FeatureRows], name: str, *, profile: str = "",
                   stems: str = "", n_boot: int = 200, seed: int = 0, device: str | torch.device = "cpu",
                   mean: bool = False, groups_fake: Sequence | None = None,
                   groups_real: Sequence | None = None) -> dict[str, MetricValue]:
    """Fréchet distances of several feature pairs (the planes of a 2D FID) on shared resamples.

    -> {key: MetricValue named ``name.key``} and, with ``mean``, ``name.mean``: their average with its own
    CI (the same volumes resampled for every key). The units must be the same volumes in every pair.
    ``groups_fake``, ``groups_real``: the stems of each side's volumes; where a report prompted several
    generated volumes or a CT-RATE patient has several real ones, the resamples draw whole reports or patients
    (:func:`ctgen.metrics.summary.report_groups`), recorded in ``extra``: the generated side's (the volumes ``n``
    counts) as ``resampled`` and ``n_resampled``, the keys of every other record, the real side's as
    ``resampled_real`` and ``n_resampled_real``.
    """
    keys = list(real)
    n_f, n_r = fake[keys[0]].n_units, real[keys[0]].n_units
    g_f, c_f = report_groups(groups_fake, n_f)
    g_r, c_r = report_groups(groups_real, n_r, "volumes")
    # the generated side under the keys that tables and figures read as the units of ``n``
    clusters = {**c_f, **{f"{k}_real": v for k, v in c_r.items()}}
    members_f, members_r = (None if g is None else group_members(g) for g in (g_f, g_r))
    # the thinner side's independent units: what the CI's reliability rests on
    few = thin(*min((c.get("n_resampled", n), c.get("resampled", "volumes")) for c, n in ((c_f, n_f), (c_r, n_r))))
    if min(n_f, n_r) < 2:
        flag = "fewer than 2 volumes on a side: no covariance"
        out = {k: MetricValue(f"{name}.{k}", None, n_f, profile=profile, stems=stems, flag=flag) for k in keys}
        if mean:
            out["mean"] = MetricValue(f"{name}.mean", None, n_f, profile=profile, stems=stems, flag=flag)
        return out
    pairs = {k: _Pair(real[k], fake[k], device) for k in keys}
    values = {k: p.distance(np.arange(n_f), np.arange(n_r)) for k, p in pairs.items()}
    rng = np.random.default_rng(seed)
    boots: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(n_boot):
        idx_f, idx_r = resample(rng, n_f, members_f), resample(rng, n_r, members_r)
        for k, p in pairs.items():
            boots[k].append(p.distance(idx_f, idx_r))
    out = {}
    for k, p in pairs.items():
        ci, extra = shifted_ci(boots[k], values[k], n_boot)
        flag = join_flags(p.flag, few)
        out[k] = MetricValue(f"{name}.{k}", values[k], n_f, ci, profile, stems, flag, {**p.extra(), **extra, **clusters})
    if mean:
        value = float(np.mean(list(values.values())))
        ci, extra = shifted_ci(list(np.mean([boots[k] for k in keys], axis=0)), value, n_boot)
        flags = sorted({p.flag for p in pairs.values() if p.flag})
        out["mean"] = MetricValue(f"{name}.mean", value, n_f, ci, profile, stems,
                                  join_flags(*flags, few),
                                  {"of": keys, "n_real": n_r, **extra, **clusters})
    return out


def shifted_ci(boots: list[float], value: float, n_boot: int) -> tuple[tuple[float, float] | None, dict]:
    """The percentile interval of ``boots`` moved by their bias (see the module doc), floored at 0."""
    ci, dropped = percentile_ci(boots, n_boot)
    finite = np.asarray([b for b in boots if np.isfinite(b)])
    bias = float(finite.mean() - value) if finite.size else float("nan")
    if ci is not None:
        ci = (max(ci[0] - bias, 0.0), max(ci[1] - bias, 0.0))
    return ci, {"n_boot": n_boot, "dropped_resamples": dropped, "bootstrap_bias": bias}


def frechet_value(real: FeatureRows, fake: FeatureRows, name: str, **kw) -> MetricValue:
    """The Fréchet distance between ``real`` and ``fake`` feature rows with its guard and its CI.

    ``n`` of the record is the number of generated volumes; ``extra`` holds the real volume count,
    both row counts, the dimension used and the full one. Keywords as :func:`frechet_values`.
    """
    out = frechet_values({"_": real}, {"_": fake}, name, **kw)["_"]
    out.name = name
    return out
