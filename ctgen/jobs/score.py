"""From per-volume network outputs to reported numbers: each a MetricValue with n, CI, profile, stems hash.

The groups of ``metrics.json`` (and of the report's tables):

* ``faithfulness``: the classifier's AUROC per label on generated volumes against their reports'
  labels, beside the real ceiling (the same classifier on the real scans of the same reports);
* ``distribution``: 2D FID per plane and their mean (2.5D) in each slice feature space, and an
  FVD-style Fréchet distance on each 3D network's features (:mod:`ctgen.metrics.distribution`);
* ``alignment``: CLIP score (raw, uncalibrated cosine x 100), retrieval top-k among the evaluation
  reports with chance level (:mod:`ctgen.metrics.retrieval`), similarity to the real scan;
* ``tstr``: the classifier trained on synthetic volumes vs on as many real ones, tested on real scans;
* ``hu``: per-tissue median HU of generated and real volumes, and the out-of-range flags.

A per-label AUROC needs ``min_positives`` and ``min_negatives`` known labels; below that it is
reported with no value and a flag saying how many there were. Above it, one whose smaller class has fewer than
:data:`~ctgen.metrics.summary.MIN_UNITS` units is reported with a flag (its CI is approximate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ctgen.metrics.faithfulness import auroc
from ctgen.metrics.hu import TISSUES
from ctgen.metrics.summary import (MetricValue, bootstrap_ci, dropped_flag, join_flags, mean_with_ci, report_groups,
                                   thin)

MACRO = "macro"
ONE_CLASS = "held one class of a label"  # why a resample of an AUROC is dropped


def _auroc_or_nan(s: np.ndarray, y: np.ndarray) -> float:
    return auroc(s, y) if len(y) else math.nan


def label_aurocs(probs, labels, names: Sequence[str], *, name: str, min_positives: int, min_negatives: int,
                 profile: str = "", stems: str = "", n_boot: int = 1000, seed: int = 0,
                 groups: Sequence | None = None) -> list[MetricValue]:
    """Per-label AUROC of ``probs`` (N, L) against ``labels`` (N, L; NaN unknown), each with its bootstrap CI over
    volumes, and their macro mean (over the labels that pass the guard) named ``name.macro``.

    ``groups (N,)``: the stem of each volume (a generated one: its report's). Where a report prompted several
    volumes, or a CT-RATE patient has several scans or reconstructions, they share labels and anatomy and
    are not independent: the CIs then resample whole reports or patients (a cluster bootstrap,
    :func:`ctgen.metrics.summary.report_groups`), and ``extra`` says which (``resampled``) with their count
    (``n_resampled``). Every unit of one volume is the same as None.

    The function the evaluation calls for faithfulness; ``ctgen.metrics.faithfulness`` may provide the same
    (``faithfulness_summary``), which would replace it here.
    """
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.float64)
    groups, clusters = report_groups(groups, len(probs))
    out, usable = [], []
    for j, label in enumerate(names):
        y, s = labels[:, j], probs[:, j]
        known = ~np.isnan(y)
        n_pos, n_neg = int((y[known] == 1).sum()), int((y[known] == 0).sum())
        extra = {"n_positive": n_pos, "n_negative": n_neg, "min_positives": min_positives,
                 "min_negatives": min_negatives}
        # the guard counts independent units: reports or patients where one has several volumes (5 volumes of
        # one positive report are one positive), volumes otherwise
        units_pos, units_neg, what = n_pos, n_neg, "volumes"
        if groups is not None:
            units_pos, units_neg = (len(np.unique(groups[known & (y == v)])) for v in (1, 0))
            what = clusters["resampled"]
            extra.update({"n_positive_units": units_pos, "n_negative_units": units_neg})
        if units_pos < min_positives or units_neg < min_negatives:
            counts = (f"{units_pos} positive and {units_neg} negative {what}" if groups is not None
                      else f"{n_pos} positives and {n_neg} negatives")
            out.append(MetricValue(f"{name}.{label}", None, int(known.sum()), profile=profile, stems=stems,
                                   flag=f"{counts}: an AUROC needs >= {min_positives} and >= {min_negatives}",
                                   extra=extra))
            continue
        usable.append(j)
        ci, dropped = bootstrap_ci(lambda idx: _auroc_or_nan(s[idx][known[idx]], y[idx][known[idx]]), len(y),
                                   n_boot=n_boot, seed=seed, groups=groups)
        out.append(MetricValue(f"{name}.{label}", auroc(s, y), int(known.sum()), ci, profile, stems,
                               join_flags(smaller_class(units_pos, units_neg, what),
                                          dropped_flag(ci, dropped, ONE_CLASS)),
                               {**extra, **clusters, "dropped_resamples": dropped}))
    out.append(_macro(probs, labels, usable, names, name, profile, stems, n_boot, seed, groups, clusters))
    return out


def smaller_class(units_pos: int, units_neg: int, what: str) -> str | None:
    """The thin-data flag of one label's AUROC: its CI rests on the smaller class's units, not on all of them (with
    6 positives among 200 volumes the 95% interval holds the truth far less often). The macro pools the labels and
    is flagged by its own count."""
    n, cls = min((units_pos, "positive"), (units_neg, "negative"))
    return thin(n, f"{cls} {what}")


def _macro(probs, labels, usable: list[int], names, name, profile, stems, n_boot, seed, groups=None,
           clusters=None) -> MetricValue:
    """The macro AUROC over the ``usable`` labels; ``groups``, ``clusters``: :func:`report_groups`' of the volumes."""
    if not usable:
        return MetricValue(f"{name}.{MACRO}", None, len(probs), profile=profile, stems=stems,
                           flag="no label has enough positives and negatives", extra={"labels": []})

    def stat(idx: np.ndarray) -> float:
        # a resample where some label has one class only is dropped (and counted), not averaged over the other
        # labels: every resample's statistic is the mean over the same labels
        return float(np.mean([_auroc_or_nan(probs[idx, j], labels[idx, j]) for j in usable]))

    value = stat(np.arange(len(probs)))
    clusters = clusters or {}
    ci, dropped = bootstrap_ci(stat, len(probs), n_boot=n_boot, seed=seed, groups=groups)
    units, what = (len(probs), "volumes") if groups is None else (clusters["n_resampled"], clusters["resampled"])
    return MetricValue(f"{name}.{MACRO}", value, len(probs), ci, profile, stems,
                       join_flags(thin(units, what), dropped_flag(ci, dropped, ONE_CLASS)),
                       {"labels": [names[j] for j in usable], **clusters, "dropped_resamples": dropped})


def tstr_metrics(probs_synthetic, probs_real, labels, names: Sequence[str], *, min_positives: int, min_negatives: int,
                 profiles: tuple[str, str], stems: str = "", n_boot: int = 1000, seed: int = 0,
                 train_sizes: dict | None = None, groups: Sequence | None = None) -> list[MetricValue]:
    """Train on synthetic, test on real: per-label and macro AUROC of both classifiers on the same real scans, and
    the gap (trained on real minus trained on synthetic) with a paired bootstrap CI (the same resampled scans;
    ``groups``: their stems, so that a patient's scans are resampled together, as in :func:`label_aurocs`)."""
    extra = {"train": train_sizes or {}}
    kw = {"min_positives": min_positives, "min_negatives": min_negatives, "stems": stems, "n_boot": n_boot,
          "seed": seed, "groups": groups}
    synth = label_aurocs(probs_synthetic, labels, names, name="tstr.synthetic", profile=profiles[0], **kw)
    real = label_aurocs(probs_real, labels, names, name="tstr.real", profile=profiles[1], **kw)
    units, clusters = report_groups(groups, len(labels), "volumes")
    ps, pr, y = (np.asarray(a, np.float64) for a in (probs_synthetic, probs_real, labels))
    gaps = []
    for j, (a, b) in enumerate(zip(real, synth)):
        label = a.name.rsplit(".", 1)[1]
        if a.value is None or b.value is None:
            gaps.append(MetricValue(f"tstr.gap.{label}", None, a.n, profile=f"{profiles[1]} - {profiles[0]}",
                                    stems=stems, flag=a.flag or b.flag))
            continue
        cols = [names.index(label)] if label != MACRO else [names.index(n) for n in a.extra["labels"]]

        def gap(idx: np.ndarray, cols=cols) -> float:
            # NaN (a dropped resample) where some label has one class only: the same labels in every resample
            return float(np.mean([_auroc_or_nan(pr[idx, c], y[idx, c]) - _auroc_or_nan(ps[idx, c], y[idx, c])
                                  for c in cols]))

        ci, dropped = bootstrap_ci(gap, len(y), n_boot=n_boot, seed=seed, groups=units)
        if label != MACRO:  # one label's gap: its smaller class, counted as label_aurocs counted it
            few = smaller_class(a.extra.get("n_positive_units", a.extra["n_positive"]),
                                a.extra.get("n_negative_units", a.extra["n_negative"]),
                                clusters.get("resampled", "volumes"))
        else:
            few = thin(a.n) if units is None else thin(clusters["n_resampled"], clusters["resampled"])
        gaps.append(MetricValue(f"tstr.gap.{label}", a.value - b.value, a.n, ci, f"{profiles[1]} - {profiles[0]}",
                                stems, join_flags(few, dropped_flag(ci, dropped, ONE_CLASS)),
                                {**clusters, "dropped_resamples": dropped}))
    for m in (*synth, *real, *gaps):
        m.extra.update(extra)
    return [*synth, *real, *gaps]


def alignment_metrics(cos_gen, cos_real, similarity, ranks_gen, ranks_real, n_candidates: int, ks: Sequence[int], *,
                      profile: str, stems: str, n_boot: int = 1000, seed: int = 0,
                      groups: Sequence | None = None) -> list[MetricValue]:
    """CLIP score (generated, real ceiling), image similarity, retrieval top-k with chance (generated, real).

    One row per generated volume (the real side: its report's scan); ``groups``: each row's report stem, so that
    the CIs resample reports where one prompted several volumes (CT-RATE patients, see :func:`label_aurocs`)."""
    from ctgen.metrics.retrieval import top_k_accuracy

    kw = {"profile": profile, "stems": stems, "n_boot": n_boot, "seed": seed, "groups": groups}
    out = [mean_with_ci(100.0 * np.maximum(np.asarray(cos_gen, np.float64), 0.0), "clip_score.generated", **kw),
           mean_with_ci(100.0 * np.maximum(np.asarray(cos_real, np.float64), 0.0), "clip_score.real", **kw),
           mean_with_ci(similarity, "image_similarity", **kw)]
    for m in out[:2]:
        m.extra["note"] = "100 x max(cosine, 0): uncalibrated, read it beside retrieval"
    for k in ks:
        out.append(top_k_accuracy(ranks_gen, k, n_candidates, f"retrieval.top{k}.generated", **kw))
        out.append(top_k_accuracy(ranks_real, k, n_candidates, f"retrieval.top{k}.real", **kw))
    return out


def hu_metrics(gen_stats: list[dict], real_stats: list[dict], n_flags: Sequence[int], *, stems: str,
               n_boot: int = 1000, seed: int = 0, gen_groups: Sequence | None = None,
               real_groups: Sequence | None = None, real_stems: str | None = None) -> list[MetricValue]:
    """Per tissue: mean over volumes of the volume's median HU (generated, real); share of generated volumes flagged.
    ``stems``, ``real_stems``: the stems hashes of each side (``real_stems`` defaults to ``stems``); ``gen_groups``,
    ``real_groups``: the volumes' stems (the CIs resample reports or patients, see :func:`label_aurocs`)."""
    out = []
    sides = (("generated", gen_stats, gen_groups, stems), ("real", real_stats, real_groups, real_stems or stems))
    for tissue in TISSUES:
        for side, stats, groups, hashed in sides:
            m = mean_with_ci([s[tissue]["median"] for s in stats], f"hu.{tissue}_median.{side}", profile="hu-thresholds",
                             stems=hashed, n_boot=n_boot, seed=seed, groups=groups)
            m.extra["interval_hu"] = list(TISSUES[tissue])
            out.append(m)
    flagged = mean_with_ci((np.asarray(n_flags) > 0).astype(float), "hu.flagged_share", profile="hu-thresholds",
                           stems=stems, n_boot=n_boot, seed=seed, groups=gen_groups)
    return [*out, flagged]
