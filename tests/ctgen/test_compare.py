"""Two runs (two generator families) compared pair by pair on the same reports and seeds."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import mannwhitneyu

from ctgen.jobs.compare import compare_families, compare_runs, pair_runs, paired_differences
from ctprep.errors import UserError

LABELS = ["Emphysema", "Pleural effusion"]


def run_table(p: np.ndarray, y: np.ndarray, clip: np.ndarray, seed0: int = 0) -> pd.DataFrame:
    n = len(y)
    table = pd.DataFrame({"prompt_id": [f"valid_{i // 2}_a_1" for i in range(n)], "repeat": [i % 2 for i in range(n)],
                          "seed": np.arange(n) + seed0, "clip_score": clip})
    for j, label in enumerate(LABELS):
        table[f"p_{label}"], table[f"y_{label}"] = p[:, j], y[:, j]
    return table


def auc(p, y) -> float:
    """AUROC from scipy's Mann-Whitney U (an independent reference)."""
    known = ~np.isnan(y)
    p, y = p[known], y[known]
    return mannwhitneyu(p[y == 1], p[y == 0]).statistic / ((y == 1).sum() * (y == 0).sum())


@pytest.fixture()
def two_runs():
    rng = np.random.default_rng(0)
    y = (rng.uniform(size=(60, 2)) < 0.4).astype(float)
    y[3, 1] = np.nan  # an unknown label
    good = np.clip(0.55 * y + 0.2 + 0.2 * rng.normal(size=y.shape), 0, 1)
    noise = rng.uniform(size=y.shape)
    return y, run_table(good, y, rng.uniform(20, 30, 60)), run_table(noise, y, rng.uniform(10, 20, 60))


def test_macro_auroc_difference_against_scipy(two_runs):
    y, a, b = two_runs
    recs = {r.name: r for r in paired_differences(a, b, ("cascade", "latent_flow"), prefix="families.x",
                                                  n_boot=200, n_permutations=500)}
    r = recs["families.x.faithfulness.macro_auroc_diff"]
    pa, pb = a[[f"p_{x}" for x in LABELS]].to_numpy(), b[[f"p_{x}" for x in LABELS]].to_numpy()
    ref_a = np.mean([auc(pa[:, j], y[:, j]) for j in range(2)])
    ref_b = np.mean([auc(pb[:, j], y[:, j]) for j in range(2)])
    assert r.value == pytest.approx(ref_a - ref_b, abs=1e-12)
    assert r.extra["value_a"] == pytest.approx(ref_a) and r.extra["value_b"] == pytest.approx(ref_b)
    assert (r.extra["a"], r.extra["b"]) == ("cascade", "latent_flow")
    assert r.ci[0] < r.value < r.ci[1] and r.ci[0] > 0  # the good run is better, and the CI says so
    assert r.extra["p_value"] < 0.01 and r.n == 60 and r.flag is None and r.stems
    clip = recs["families.x.clip_score_diff"]
    assert clip.value == pytest.approx((a["clip_score"] - b["clip_score"]).mean()) and clip.extra["p_value"] < 0.01
    agree = recs["families.x.faithfulness.agreement_diff"]
    assert agree.value > 0 and agree.extra["p_value"] < 0.01


def test_pairs_follow_report_and_repeat_not_row_order(two_runs):
    _, a, b = two_runs
    shuffled = b.sample(frac=1.0, random_state=1)
    m = pair_runs(a, shuffled)
    assert len(m) == 60 and (m["seed_a"] == m["seed_b"]).all()
    same = paired_differences(a, a.sample(frac=1.0, random_state=2), n_permutations=200)
    assert all(r.value == pytest.approx(0.0) and r.extra["p_value"] == 1.0 for r in same)


def test_a_volume_one_run_lost_leaves_its_pair_out(two_runs):
    """A volume missing from one run (listed in its skipped.csv) must not shift that report's other repeats onto
    other seeds: pairs join on the repeat."""
    _, a, b = two_runs
    m = pair_runs(a, b.drop(index=[0]))  # report 0's repeat 0 lost
    assert len(m) == 59 and (m["seed_a"] == m["seed_b"]).all() and (m["repeat_a"] == m["repeat_b"]).all()


