"""The evaluation's reported numbers from per-volume outputs: per-label AUROC with its guard, TSTR, alignment, HU."""

from __future__ import annotations

import numpy as np
import pytest

from ctgen.jobs.score import alignment_metrics, hu_metrics, label_aurocs, tstr_metrics
from ctgen.metrics.faithfulness import auroc
from ctgen.metrics.hu import tissue_stats

NAMES = ["Cardiomegaly", "Pleural effusion", "Emphysema"]


def scored(n: int, signal: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels (n, 3) and probabilities that follow them with strength ``signal`` (0: none)."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 3)) < 0.4).astype(float)
    y[:, 2] = 0.0  # Emphysema: no positive at all
    y[0, 2] = 1.0  # ... but one
    return signal * y + rng.normal(0, 1, (n, 3)), y


def test_label_aurocs_values_guard_and_record():
    p, y = scored(80, 1.5)
    y[3, 0] = np.nan  # unknown: left out of that label only
    out = {m.name: m for m in label_aurocs(p, y, NAMES, name="faith", min_positives=5, min_negatives=5,
                                           profile="classifier3d@ab", stems="s1", n_boot=200)}
    known = ~np.isnan(y[:, 0])
    assert out["faith.Cardiomegaly"].value == pytest.approx(auroc(p[known, 0], y[known, 0]))
    assert out["faith.Cardiomegaly"].n == 79 and out["faith.Pleural effusion"].n == 80
    emph = out["faith.Emphysema"]
    assert emph.value is None and emph.ci is None and "1 positives" in emph.flag and emph.extra["n_positive"] == 1
    macro = out["faith.macro"]
    assert macro.extra["labels"] == ["Cardiomegaly", "Pleural effusion"]  # the guarded label is left out
    assert macro.value == pytest.approx(np.mean([out["faith.Cardiomegaly"].value, out["faith.Pleural effusion"].value]))
    for m in out.values():
        assert m.profile == "classifier3d@ab" and m.stems == "s1"
        if m.value is not None:
            assert m.ci[0] <= m.value <= m.ci[1]


def test_label_aurocs_move_the_right_way():
    p_good, y = scored(120, 2.0, seed=1)
    p_none, _ = scored(120, 0.0, seed=1)
    good = {m.name: m for m in label_aurocs(p_good, y, NAMES, name="f", min_positives=5, min_negatives=5, n_boot=200)}
    none = {m.name: m for m in label_aurocs(p_none, y, NAMES, name="f", min_positives=5, min_negatives=5, n_boot=200)}
    assert good["f.macro"].ci[0] > none["f.macro"].ci[1]  # a faithful generator's volumes score above noise
    assert none["f.macro"].ci[0] < 0.5 < none["f.macro"].ci[1]  # noise: chance inside its CI


def test_tstr_gap_is_paired_and_points_the_right_way():
    p_real, y = scored(150, 2.0, seed=2)  # trained on real: learns the labels
    p_synth = 0.5 * y + np.random.default_rng(3).normal(0, 1, y.shape)  # trained on synthetic: weaker
    out = {m.name: m for m in tstr_metrics(p_synth, p_real, y, NAMES, min_positives=5, min_negatives=5,
                                           profiles=("tstr-synthetic@1", "tstr-real@2"), n_boot=200,
                                           train_sizes={"synthetic": {"volumes": 8}})}
    gap = out["tstr.gap.macro"]
    assert gap.value == pytest.approx(out["tstr.real.macro"].value - out["tstr.synthetic.macro"].value)
    assert gap.ci[0] > 0  # real training wins, beyond the paired CI
    assert out["tstr.gap.Emphysema"].value is None and out["tstr.gap.Emphysema"].flag
    assert out["tstr.synthetic.Cardiomegaly"].profile == "tstr-synthetic@1"
    assert gap.extra["train"] == {"synthetic": {"volumes": 8}}
    same = {m.name: m for m in tstr_metrics(p_real, p_real, y, NAMES, min_positives=5, min_negatives=5,
                                            profiles=("a", "a"), n_boot=100)}
    assert same["tstr.gap.macro"].value == 0 and same["tstr.gap.macro"].ci == (0.0, 0.0)  # paired: no spread


def test_alignment_reads_against_chance():
    rng = np.random.default_rng(4)
    cos = rng.uniform(-0.2, 0.6, 50)
    ranks = np.concatenate([np.ones(30, int), np.full(20, 7)])
    out = {m.name: m for m in alignment_metrics(cos, cos + 0.1, rng.uniform(0, 1, 50), ranks, np.ones(50, int), 10,
                                                (1, 5), profile="clip3d@1", stems="h")}
    assert out["clip_score.generated"].value == pytest.approx(np.mean(100 * np.maximum(cos, 0)))
    assert out["retrieval.top1.generated"].value == pytest.approx(0.6)
    assert out["retrieval.top1.generated"].extra["chance"] == pytest.approx(0.1)
    assert out["retrieval.top5.generated"].extra["chance"] == pytest.approx(0.5)
    assert out["retrieval.top1.real"].value == 1.0
    assert all(m.n == 50 and m.profile == "clip3d@1" and m.ci is not None for m in out.values())


def test_hu_metrics_means_and_flag_share():
    rng = np.random.default_rng(5)
    real = [tissue_stats(rng.choice([-1000, -800, -100, 40, 500], size=(8, 8, 8)) + rng.normal(0, 5, (8, 8, 8)))
            for _ in range(6)]
    gen = [tissue_stats(rng.normal(-300, 10, (8, 8, 8))) for _ in range(4)]
    out = {m.name: m for m in hu_metrics(gen, real, [1, 0, 2, 0], stems="h", n_boot=100)}
    assert out["hu.lung_median.real"].value == pytest.approx(np.mean([s["lung"]["median"] for s in real]))
    assert out["hu.flagged_share"].value == 0.5 and out["hu.flagged_share"].n == 4
    assert out["hu.bone_median.generated"].value is None and out["hu.bone_median.generated"].extra["n_nan"] == 4


def test_several_volumes_of_one_report_resample_reports():
    """Two volumes per report share its labels: a CI over volumes would be ~1/sqrt(2) too narrow; over reports it is
    as wide as with one volume per report. One volume per report: the same numbers as without groups."""
    p, y = scored(60, 1.0, seed=4)
    twice_p, twice_y = np.repeat(p, 2, axis=0), np.repeat(y, 2, axis=0)  # each report's two volumes, alike
    reports = np.repeat(np.arange(60), 2)
    kw = {"name": "f", "min_positives": 5, "min_negatives": 5, "n_boot": 2000, "seed": 1}
    width = lambda ms: {m.name: m.ci[1] - m.ci[0] for m in ms if m.ci}  # noqa: E731
    once = width(label_aurocs(p, y, NAMES, **kw))
    naive = width(label_aurocs(twice_p, twice_y, NAMES, **kw))
    grouped_ms = label_aurocs(twice_p, twice_y, NAMES, groups=reports, **kw)
    grouped = width(grouped_ms)
    for name in ("f.Cardiomegaly", "f.macro"):
        assert naive[name] < 0.85 * once[name]  # pseudo-replication narrows the CI
        assert grouped[name] == pytest.approx(once[name], rel=0.2)
    macro = {m.name: m for m in grouped_ms}["f.macro"]
    assert macro.extra["resampled"] == "reports" and macro.extra["n_reports"] == 60 and macro.n == 120
    singles = label_aurocs(p, y, NAMES, groups=[f"r{i}" for i in range(60)], **kw)
    assert [(m.value, m.ci) for m in singles] == [(m.value, m.ci) for m in label_aurocs(p, y, NAMES, **kw)]
    assert "resampled" not in singles[-1].extra
    with pytest.raises(ValueError, match="groups"):
        label_aurocs(p, y, NAMES, groups=reports, **kw)  # 120 groups for 60 volumes


def test_alignment_and_means_resample_reports_too():
    rng = np.random.default_rng(5)
    cos = np.repeat(rng.normal(0.3, 0.2, 50), 2)
    ranks = np.repeat(rng.integers(1, 10, 50), 2)
    reports = np.repeat(np.arange(50), 2)
    kw = {"profile": "clip@1", "stems": "s", "n_boot": 2000}
    naive = {m.name: m for m in alignment_metrics(cos, cos, cos, ranks, ranks, 10, [1, 5], **kw)}
    grouped = {m.name: m for m in alignment_metrics(cos, cos, cos, ranks, ranks, 10, [1, 5], groups=reports, **kw)}
    for name in ("clip_score.generated", "image_similarity", "retrieval.top5.generated"):
        g, n = grouped[name], naive[name]
        assert g.value == n.value and g.extra["n_reports"] == 50
        assert (g.ci[1] - g.ci[0]) > 1.2 * (n.ci[1] - n.ci[0])
