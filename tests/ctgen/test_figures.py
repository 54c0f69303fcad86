"""The report's figures from small synthetic run outputs: PNGs of the right size and content."""

from __future__ import annotations

import json
import struct

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from ctgen.jobs.figures import (FIGURES, MODELS, WIDTH_IN, WINDOWS, FigureConfig, choose_prompts, key_term, make_figures,
                           mid_slices, plot_hu_histograms, plot_samples, plot_tstr)
from ctgen.metrics.hu import hu_histogram
from ctprep.shards import merge_manifests, write_shards
from ctprep.volume import Volume, save_nifti

LABELS = ["Emphysema", "Atelectasis", "Lung nodule"]
GEN_HU, REAL_HU = -1400, -600  # generated: black in the lung window (below -1350); real: mid-grey (the window's centre)


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
    metrics = {"n_generated": 6, "n_real": 3,
               "fid_2d": {"axial": 120.5, "coronal": 130.0, "sagittal": None, "mean": 125.2},
               "fvd": {"clip": 12.3, "classifier": 4.5}, "clip_score": {"generated": 21.0, "real": 28.0},
               "image_similarity": 0.5,
               "faithfulness": {"generated": {"Emphysema": 0.6, "Atelectasis": None, "Lung nodule": 0.5, "macro": 0.55},
                                "real": {"Emphysema": 0.8, "Atelectasis": None, "Lung nodule": 0.7, "macro": 0.75}},
               "tstr": {k: {"trtr": 0.8, "tstr": 0.6, "gap": 0.2} for k in [*LABELS, "macro"]},
               "hu_flags": [{"sample": "valid_0_a_1_s0", "tissue": "bone", "value": 250.0, "low": 320.0,
                             "high": 700.0, "reason": "median below the real range"}],
               "provenance": {"seed": 0, "ctgen_version": "0.1"}}
    (root / "metrics.json").write_text(json.dumps(metrics))
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
    pd.DataFrame({"guidance_scale": [1.0, 3.0, 2.0], "clip_score": [20, 23, 22],
                  "fid_axial": [120, 125, 110]}).to_csv(root / "sweep.csv", index=False)
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


def test_tstr_null_and_bad_histograms(run, tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"tstr": None}))
    assert png_size(plot_tstr(tmp_path / "m.json", tmp_path / "t.png", dpi=50))[0] == round(WIDTH_IN * 50)
    (tmp_path / "h.json").write_text(json.dumps({"edges": [0, 1, 2], "generated": [1.0], "real": [1.0]}))
    with pytest.raises(ValueError, match="len"):
        plot_hu_histograms(tmp_path / "h.json", tmp_path / "h.png")
