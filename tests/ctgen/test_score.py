"""The evaluation's reported numbers from per-volume outputs: per-label AUROC with its guard, TSTR, alignment, HU."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ctgen.jobs.pairing import read_labels
from ctgen.jobs.score import alignment_metrics, hu_metrics, label_aurocs, tstr_metrics
from ctgen.metrics.faithfulness import auroc
from ctgen.metrics.hu import tissue_stats
from ctgen.metrics.summary import percentile_ci
from ctprep.ctrate import LABELS
from ctprep.errors import UserError

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
    similarity = rng.uniform(0, 1, 50)
    ranks = np.concatenate([np.ones(30, int), np.full(20, 7)])
    out = {m.name: m for m in alignment_metrics(cos, cos + 0.1, similarity, ranks, np.ones(50, int), 10,
                                                (1, 5), profile="clip3d@1", stems="h")}
    assert out["clip_score.generated"].value == pytest.approx(np.mean(100 * np.maximum(cos, 0)))
    assert out["clip_score.real"].value == pytest.approx(np.mean(100 * np.maximum(cos + 0.1, 0)))  # each side its own
    assert out["image_similarity"].value == pytest.approx(np.mean(similarity))  # the raw cosine, generated vs real
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


def test_real_reconstructions_resample_patients_in_tstr_and_hu():
    """The real scans of TSTR and the HU ceiling: CT-RATE reconstructions of one patient's scan (alike) are one
    unit, so their CIs are as wide as with one scan per patient; each HU side carries its own stems hash."""
    p_real, y = scored(60, 1.0, seed=6)
    p_synth = p_real + np.random.default_rng(8).normal(0, 1, y.shape)
    stems = [f"valid_{i}_a_{r}" for i in range(60) for r in (1, 2)]
    kw = {"min_positives": 5, "min_negatives": 5, "profiles": ("s", "r"), "n_boot": 1000}
    width = lambda ms, name: [m.ci[1] - m.ci[0] for m in ms if m.name == name][0]  # noqa: E731
    once = tstr_metrics(p_synth, p_real, y, NAMES, **kw)
    twice = [np.repeat(x, 2, axis=0) for x in (p_synth, p_real, y)]
    naive, grouped = tstr_metrics(*twice, NAMES, **kw), tstr_metrics(*twice, NAMES, groups=stems, **kw)
    for name in ("tstr.gap.macro", "tstr.real.macro"):
        assert width(naive, name) < 0.85 * width(once, name), name
        assert width(grouped, name) == pytest.approx(width(once, name), rel=0.2), name
    gap = [m for m in grouped if m.name == "tstr.gap.macro"][0]
    assert gap.extra["resampled"] == "patients" and gap.extra["n_resampled"] == 60
    rng = np.random.default_rng(9)
    real = [tissue_stats(rng.normal(-700, 50, (6, 6, 6))) for _ in range(30)]
    real_stems = [f"valid_{i}_a_{r}" for i in range(15) for r in (1, 2)]
    out = {m.name: m for m in hu_metrics(real[:8], real, [0] * 8, stems="gen", real_stems="real", n_boot=100,
                                         gen_groups=[f"g{i}" for i in range(8)], real_groups=real_stems)}
    assert out["hu.lung_median.real"].stems == "real" and out["hu.lung_median.generated"].stems == "gen"
    assert out["hu.lung_median.real"].extra["n_resampled"] == 15 and "resampled" not in out["hu.lung_median.generated"].extra


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
    assert macro.extra["resampled"] == "reports" and macro.extra["n_resampled"] == 60 and macro.n == 120
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
        assert g.value == n.value and g.extra["n_resampled"] == 50
        assert (g.ci[1] - g.ci[0]) > 1.2 * (n.ci[1] - n.ci[0])


def test_the_guard_counts_reports_where_a_report_prompted_several_volumes():
    """Five volumes of one positive report are one positive: the guard and the thin-data flag count reports."""
    rng = np.random.default_rng(2)
    y = np.zeros((8, 3))
    y[0, 0] = 1.0  # one positive report of 8
    y[1:6, 1] = 1.0  # five positive reports for the second label
    p = y + rng.normal(0, 1, y.shape)
    reports = np.repeat(np.arange(8), 5)
    out = {m.name: m for m in label_aurocs(np.repeat(p, 5, axis=0), np.repeat(y, 5, axis=0), NAMES, name="f",
                                           min_positives=2, min_negatives=2, n_boot=200, groups=reports)}
    card = out["f.Cardiomegaly"]
    assert card.value is None and "1 positive and 7 negative reports" in card.flag
    assert card.extra["n_positive"] == 5 and card.extra["n_positive_units"] == 1
    effusion = out["f.Pleural effusion"]
    assert effusion.value is not None and effusion.extra["n_positive_units"] == 5
    assert "only 3 negative reports" in effusion.flag and effusion.n == 40  # the smaller class: 3 of 8 reports
    assert out["f.macro"].extra["labels"] == ["Pleural effusion"] and "only 8 reports" in out["f.macro"].flag


def test_a_label_with_few_units_of_one_class_is_flagged_however_many_volumes():
    """6 positives among 200 volumes: the label's CI rests on the 6 (it undercovers), so it is flagged with their
    count (patients where the bootstrap resamples patients), in TSTR too; the macro, over 200, is not."""
    rng = np.random.default_rng(0)
    y = np.zeros((200, 3))
    y[:6, 0] = 1.0  # Cardiomegaly: 6 positives
    y[:100, 1] = 1.0  # Pleural effusion: balanced
    y[:, 2] = np.nan
    p = y + rng.normal(0, 1, y.shape)
    kw = {"min_positives": 5, "min_negatives": 5, "n_boot": 200}
    out = {m.name: m for m in label_aurocs(p, y, NAMES, name="f", **kw)}
    assert out["f.Cardiomegaly"].value is not None and out["f.Cardiomegaly"].flag.startswith("only 6 positive volumes")
    assert out["f.Pleural effusion"].flag is None and out["f.macro"].flag is None
    patients = [f"valid_{i}_a_{r}" for i in range(100) for r in (1, 2)]  # 2 reconstructions each: alike
    twice = [np.repeat(x[:100], 2, axis=0) for x in (p, y)]
    twice[1][:, 0] = 0.0
    twice[1][:12, 0] = 1.0  # 12 positive volumes, 6 positive patients
    grouped = {m.name: m for m in label_aurocs(*twice, NAMES, name="f", groups=patients, **kw)}
    assert grouped["f.Cardiomegaly"].flag.startswith("only 6 positive patients")
    tstr = {m.name: m for m in tstr_metrics(p + 0.5, p, y, NAMES, profiles=("s", "r"), **kw)}
    for name in ("tstr.gap.Cardiomegaly", "tstr.real.Cardiomegaly", "tstr.synthetic.Cardiomegaly"):
        assert tstr[name].flag.startswith("only 6 positive volumes"), name
    assert tstr["tstr.gap.Pleural effusion"].flag is None and tstr["tstr.gap.macro"].flag is None


def test_a_macro_resample_that_loses_a_labels_class_is_dropped_not_averaged_over_fewer_labels():
    """Label A is read perfectly, B backwards with few positives: the macro is 0.5 in every resample that holds
    both classes of both labels; a resample without B's positives is dropped (and counted)."""
    rng = np.random.default_rng(0)
    ya = np.r_[np.ones(20), np.zeros(20)]
    yb = np.zeros(40)
    yb[[0, 25]] = 1.0
    p = np.c_[ya + 0.1 * rng.random(40), 1.0 - yb - 0.1 * rng.random(40), rng.random(40)]
    y = np.c_[ya, yb, np.zeros(40)]
    macro = label_aurocs(p, y, NAMES, name="f", min_positives=2, min_negatives=2, n_boot=400, seed=3)[-1]
    assert macro.value == pytest.approx(0.5) and macro.ci == pytest.approx((0.5, 0.5))
    assert macro.extra["dropped_resamples"] > 0.05  # (38/40)^40 ~ 13% of resamples lose both of B's positives


