"""The report's figures from small synthetic run outputs: PNGs of the right size and content."""

from __future__ import annotations

import base64
import json
import struct

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from ctgen.jobs.figures import (FIGURES, MODELS, WIDTH_IN, WINDOWS, FigureConfig, choose_prompts, key_term, make_figures,
                           mid_slices, plot_faithfulness, plot_hu_histograms, plot_samples, plot_tstr)
from ctgen.jobs.figure_list import TABLES
from ctgen.jobs.tables import GROUPS, write_intro, write_tables
from ctgen.metrics.hu import hu_histogram
from ctgen.metrics.summary import MetricValue
from ctprep.shards import merge_manifests, write_shards
from ctprep.volume import Volume, save_nifti

LABELS = ["Emphysema", "Atelectasis", "Lung nodule"]
GEN_HU, REAL_HU = -1400, -600  # generated: black in the lung window (below -1350); real: mid-grey (the window's centre)


def metrics_json(labels=LABELS) -> dict:
    """A metrics.json as ctgen evaluate writes it: MetricValue records of every group, one label flagged."""
    recs = []
    for side, base in (("generated", 0.6), ("real", 0.8)):
        for i, label in enumerate(labels):
            if label == "Atelectasis":
                recs.append(MetricValue(f"faithfulness.{side}.{label}", None, 6, profile="classifier3d@ab",
                                        stems="s" * 16, flag="0 positives and 6 negatives: an AUROC needs >= 5 and >= 5"))
            else:
                recs.append(MetricValue(f"faithfulness.{side}.{label}", base + 0.05 * i, 6, (base - 0.2, base + 0.15),
                                        "classifier3d@ab", "s" * 16))
        recs.append(MetricValue(f"faithfulness.{side}.macro", base, 6, (base - 0.1, base + 0.1), "classifier3d@ab", "s" * 16))
    for plane, v in (("axial", 120.5), ("coronal", 130.0), ("sagittal", 110.0), ("mean", 120.2)):
        recs.append(MetricValue(f"fid_2d.slicenet.{plane}", v, 6, (v - 10, v + 10), "slicenet2d@cd", "s" * 16))
    recs.append(MetricValue("fd_3d.clip", 12.3, 6, (8.0, 15.0), "clip3d@ef", "s" * 16, "6 feature rows <= 64 dimensions"))
    recs += [MetricValue("clip_score.generated", 21.0, 6, (19.0, 23.0), "clip3d@ef", "s" * 16),
             MetricValue("clip_score.real", 28.0, 6, (26.0, 30.0), "clip3d@ef", "s" * 16),
             MetricValue("image_similarity", 0.5, 6, (0.4, 0.6), "clip3d@ef", "s" * 16)]
    for k in (1, 5):
        for side, v in (("generated", 0.3), ("real", 0.7)):
            recs.append(MetricValue(f"retrieval.top{k}.{side}", v, 6, (v - 0.2, v + 0.2), "clip3d@ef", "s" * 16,
                                    extra={"k": k, "n_candidates": 10, "chance": k / 10}))
    for side in ("synthetic", "real"):
        for label in [*labels, "macro"]:
            recs.append(MetricValue(f"tstr.{side}.{label}", 0.7, 3, (0.5, 0.9), f"tstr-{side}@1", "t" * 16))
    recs.append(MetricValue("hu.lung_median.generated", -700.0, 6, (-720.0, -680.0), "hu-thresholds", "s" * 16))
    recs.append(MetricValue("hu.flagged_share", 0.5, 6, (0.2, 0.8), "hu-thresholds", "s" * 16))
    return {"metrics": [r.to_json() for r in recs], "not_computed": [],
            "n": {"predictions": 7, "scored": 6, "skipped_predictions": 1, "skipped_ground_truth": 0},
            "provenance": {"seed": 0, "ctgen_version": "0.1"}}


