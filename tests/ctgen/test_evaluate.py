"""The evaluation of a sampling run end to end on the tiny cascade, and the run comparison."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ctgen.jobs import evaluate
from ctgen.jobs.sample import sample_to_files
from ctgen.jobs.train import run_training
from ctgen.pipelines.text_to_ct import SampleSettings

from tests.ctgen.tiny import WINDOW

CLIP = {"model": {"stem_stride": [2, 4, 4], "channels": [8, 16], "blocks": [1, 1], "norm_groups": 4, "embed_dim": 16,
                  "text_dim": 16},
        "text_encoder": {"dim": 16, "depth": 1, "heads": 2, "dropout": 0.0, "max_length": 32},
        "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "tensorboard": False, "seed": 0}}
CLASSIFIER = {"model": {"stem_stride": [2, 4, 4], "channels": [8, 16], "blocks": [1, 1], "norm_groups": 4,
                        "pos_weight": "auto"},
              "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "tensorboard": False, "seed": 0}}


@pytest.fixture(scope="module")
def run(cohort, tiny_cascade, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    text = {"text_tokenizer": str(tiny_cascade / "text_tokenizer.json"), "prompt": "generatect", "max_length": 32}
    data = {"manifests": [cohort["manifest"]], "hu_window": WINDOW, **text}
    clip = run_training("clip", {**CLIP, "data": dict(data)}, root / "clip", root / "ckpt")
    classifier = run_training("classifier", {**CLASSIFIER, "data": dict(data)}, root / "classifier", root / "ckpt")
    prompts = pd.read_parquet(cohort["prompts"])
    pairs = [(n.split(".nii")[0], p) for n, p in zip(prompts["VolumeName"], prompts["generatect"])][:4]
    settings = SampleSettings(steps=2, guidance_scale=2.0)
    sample_to_files(tiny_cascade, pairs, root / "a", settings, seed=0)
    metrics = evaluate.evaluate_run(root / "a" / "samples.csv", [cohort["manifest"]], clip, classifier, text,
                                    root / "eval", {"tstr": True}, WINDOW, classifier_cfg={**CLASSIFIER, "data": dict(data)},
                                    checkpoint_root=root / "ckpt")
    return {"root": root, "metrics": metrics, "clip": clip, "classifier": classifier, "text": text, "pairs": pairs}


def test_metrics_file_holds_every_metric(run):
    m = json.loads((run["root"] / "eval" / "metrics.json").read_text())
    assert m == json.loads(json.dumps(run["metrics"]))
    assert m["n_generated"] == 4 and m["n_paired"] == 4
    assert set(m["fid_2d"]) == {"axial", "coronal", "sagittal", "mean"}
    assert np.isclose(m["fid_2d"]["mean"], np.mean([m["fid_2d"][p] for p in ("axial", "coronal", "sagittal")]))
    assert m["fvd"]["clip"] >= 0 and m["fvd"]["classifier"] >= 0
    assert 0 <= m["clip_score"]["generated"] <= 100 and 0 <= m["clip_score"]["real"] <= 100
    assert set(m["faithfulness"]["real"]) >= {"Cardiomegaly", "macro"}
    assert m["tstr"]["macro"].keys() == {"trtr", "tstr", "gap"}
    assert m["provenance"]["ctgen_version"]


def test_per_volume_rows_and_histograms(run):
    rows = pd.read_csv(run["root"] / "eval" / "per_volume.csv")
    assert len(rows) == 4 and rows["clip_score"].between(0, 100).all()
    assert {"hu_lung_median", "hu_bone_median", "n_hu_flags"} <= set(rows.columns)
    hist = json.loads((run["root"] / "eval" / "hu_histograms.json").read_text())
    assert len(hist["edges"]) == len(hist["generated"]) + 1
    assert np.isclose(np.sum(np.asarray(hist["real"]) * np.diff(hist["edges"])), 1.0, atol=1e-6)  # a density


def test_runs_are_compared_pairwise(run, tmp_path):
    root = run["root"]
    a = pd.read_csv(root / "eval" / "per_volume.csv")
    same = evaluate.compare_runs(root / "eval" / "per_volume.csv", root / "eval" / "per_volume.csv", n_permutations=200)
    assert (same["p_value"] == 1.0).all() and (same["diff"] == 0).all()
    shifted = a.assign(clip_score=a["clip_score"] + 50)
    shifted.to_csv(tmp_path / "shifted.csv", index=False)
    diff = evaluate.compare_runs(root / "eval" / "per_volume.csv", tmp_path / "shifted.csv", tmp_path / "cmp.csv")
    row = diff.set_index("metric").loc["clip_score"]
    assert row["n_pairs"] == 4 and abs(row["diff"]) == pytest.approx(50) and (tmp_path / "cmp.csv").is_file()
    from ctgen.cli import main

    assert main(["compare", str(root / "eval" / "per_volume.csv"), str(tmp_path / "shifted.csv"),
                 "--permutations", "500", "--out", str(tmp_path / "cli.csv")]) == 0
    assert pd.read_csv(tmp_path / "cli.csv").set_index("metric").loc["clip_score", "n_pairs"] == 4


def test_guidance_sweep_samples_each_scale(run, cohort, tiny_cascade, tmp_path):
    prompts = tmp_path / "prompts.csv"
    pd.DataFrame({"id": [p for p, _ in run["pairs"][:2]], "prompt": [t for _, t in run["pairs"][:2]]}).to_csv(prompts)
    sampling = {"steps": 2, "temperature": 1.0, "batch_size": 8, "seed": 0, "sr_steps": None}
    out = evaluate.guidance_sweep(tiny_cascade, prompts, [1.0, 4.0], sampling, run["clip"], run["classifier"],
                                  [cohort["manifest"]], run["text"], tmp_path / "sweep.csv", WINDOW)
    assert list(out["guidance_scale"]) == [1.0, 4.0] and out["clip_score"].between(0, 100).all()
    assert (out["fid_axial"] >= 0).all()