def test_a_ci_from_few_or_no_kept_resamples_says_so():
    """One positive among 200 volumes: ~37% of the resamples lose it, the CI is over the others (flagged as
    conditional); the macro over three such labels loses ~75% and has no CI (flagged with that share)."""
    rng = np.random.default_rng(0)
    y = np.zeros((200, 4))
    y[:100, 0] = 1.0
    for j in (1, 2, 3):
        y[rng.choice(200, 1), j] = 1.0
    names = [*NAMES, "Atelectasis"]
    out = {m.name: m for m in label_aurocs(rng.random((200, 4)), y, names, name="f", min_positives=1, min_negatives=5,
                                           n_boot=500)}
    assert out["f.Cardiomegaly"].extra["dropped_resamples"] == 0 and out["f.Cardiomegaly"].flag is None
    b = out["f.Pleural effusion"]
    assert b.ci is not None and b.extra["dropped_resamples"] > 0.3
    assert f"CI conditional on the kept resamples: {b.extra['dropped_resamples']:.0%} held one class" in b.flag
    macro = out["f.macro"]
    assert macro.ci is None and f"no CI: {macro.extra['dropped_resamples']:.0%} of the resamples held one class" \
        in macro.flag
    p = rng.random((200, 4))
    tstr = {m.name: m for m in tstr_metrics(p, p + rng.normal(0, 0.1, p.shape), y, names, min_positives=1,
                                            min_negatives=5, profiles=("s", "r"), n_boot=500)}
    assert tstr["tstr.gap.macro"].ci is None and "no CI" in tstr["tstr.gap.macro"].flag
    assert "CI conditional" in tstr["tstr.gap.Emphysema"].flag


def test_percentile_ci_needs_at_least_half_the_resamples():
    assert percentile_ci([1.0] * 100 + [float("nan")] * 101, 201)[0] is None  # 50.2% dropped
    assert percentile_ci([1.0] * 101 + [float("nan")] * 100, 201)[0] == (1.0, 1.0)


def test_a_label_table_cell_that_is_no_number_is_refused(tmp_path):
    row = {"VolumeName": "valid_1_a_1.nii.gz", **{label: 0 for label in LABELS}}
    pd.DataFrame([row, {**row, "VolumeName": "valid_2_a_1.nii.gz", "Emphysema": ""}]).to_csv(tmp_path / "ok.csv",
                                                                                           index=False)
    labels = read_labels(tmp_path / "ok.csv")
    assert np.isnan(labels["valid_2_a_1"][LABELS.index("Emphysema")])  # blank: unknown
    pd.DataFrame([{**row, "Emphysema": "yes"}]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(UserError, match="row 2 holds a label that is not 0, 1 or blank"):
        read_labels(tmp_path / "bad.csv")
