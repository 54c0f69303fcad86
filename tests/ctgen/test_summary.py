"""The reported-number record and its bootstrap CI."""

import numpy as np
import pytest

from ctgen.metrics.summary import bootstrap_ci, mean_with_ci, stems_hash


def test_bootstrap_ci_of_a_mean_matches_the_normal_approximation():
    x = np.random.default_rng(0).normal(5.0, 2.0, size=400)
    (lo, hi), dropped = bootstrap_ci(lambda idx: x[idx].mean(), len(x), n_boot=2000)
    se = x.std(ddof=1) / np.sqrt(len(x))  # an independent computation of the same interval
    # within ~2 Monte-Carlo standard errors of the quantiles (~0.006 at 2,000 resamples); a 90% interval is 0.03 off
    assert dropped == 0 and abs(lo - (x.mean() - 1.96 * se)) < 0.012 and abs(hi - (x.mean() + 1.96 * se)) < 0.012
    assert 0.94 < (hi - lo) / (2 * 1.96 * se) < 1.06


def test_undefined_resamples_are_dropped_and_counted():
    labels = np.array([1] + [0] * 9)  # one positive: many resamples hold none
    ci, dropped = bootstrap_ci(lambda idx: np.nan if labels[idx].sum() == 0 else 1.0, len(labels), n_boot=500)
    assert 0.2 < dropped < 0.5 and ci == (1.0, 1.0)
    assert bootstrap_ci(lambda idx: 1.0, 1) == (None, 1.0)


def test_mean_with_ci_and_stems():
    m = mean_with_ci([1.0, 2.0, np.nan, 3.0], "x", profile="p", stems=stems_hash(["b", "a"]))
    assert m.n == 3 and m.value == 2.0 and m.ci[0] < 2.0 < m.ci[1] and m.extra["n_nan"] == 1
    assert m.stems == stems_hash(["a", "b"]) != stems_hash(["a"])
    assert m.to_json()["ci"] == list(m.ci)


def test_the_groups_of_values_left_out_are_left_out_too():
    """NaN values are dropped with their report: the groups stay beside their values. Two reports of 6 volumes,
    where report a's values are all 0 and b's all 10, a NaN in a's: every resample of whole reports is 0 or 10,
    or their volume-weighted mix; groups shifted by one would put a 10 in a's group."""
    values = [np.nan] + [0.0] * 5 + [10.0] * 6
    groups = ["a"] * 6 + ["b"] * 6
    m = mean_with_ci(values, "x", groups=groups, n_boot=300)
    assert m.extra["n_resampled"] == 2 and m.extra["resampled"] == "reports" and m.n == 11 and m.value == pytest.approx(60 / 11)
    assert m.ci[0] == pytest.approx(0.0) and m.ci[1] == pytest.approx(10.0)  # whole reports drawn: all a's or all b's


def test_thin_numbers_are_flagged():
    few = mean_with_ci([1.0, 2.0, 3.0, 4.0, 5.0], "x")
    assert few.ci is not None and "only 5 volumes" in few.flag
    assert mean_with_ci(np.arange(20.0), "x").flag is None
    assert "only 9 volumes" in mean_with_ci(np.arange(9.0), "x").flag  # the boundary: 10 is enough, 9 is not
    assert mean_with_ci(np.arange(10.0), "x").flag is None
    assert "k = 5" in mean_with_ci([1.0] * 3, "y", flag="k = 5 >= 3 candidates").flag  # both reasons kept
    none = mean_with_ci([np.nan, np.nan], "y", flag="k = 5 >= 3 candidates")  # and where no value is finite
    assert none.value is None and "k = 5" in none.flag and "no finite values" in none.flag