def sweep_frame() -> pd.DataFrame:
    """guidance_sweep.csv: one row per scale and metric."""
    rows = []
    for scale, (clip, r1, fid) in {1.0: (20, 0.2, 120), 3.0: (23, 0.4, 125), 2.0: (22, 0.3, 110)}.items():
        for metric, value, chance in (("clip_score", clip, None), ("retrieval.top1", r1, 1 / 3),
                                      ("fid_2d.slicenet.axial", fid, None)):
            rows.append({"guidance_scale": scale, "metric": metric, "value": value, "ci_low": value * 0.9,
                         "ci_high": value * 1.1, "n": 3, "profile": "net@1", "stems": "x", "flag": None, "chance": chance})
    return pd.DataFrame(rows)


def png_size(path) -> tuple[int, int]:
    head = open(path, "rb").read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])  # (width, height) from the IHDR chunk


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run in miniature: 3 real valid volumes in shards, 2 generated NIfTIs per prompt
    for 3 prompts, 5 training logs and the evaluation files."""
    root = tmp_path_factory.mktemp("run")
    affine = np.diag([1.5, 1.5, 4.0, 1.0])  # anisotropic, as real scans are
    real = [{"key": f"valid_{i}_a_1", "volume": Volume.from_3d(np.full((24, 20, 10), REAL_HU, np.int16), affine),
             "prompt": f"{40 + i} years old male: emphysema.", "prompts": {}, "meta": {},
             "labels": np.zeros(18, np.uint8)} for i in range(3)]
    write_shards(real, root / "c0", prefix="valid-c0", shard_size=2, split="valid")
    merge_manifests([root / "c0/valid-c0.manifest.json"], root / "valid.json", split="valid")
    rows = []
    for i in range(3):
        for rep in range(2):
            path = root / f"gen/valid_{i}_a_1_s{2 * i + rep}.nii.gz"
            path.parent.mkdir(exist_ok=True)
            save_nifti(Volume.from_3d(np.full((16, 16, 8), GEN_HU, np.int16), np.diag([2.0, 2.0, 5.0, 1.0])), path)
            rows.append({"prompt_id": f"valid_{i}_a_1", "repeat": rep, "seed": 2 * i + rep,
                         "prompt": f"{40 + i} years old male: " + "emphysema and a long finding text " * 8,
                         "nifti": str(path), "sidecar": "", "dicom": ""})
    pd.DataFrame(rows).to_csv(root / "samples.csv", index=False)
    inputs = {"samples": str(root / "samples.csv"), "valid": str(root / "valid.json")}
    rng = np.random.default_rng(0)
    for model in MODELS:
        steps = np.arange(10, 210, 10)
        pd.DataFrame({"step": steps, "lr": 1e-3, "loss": np.geomspace(5, 0.05, 20), "grad_norm": 1.0,
                      "accuracy": np.linspace(0, 1, 20), "steps_per_s": 3.0}).to_csv(root / f"{model}.csv", index=False)
        inputs[model] = str(root / f"{model}.csv")
    (root / "metrics.json").write_text(json.dumps(metrics_json()))
    gen_h, edges = hu_histogram(rng.normal(-300, 400, 20_000))
    real_h, _ = hu_histogram(rng.normal(-500, 500, 20_000))
    (root / "hist.json").write_text(json.dumps({"edges": edges.tolist(), "generated": gen_h.tolist(),
                                                "real": real_h.tolist()}))
    pv = pd.DataFrame({"sample": [f"s{i}" for i in range(6)], "prompt_id": [r["prompt_id"] for r in rows],
                       "seed": range(6), "clip_score": rng.uniform(15, 25, 6),
                       "clip_score_real": rng.uniform(25, 30, 6),
                       "image_similarity": 0.5, "n_hu_flags": [1, 0, 0, 0, 0, 0],
                       **{f"hu_{t}_median": rng.normal(c, 20, 6) for t, c in
                          [("air", -1000), ("lung", -800), ("fat", -100), ("soft_tissue", 40), ("bone", 500)]}})
    pv.to_csv(root / "per_volume.csv", index=False)
    pd.DataFrame([{"stem": "valid_9_a_1", "side": "generated", "path": "gen/valid_9_a_1.nii.gz",
                   "reason": "no ground truth with this stem"}]).to_csv(root / "skipped.csv", index=False)
    sweep_frame().to_csv(root / "sweep.csv", index=False)
    inputs |= {"metrics": str(root / "metrics.json"), "per_volume": str(root / "per_volume.csv"),
               "histograms": str(root / "hist.json"), "sweep": str(root / "sweep.csv")}
    return {"root": root, "inputs": inputs}


def test_every_figure_is_a_png_of_the_figure_width(run):
    cfg = FigureConfig(dpi=60)
    outputs = {name: str(run["root"] / f"fig/{name}.png") for name in FIGURES}
    written = make_figures(run["inputs"], outputs, cfg)
    assert [str(p) for p in written] == [outputs[n] for n in FIGURES]
    for name in FIGURES:
        width, height = png_size(outputs[name])
        assert width == round(WIDTH_IN * cfg.dpi), (name, width)
        assert 100 <= height <= 1500, (name, height)
        assert (run["root"] / f"fig/{name}.png").stat().st_size > 8_000, name  # drawn, not an empty canvas
        img = mpimg.imread(outputs[name])[..., :3]
        assert img.std() > 0.05, name  # not a blank page


def test_slice_figure_shows_generated_left_of_real(run, tmp_path):
    out = plot_samples(run["inputs"]["samples"], run["inputs"]["valid"], tmp_path / "s.png",
                       FigureConfig(prompts=("valid_1_a_1",), window="lung", dpi=60))
    grey = mpimg.imread(out)[..., :3].mean(-1)  # (rows, cols) in [0, 1]
    half = grey.shape[1] // 2
    left, right = grey[:, :half], grey[:, half:]
    dark = lambda a: (a < 0.1).mean()  # noqa: E731  generated at -1400 HU
    mid = lambda a: ((a > 0.4) & (a < 0.6)).mean()  # noqa: E731  real at the lung window's centre
    assert dark(left) > 0.15 and dark(right) < 0.02, (dark(left), dark(right))
    assert mid(right) > 0.15 and mid(left) < 0.02, (mid(left), mid(right))


def test_slice_figure_grows_with_prompts_and_windows(run, tmp_path):
    def height(**kw):
        return png_size(plot_samples(run["inputs"]["samples"], run["inputs"]["valid"], tmp_path / "s.png",
                                     FigureConfig(dpi=40, **kw)))[1]

    one_lung = height(prompts=("valid_0_a_1",), window="lung")
    assert height(prompts=("valid_0_a_1",), window="both") > one_lung
    assert height(prompts=("valid_0_a_1", "valid_2_a_1"), window="lung") > one_lung
    assert height(max_prompts=2, window="lung") == height(prompts=("valid_0_a_1", "valid_2_a_1"), window="lung")


def test_prompt_choice_follows_the_config():
    samples = pd.DataFrame({"prompt_id": ["a", "a", "b", "c", "d", "e"]})
    assert choose_prompts(samples, FigureConfig()) == ["a", "b", "c", "d"]
    assert choose_prompts(samples, FigureConfig(max_prompts=2)) == ["a", "b"]
    assert choose_prompts(samples, FigureConfig(prompts=["e", "zz", "b"])) == ["e", "b"]
    with pytest.raises(ValueError, match="no sampled prompt"):
        choose_prompts(samples, FigureConfig(prompts=["zz"]))


def test_config_rejects_typos_and_bad_values():
    assert FigureConfig.from_dict({"prompts": [], "window": "lung", "dpi": 90}).windows == ("lung",)
    assert FigureConfig.from_dict(None).windows == tuple(WINDOWS)
    with pytest.raises(ValueError, match="unknown figures config keys"):
        FigureConfig.from_dict({"windw": "lung"})
    with pytest.raises(ValueError, match="window"):
        FigureConfig(window="bone")


def test_mid_slices_are_in_radiological_orientation():
    vol = np.zeros((5, 7, 9), np.int16)  # (D, H, W): inferior->superior, posterior->anterior, left->right
    vol[2, 6, 8] = 1  # mid axial slice, most anterior, patient's rightmost voxel
    vol[4, 3, 8] = 2  # most superior, mid coronal slice, patient's rightmost
    vol[4, 6, 4] = 3  # most superior, most anterior, mid sagittal slice
    s = mid_slices(vol, (1.0, 2.0, 3.0))
    assert s["axial"][0][0, 0] == 1  # anterior up, patient's right on the viewer's left
    assert s["coronal"][0][0, 0] == 2  # superior up, patient's right on the left
    assert s["sagittal"][0][0, 0] == 3  # superior up, anterior on the left
    assert s["axial"][1] == (0, 9.0, 0, 14.0) and s["sagittal"][1] == (0, 14.0, 0, 15.0)  # extents in mm


def test_key_term_prefers_the_models_own_term():
    m = pd.DataFrame({"step": [1], "loss": [1.0], "grad_norm": [1.0], "perplexity": [3.0], "recon_loss": [0.5]})
    assert key_term("tokenizer", m) == "recon_loss"
    assert key_term("unknown_model", m) == "perplexity"
    assert key_term("generator", m[["step", "loss"]]) is None


def test_faithfulness_figure_grows_with_labels_and_says_why_a_label_is_empty(run, tmp_path):
    (tmp_path / "few.json").write_text(json.dumps(metrics_json(LABELS[:2])))
    few = png_size(plot_faithfulness(tmp_path / "few.json", tmp_path / "few.png", dpi=50))[1]
    assert png_size(plot_faithfulness(run["inputs"]["metrics"], tmp_path / "all.png", dpi=50))[1] > few
    flagged = metrics_json()
    flagged["metrics"] = [dict(r, value=None, ci=None, flag="0 positives") if r["name"].startswith("faithfulness.") else r
                          for r in flagged["metrics"]]
    (tmp_path / "none.json").write_text(json.dumps(flagged))
    assert png_size(plot_faithfulness(tmp_path / "none.json", tmp_path / "none.png", dpi=50))[0] == round(WIDTH_IN * 50)


def test_every_metric_lands_in_one_table_with_n_and_profile_in_its_caption(run, tmp_path):
    outputs = {f"{name}_{kind}": str(tmp_path / f"{name}.{kind if kind != 'caption' else 'rst'}")
               for name in TABLES for kind in ("html", "csv", "caption")}
    write_tables(run["inputs"]["metrics"], run["root"] / "skipped.csv", run["inputs"]["sweep"], outputs)
    metrics = json.loads((run["root"] / "metrics.json").read_text())["metrics"]
    listed = []
    for name in dict.fromkeys(GROUPS.values()):
        table = pd.read_csv(outputs[f"{name}_csv"])
        listed += list(table["metric"])
        caption = (tmp_path / f"{name}.rst").read_text()
        assert "n = 6" in caption or "n = 3" in caption, (name, caption)
        html = (tmp_path / f"{name}.html").read_text()
        assert "<table>" in html and "<caption>" in html and "profile" in html
    assert sorted(listed) == sorted(r["name"] for r in metrics)  # every number, in exactly one table
    assert "1 of" in (tmp_path / "distribution.rst").read_text()  # the flagged Fréchet distance is counted
    assert "classifier3d@ab" in (tmp_path / "faithfulness.rst").read_text()
    assert "1 volumes left out" in (tmp_path / "skipped.rst").read_text()
    assert len(pd.read_csv(outputs["guidance_sweep_csv"])) == 9
    png = run["root"] / "f.png"
    plot_faithfulness(run["inputs"]["metrics"], png, dpi=40)
    intro = write_intro(png, tmp_path / "faithfulness.rst", tmp_path / "intro.rst").read_text()
    assert base64.b64encode(png.read_bytes()).decode() == "".join(intro.split("base64,")[1].split("\"")[0].split())
    assert ".. raw:: html" in intro and max(map(len, intro.splitlines())) < 10_000  # docutils refuses longer lines


def test_tstr_absent_and_bad_histograms(run, tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"metrics": []}))
    assert png_size(plot_tstr(tmp_path / "m.json", tmp_path / "t.png", dpi=50))[0] == round(WIDTH_IN * 50)
    (tmp_path / "h.json").write_text(json.dumps({"edges": [0, 1, 2], "generated": [1.0], "real": [1.0]}))
    with pytest.raises(ValueError, match="len"):
        plot_hu_histograms(tmp_path / "h.json", tmp_path / "h.png")