def test_few_reports_are_flagged_however_many_repeats():
    """The CIs and the permutation test resample whole reports: 4 reports x 5 repeats are 4 units, not 20."""
    rng = np.random.default_rng(3)
    n = 20
    y = np.tile([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]], (5, 1))
    a, b = (pd.DataFrame({"prompt_id": [f"r{i % 4}" for i in range(n)], "repeat": [i // 4 for i in range(n)],
                          "clip_score": rng.uniform(20, 30, n) + shift}) for shift in (2.0, 0.0))
    for j, label in enumerate(LABELS):
        for t in (a, b):
            t[f"p_{label}"], t[f"y_{label}"] = rng.uniform(size=n), y[:, j]
    recs = paired_differences(a, b, n_boot=100, n_permutations=1000)
    assert recs and all(r.n == 20 and r.flag and "4 reports" in r.flag for r in recs)
    clip = next(r for r in recs if r.name.endswith("clip_score_diff"))
    assert clip.extra["exact"] and clip.extra["p_value"] >= 2 / 16  # 2^4 swaps of whole reports: p >= 1/8


def test_the_few_reports_flag_counts_the_reports_that_hold_the_metric():
    """30 reports x 2 repeats, but a CLIP score on 3 of them only (no text for the others): the CLIP score
    difference rests on 3 reports and is flagged so; the image similarity, on all 30, is not."""
    rng = np.random.default_rng(6)
    ids, rep = [f"r{i:02d}" for i in range(30) for _ in range(2)], [k for _ in range(30) for k in range(2)]
    a, b = (pd.DataFrame({"prompt_id": ids, "repeat": rep, "clip_score": np.r_[rng.normal(20 + shift, 2, 6),
                                                                                [np.nan] * 54],
                          "image_similarity": rng.normal(0.5, 0.1, 60)}) for shift in (1.0, 0.0))
    recs = {r.name: r for r in paired_differences(a, b, n_boot=100, n_permutations=200)}
    clip, sim = recs["compare.clip_score_diff"], recs["compare.image_similarity_diff"]
    assert clip.n == 6 and clip.extra["n_resampled"] == 3 and "only 3 reports" in clip.flag
    assert sim.n == 60 and sim.extra["n_resampled"] == 30 and sim.flag is None


def test_reports_of_one_ct_rate_patient_pair_as_one_unit():
    """Two scans of each of 4 CT-RATE patients (8 reports, one volume each): the patients are the units, so the
    flag counts 4 and the exact test enumerates 2^4 swaps of whole patients."""
    rng = np.random.default_rng(4)
    stems = [f"valid_{i % 4}_{'ab'[i // 4]}_1" for i in range(8)]
    a, b = (pd.DataFrame({"prompt_id": stems, "repeat": 0, "clip_score": rng.uniform(20, 30, 8) + shift})
            for shift in (2.0, 0.0))
    clip = paired_differences(a, b, n_boot=100, n_permutations=1000)[0]
    assert clip.n == 8 and "only 4 patients" in clip.flag and clip.extra["n_resampled"] == 4
    assert clip.extra["exact"] and clip.extra["p_value"] >= 2 / 16


def test_a_macro_auroc_diff_without_a_ci_says_why():
    """One positive report of 40 in each label: most resamples lose one (1 - 0.64^2), the macro AUROC difference
    has no CI, and its flag gives the share of resamples that held one class (it read as a result with no interval)."""
    rng = np.random.default_rng(5)
    y = np.zeros((40, 2))
    y[3, 0] = y[7, 1] = 1.0
    a, b = (pd.DataFrame({"prompt_id": [f"r{i}" for i in range(40)], "repeat": 0}) for _ in range(2))
    for j, label in enumerate(LABELS):
        for t in (a, b):
            t[f"p_{label}"], t[f"y_{label}"] = rng.uniform(size=40), y[:, j]
    r = paired_differences(a, b, n_boot=200, n_permutations=200)[0]
    assert r.name.endswith("macro_auroc_diff") and r.value is not None and r.ci is None
    assert r.extra["dropped_resamples"] > 0.5
    assert f"no CI: {r.extra['dropped_resamples']:.0%} of the resamples held one class" in r.flag


def test_runs_scored_on_other_labels_or_reports_are_refused(two_runs):
    y, a, b = two_runs
    other = b.copy()
    other["y_Emphysema"] = 1 - other["y_Emphysema"]
    with pytest.raises(UserError, match="different labels"):
        paired_differences(a, other)
    with pytest.raises(UserError, match="share no reports"):
        paired_differences(a, b.assign(prompt_id="train_1_a_1"))


def test_families_json_and_the_cli_table(two_runs, tmp_path):
    _, a, b = two_runs
    for name, table in (("a", a), ("b", b)):
        table.to_csv(tmp_path / f"{name}.csv", index=False)
        (tmp_path / f"{name}.json").write_text(json.dumps({"metrics": [
            {"name": "faithfulness.generated.macro", "value": 0.7, "n": 60, "extra": {"labels": ["Emphysema"]}}]}))
    summary = compare_families({"cascade": (tmp_path / "a.json", tmp_path / "a.csv"),
                                "latent_flow": (tmp_path / "b.json", tmp_path / "b.csv")},
                               tmp_path / "f.json", tmp_path / "f.csv", n_boot=100, n_permutations=200)
    macro = next(r for r in summary["metrics"] if r["name"].endswith("macro_auroc_diff"))
    assert macro["name"] == "families.cascade-latent_flow.faithfulness.macro_auroc_diff"
    assert macro["extra"]["labels"] == ["Emphysema"]  # the labels both evaluations averaged, no more
    table = pd.read_csv(tmp_path / "f.csv")
    assert set(table["a"]) == {"cascade"} and set(table["b"]) == {"latent_flow"}
    cli = compare_runs(tmp_path / "a.csv", tmp_path / "b.csv", n_permutations=200)
    assert {"clip_score", "faithfulness.macro_auroc", "faithfulness.agreement"} <= set(cli["metric"])


def test_ctgen_compare_averages_only_labels_that_pass_the_guard(two_runs, tmp_path):
    """Without metrics.json beside the runs, the macro takes the evaluation's default guard (5 positive and 5
    negative reports); with them, the labels both evaluations averaged."""
    y, a, b = two_runs
    for t in (a, b):
        t["y_Emphysema"] = 0.0
        t.loc[t["prompt_id"] == "valid_0_a_1", "y_Emphysema"] = 1.0  # one positive report (two volumes)
    for name, t in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        t.to_csv(tmp_path / name / "per_volume.csv", index=False)
    runs = [tmp_path / name / "per_volume.csv" for name in "ab"]
    row = compare_runs(*runs, n_permutations=200).set_index("metric").loc["faithfulness.macro_auroc"]
    pa = a["p_Pleural effusion"].to_numpy()
    assert row["mean_a"] == pytest.approx(auc(pa, a["y_Pleural effusion"].to_numpy()))  # Emphysema left out
    for name in "ab":
        (tmp_path / name / "metrics.json").write_text(json.dumps({"metrics": [
            {"name": "faithfulness.generated.macro", "value": 0.7, "n": 60, "extra": {"labels": []}}]}))
    assert "faithfulness.macro_auroc" not in set(compare_runs(*runs, n_permutations=200)["metric"])


def test_a_hand_edited_cell_or_metrics_file_is_named(two_runs, tmp_path, capsys):
    """A metric cell that is no number and a metrics.json that is no JSON are one line each, naming the file (and
    the column, row and report), as is a negative --seed."""
    from ctgen.cli import main

    _, a, b = two_runs
    a["clip_score"] = a["clip_score"].astype(object)
    a.loc[4, "clip_score"] = "high"
    for name, t in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        t.to_csv(tmp_path / name / "per_volume.csv", index=False)
    runs = [str(tmp_path / name / "per_volume.csv") for name in "ab"]
    with pytest.raises(UserError, match=r"a/per_volume.csv: column clip_score holds 'high' in row 6 "
                                        r"\(prompt_id valid_2_a_1\), not a number"):
        compare_runs(*runs, n_permutations=200)
    b["p_Emphysema"] = b["p_Emphysema"].astype(object)
    b.loc[0, "p_Emphysema"] = "0,7"
    b.to_csv(runs[1], index=False)
    with pytest.raises(UserError, match="column p_Emphysema holds '0,7' in row 2"):
        compare_runs(runs[1], runs[1], n_permutations=200)
    (tmp_path / "b" / "metrics.json").write_text("{not json")
    b.loc[0, "p_Emphysema"] = 0.7
    b.to_csv(runs[1], index=False)
    with pytest.raises(UserError, match="metrics.json is not valid evaluation metrics.json"):
        compare_runs(runs[1], runs[1], n_permutations=200)
    with pytest.raises(SystemExit):
        main(["compare", *runs, "--seed", "-1"])
    assert "not a seed" in capsys.readouterr().err