def test_cluster_bootstrap_draws_whole_groups():
    """Each value twice (two volumes of one report): resampling pairs would narrow the CI by about sqrt(2);
    resampling the groups gives exactly the CI of the values taken once (the same draws, one per group)."""
    x = np.random.default_rng(1).normal(0.0, 1.0, size=60)
    twice, groups = np.repeat(x, 2), np.repeat(np.arange(60), 2)
    once, _ = bootstrap_ci(lambda idx: x[idx].mean(), len(x), n_boot=1000, seed=3)
    grouped, _ = bootstrap_ci(lambda idx: twice[idx].mean(), len(twice), n_boot=1000, seed=3, groups=groups)
    naive, _ = bootstrap_ci(lambda idx: twice[idx].mean(), len(twice), n_boot=1000, seed=3)
    assert np.allclose(grouped, once)
    assert (naive[1] - naive[0]) < 0.8 * (once[1] - once[0])
    assert bootstrap_ci(lambda idx: 1.0, 4, groups=np.zeros(4)) == (None, 1.0)  # one group: no interval


def test_independent_units_are_ct_rate_patients_else_the_stems():
    """Scans and reconstructions of one CT-RATE patient are one unit; other names are their own units."""
    from ctgen.metrics.summary import independent_units, report_groups

    names = ["valid_1_a_1", "valid_1_a_2", "valid_1_b_1.nii.gz", "valid_12_a_1", "train_12_a_1"]
    units, what = independent_units(names)
    assert list(units) == ["valid_1", "valid_1", "valid_1", "valid_12", "train_12"] and what == "patients"
    units, what = independent_units(["case_a", "case_a", "valid_1_a_1"], fallback="volumes")
    assert list(units) == ["case_a", "case_a", "valid_1_a_1"] and what == "volumes"  # a mixed set says nothing
    groups, extra = report_groups(names, 5)
    assert extra == {"resampled": "patients", "n_resampled": 3} and len(groups) == 5
    assert report_groups(["valid_1_a_1", "valid_2_a_1"], 2) == (None, {})  # one volume per patient: plain bootstrap


def test_reconstructions_of_one_patient_do_not_narrow_the_ci():
    """Three reconstructions of each of 40 patients' scans carry nearly the same value: a CI over the 120
    volumes would be ~1/sqrt(3) as wide as over the 40 patients; resampling patients keeps it as wide as
    one volume per patient."""
    rng = np.random.default_rng(7)
    per_patient = rng.normal(0.0, 1.0, 40)
    stems = [f"valid_{i}_a_{r}" for i in range(40) for r in (1, 2, 3)]
    values = np.repeat(per_patient, 3) + rng.normal(0, 0.01, 120)
    once = mean_with_ci(per_patient, "x", n_boot=2000)
    naive = mean_with_ci(values, "x", n_boot=2000)
    grouped = mean_with_ci(values, "x", n_boot=2000, groups=stems)
    width = lambda m: m.ci[1] - m.ci[0]  # noqa: E731
    assert width(naive) < 0.7 * width(once) and width(grouped) == pytest.approx(width(once), rel=0.15)
    assert grouped.extra == {"n_nan": 0, "resampled": "patients", "n_resampled": 40} and grouped.n == 120


def test_one_stem_per_patient_resamples_exactly_as_the_stems_did():
    """Repeats of one report per patient (the demo's sweep): the patients are the stems' partition, and the
    resamples are the ones the stems gave (a patient order of their own drew other resamples: other CIs)."""
    from ctgen.jobs.score import label_aurocs

    rng = np.random.default_rng(3)
    stems = [f"valid_{i}_a_1" for i in range(30) for _ in range(2)]
    values = rng.normal(size=60)
    m = mean_with_ci(values, "x", groups=stems, n_boot=200)
    ci, _ = bootstrap_ci(lambda idx: values[idx].mean(), 60, n_boot=200, groups=np.asarray(stems))
    assert m.ci == ci and m.extra["resampled"] == "patients" and m.extra["n_resampled"] == 30
    y = (rng.uniform(size=(60, 1)) < 0.5).astype(float)
    scans = [f"valid_{i // 2}_{'ab'[i % 2]}_1" for i in range(60)]  # two scans of each of 30 patients
    out = label_aurocs(rng.uniform(size=(60, 1)), y, ["Cardiomegaly"], name="f", min_positives=2, min_negatives=2,
                       n_boot=50, groups=scans)
    assert [m.extra["resampled"] for m in out] == ["patients", "patients"]  # the macro as its label says
