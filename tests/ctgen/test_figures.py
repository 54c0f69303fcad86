"""The report's figures from small synthetic run outputs: PNGs of the right size and content."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from ctgen.jobs.compare import compare_families
from ctgen.jobs.figures import (FIGURES, MODELS, WIDTH_IN, WINDOWS, FigureConfig, choose_prompts, key_term, make_figures,
                                mid_slices, plot_alignment, plot_families, plot_faithfulness, plot_guidance_sweep,
                                plot_hu_histograms, plot_per_volume, plot_samples, plot_tstr)
from ctgen.jobs.figure_list import TABLES
from ctgen.jobs.tables import GROUPS, write_intro, write_tables
from ctgen.metrics.hu import hu_histogram
from ctgen.metrics.summary import MetricValue
from ctprep.shards import merge_manifests, write_shards
from ctprep.volume import Volume, save_nifti

LABELS = ["Emphysema", "Atelectasis", "Lung nodule"]
# in the lung window [-1350, 150]: the cascade's volumes black, the latent flow's white, the real scans mid-grey
FAMILY_HU = {"cascade": -1400, "latent_flow": 200}
REAL_HU = -600
FAMILIES = tuple(FAMILY_HU)


def metrics_json(labels=LABELS, shift: float = 0.0) -> dict:
    """A metrics.json as ctgen evaluate writes it: MetricValue records of every group, one label flagged;
    ``shift`` moves the generated AUROCs (another family)."""
    recs = []
    for side, base in (("generated", 0.6 + shift), ("real", 0.8)):
        for i, label in enumerate(labels):
            if label == "Atelectasis":
                recs.append(MetricValue(f"faithfulness.{side}.{label}", None, 6, profile="classifier3d@ab",
                                        stems="s" * 16, flag="0 positives and 6 negatives: an AUROC needs >= 5 and >= 5"))
            else:
                recs.append(MetricValue(f"faithfulness.{side}.{label}", base + 0.05 * i, 6, (base - 0.2, min(base + 0.15, 1)),
                                        "classifier3d@ab", "s" * 16))
        recs.append(MetricValue(f"faithfulness.{side}.macro", base, 6, (base - 0.1, base + 0.1), "classifier3d@ab", "s" * 16,
                                extra={"labels": ["Emphysema"]}))
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
    for scale, (auc, clip, r1, fid) in {1.0: (0.6, 20, 0.2, 120), 3.0: (0.8, 23, 0.4, 125), 2.0: (0.7, 22, 0.3, 110)}.items():
        for metric, value, chance in (("faithfulness.generated.macro", auc, None), ("clip_score", clip, None),
                                      ("retrieval.top1", r1, 1 / 3), ("fid_2d.slicenet.axial", fid, None)):
            rows.append({"guidance_scale": scale, "metric": metric, "value": value, "ci_low": value * 0.9,
                         "ci_high": value * 1.1, "n": 3, "profile": "net@1", "stems": "x", "flag": None, "chance": chance})
    for scale in (2.0, 3.0):  # each scale against the lowest, pair by pair
        rows.append({"guidance_scale": scale, "metric": "guidance.faithfulness.macro_auroc_diff", "value": scale / 10 - 0.1,
                     "ci_low": 0.01, "ci_high": 0.3, "n": 3, "profile": "net@1", "stems": "x", "flag": None,
                     "chance": None, "versus": 1.0, "p_value": 0.01})
    return pd.DataFrame(rows)


def png_size(path) -> tuple[int, int]:
    head = open(path, "rb").read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])  # (width, height) from the IHDR chunk


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run in miniature: 3 real valid volumes in shards; per family, 2 generated NIfTIs per prompt for
    3 prompts (the same seeds) and the evaluation files; the families' comparison; the training logs."""
    root = tmp_path_factory.mktemp("run")
    affine = np.diag([1.5, 1.5, 4.0, 1.0])  # anisotropic, as real scans are
    real = [{"key": f"valid_{i}_a_1", "volume": Volume.from_3d(np.full((24, 20, 10), REAL_HU, np.int16), affine),
             "prompt": f"{40 + i} years old male: emphysema.", "prompts": {}, "meta": {},
             "labels": np.zeros(18, np.uint8)} for i in range(3)]
    write_shards(real, root / "c0", prefix="valid-c0", shard_size=2, split="valid")
    merge_manifests([root / "c0/valid-c0.manifest.json"], root / "valid.json", split="valid")
    rng = np.random.default_rng(0)
    runs = {}
    for fi, (family, hu) in enumerate(FAMILY_HU.items()):
        base = root / family
        rows = []
        for i in range(3):
            for rep in range(2):
                path = base / f"gen/valid_{i}_a_1_s{2 * i + rep}.nii.gz"
                path.parent.mkdir(parents=True, exist_ok=True)
                save_nifti(Volume.from_3d(np.full((16, 16, 8), hu, np.int16), np.diag([2.0, 2.0, 5.0, 1.0])), path)
                rows.append({"prompt_id": f"valid_{i}_a_1", "repeat": rep, "seed": 2 * i + rep,
                             "prompt": f"{40 + i} years old male: " + "emphysema and a long finding text " * 8,
                             "nifti": str(path), "sidecar": "", "dicom": ""})
        pd.DataFrame(rows).to_csv(base / "samples.csv", index=False)
        (base / "metrics.json").write_text(json.dumps(metrics_json(shift=-0.2 * fi)))
        gen_h, edges = hu_histogram(rng.normal(-300 + 200 * fi, 400, 20_000))
        real_h, _ = hu_histogram(rng.normal(-500, 500, 20_000))
        (base / "hist.json").write_text(json.dumps({"edges": edges.tolist(), "generated": gen_h.tolist(),
                                                    "real": real_h.tolist()}))
        y = np.tile([1.0, 0.0], 3)
        pv = pd.DataFrame({"sample": [f"s{i}" for i in range(6)], "prompt_id": [r["prompt_id"] for r in rows],
                           "seed": range(6), "repeat": [r["repeat"] for r in rows],
                           "clip_score": rng.uniform(15, 25, 6) - 5 * fi, "clip_score_real": rng.uniform(25, 30, 6),
                           "image_similarity": 0.5, "retrieval_top1": rng.integers(0, 2, 6).astype(float),
                           "n_hu_flags": [1, 0, 0, 0, 0, fi], "p_Emphysema": np.clip(y * 0.8 + 0.1 + 0.3 * fi, 0, 1),
                           "y_Emphysema": y,
                           **{f"hu_{t}_median": rng.normal(c, 20, 6) for t, c in
                              [("air", -1000), ("lung", -800), ("fat", -100), ("soft_tissue", 40), ("bone", 500)]}})
        pv.to_csv(base / "per_volume.csv", index=False)
        pd.DataFrame([{"stem": "valid_9_a_1", "side": "generated", "path": "gen/valid_9_a_1.nii.gz",
                       "reason": "no ground truth with this stem"}]).to_csv(base / "skipped.csv", index=False)
        runs[family] = {"samples": str(base / "samples.csv"), "metrics": str(base / "metrics.json"),
                        "per_volume": str(base / "per_volume.csv"), "histograms": str(base / "hist.json"),
                        "skipped": str(base / "skipped.csv")}
    compare_families({f: (r["metrics"], r["per_volume"]) for f, r in runs.items()}, root / "families.json",
                     root / "families.csv", n_boot=100, n_permutations=200)
    shared = {"valid": str(root / "valid.json"), "families": str(root / "families.json")}
    for model in MODELS:
        steps = np.arange(10, 210, 10)
        pd.DataFrame({"step": steps, "lr": 1e-3, "loss": np.geomspace(5, 0.05, 20), "grad_norm": 1.0,
                      "accuracy": np.linspace(0, 1, 20), "steps_per_s": 3.0}).to_csv(root / f"{model}.csv", index=False)
        shared[model] = str(root / f"{model}.csv")
    sweep_frame().to_csv(root / "sweep.csv", index=False)
    shared["sweep"] = str(root / "sweep.csv")
    return {"root": root, "runs": runs, "shared": shared}


def of(run, key: str) -> dict:
    return {f: r[key] for f, r in run["runs"].items()}


def test_every_figure_is_a_png_of_the_figure_width(run):
    cfg = FigureConfig(dpi=60)
    outputs = {name: str(run["root"] / f"fig/{name}.png") for name in FIGURES}
    written = make_figures(run["runs"], run["shared"], outputs, cfg)
    assert [str(p) for p in written] == [outputs[n] for n in FIGURES]
    for name in FIGURES:
        width, height = png_size(outputs[name])
        assert width == round(WIDTH_IN * cfg.dpi), (name, width)
        assert 100 <= height <= 1500, (name, height)
        assert (run["root"] / f"fig/{name}.png").stat().st_size > 8_000, name  # drawn, not an empty canvas
        img = mpimg.imread(outputs[name])[..., :3]
        assert img.std() > 0.05, name  # not a blank page


def test_one_family_alone_draws_every_figure(run, tmp_path):
    """models.generators: [latent_flow] -- no cascade, hence no guidance sweep or TSTR, and nothing to compare."""
    runs = {"latent_flow": run["runs"]["latent_flow"]}
    compare_families({"latent_flow": (runs["latent_flow"]["metrics"], runs["latent_flow"]["per_volume"])},
                     tmp_path / "families.json", tmp_path / "families.csv")
    shared = {k: v for k, v in run["shared"].items() if k not in ("sweep", "tokenizer", "generator", "superres")}
    shared["families"] = str(tmp_path / "families.json")
    outputs = {name: str(tmp_path / f"{name}.png") for name in FIGURES}
    make_figures(runs, shared, outputs, FigureConfig(dpi=40))
    assert all(png_size(outputs[n])[0] == round(WIDTH_IN * 40) for n in FIGURES)
    assert "one generator family" in json.loads((tmp_path / "families.json").read_text())["not_computed"][0]["reason"]


def test_slice_figure_shows_real_then_each_family(run, tmp_path):
    out = plot_samples(of(run, "samples"), run["shared"]["valid"], tmp_path / "s.png",
                       FigureConfig(prompts=("valid_1_a_1",), window="lung", dpi=60))
    grey = mpimg.imread(out)[..., :3].mean(-1)  # (rows, cols) in [0, 1]
    third = grey.shape[1] // 3
    real, cascade, latent = grey[:, :third], grey[:, third:2 * third], grey[:, 2 * third:]
    dark = lambda a: (a < 0.1).mean()  # noqa: E731  the cascade's volumes at -1400 HU
    mid = lambda a: ((a > 0.4) & (a < 0.6)).mean()  # noqa: E731  real at the lung window's centre
    # (the families' titles are coloured: a few mid-grey pixels of text)
    assert mid(real) > 0.15 and mid(cascade) < 0.05 and mid(latent) < 0.05, (mid(real), mid(cascade), mid(latent))
    assert dark(cascade) > 0.15 and dark(real) < 0.05 and dark(latent) < 0.05, (dark(real), dark(cascade), dark(latent))
    white = lambda a: (a > 0.99).mean()  # noqa: E731  the latent flow's volumes at 200 HU, above the window
    assert white(latent) > white(cascade) + 0.2 and white(latent) > white(real) + 0.2


def test_slice_figure_decodes_only_the_chosen_real_scans(run, tmp_path, decoded_keys):
    """The job decoded every real volume it read past on the way to the chosen ones (the whole split, for a
    prompt late in it)."""
    plot_samples(of(run, "samples"), run["shared"]["valid"], tmp_path / "s.png",
                 FigureConfig(prompts=("valid_2_a_1",), window="lung", dpi=30))
    assert len(decoded_keys) == 1


def test_slice_figure_grows_with_prompts_and_windows(run, tmp_path):
    def height(**kw):
        return png_size(plot_samples(of(run, "samples"), run["shared"]["valid"], tmp_path / "s.png",
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
    few = png_size(plot_faithfulness({"cascade": tmp_path / "few.json"}, tmp_path / "few.png", dpi=50))[1]
    assert png_size(plot_faithfulness({"cascade": run["runs"]["cascade"]["metrics"]}, tmp_path / "all.png",
                                      dpi=50))[1] > few
    # a second family: a point more per label, so a taller figure
    two = png_size(plot_faithfulness(of(run, "metrics"), tmp_path / "two.png", dpi=50))[1]
    assert two >= png_size(tmp_path / "all.png")[1]
    flagged = metrics_json()
    flagged["metrics"] = [dict(r, value=None, ci=None, flag="0 positives") if r["name"].startswith("faithfulness.") else r
                          for r in flagged["metrics"]]
    (tmp_path / "none.json").write_text(json.dumps(flagged))
    assert png_size(plot_faithfulness({"cascade": tmp_path / "none.json"}, tmp_path / "none.png", dpi=50))[0] == \
        round(WIDTH_IN * 50)


def test_every_metric_lands_in_one_table_with_n_and_profile_in_its_caption(run, tmp_path):
    outputs = {f"{name}_{kind}": str(tmp_path / f"{name}.{kind if kind != 'caption' else 'rst'}")
               for name in TABLES for kind in ("html", "csv", "caption")}
    write_tables(of(run, "metrics"), of(run, "skipped"), run["shared"]["sweep"], run["shared"]["families"], outputs)
    listed = []
    for name in dict.fromkeys(GROUPS.values()):
        table = pd.read_csv(outputs[f"{name}_csv"])
        listed += list(zip(table["family"], table["metric"]))
        caption = (tmp_path / f"{name}.rst").read_text()
        assert "n = 6" in caption or "n = 3" in caption, (name, caption)
        html = (tmp_path / f"{name}.html").read_text()
        assert "<table>" in html and "<caption>" in html and "profile" in html
    expected = [(f, r["name"]) for f in FAMILIES for r in json.loads(Path(run["runs"][f]["metrics"]).read_text())["metrics"]]
    families = json.loads(Path(run["shared"]["families"]).read_text())["metrics"]
    expected += [(r["profile"], r["name"]) for r in families]
    assert sorted(listed) == sorted(expected)  # every number of every family and of the comparison, in one table
    assert any(n.endswith("faithfulness.macro_auroc_diff") for _, n in listed)
    assert "1 of" in (tmp_path / "distribution.rst").read_text() or "2 of" in (tmp_path / "distribution.rst").read_text()
    assert "classifier3d@ab" in (tmp_path / "faithfulness.rst").read_text()
    skipped = (tmp_path / "skipped.rst").read_text()
    assert "cascade: 1 volumes left out" in skipped and "latent flow: 1 volumes left out" in skipped
    assert set(pd.read_csv(outputs["skipped_csv"])["family"]) == set(FAMILIES)
    assert len(pd.read_csv(outputs["guidance_sweep_csv"])) == 14
    png = run["root"] / "f.png"
    plot_faithfulness(of(run, "metrics"), png, dpi=40)
    intro = write_intro(png, tmp_path / "faithfulness.rst", tmp_path / "intro.rst").read_text()
    assert base64.b64encode(png.read_bytes()).decode() == "".join(intro.split("base64,")[1].split("\"")[0].split())
    assert ".. raw:: html" in intro and max(map(len, intro.splitlines())) < 10_000  # docutils refuses longer lines
    # without a cascade: no guidance sweep, an empty table that says so
    write_tables({"latent_flow": run["runs"]["latent_flow"]["metrics"]},
                 {"latent_flow": run["runs"]["latent_flow"]["skipped"]}, None, run["shared"]["families"], outputs)
    assert pd.read_csv(outputs["guidance_sweep_csv"]).empty
    assert "no cascade" in (tmp_path / "guidance_sweep.rst").read_text()
    assert pd.read_csv(outputs["text_reliance_csv"]).empty  # no probe given: an empty table that says why
    assert "Not computed" in (tmp_path / "text_reliance.rst").read_text()


def test_the_text_reliance_probe_is_a_table(run, tmp_path):
    from ctgen.metrics.summary import MetricValue

    outputs = {f"{name}_{kind}": str(tmp_path / f"{name}.{kind if kind != 'caption' else 'rst'}")
               for name in TABLES for kind in ("html", "csv", "caption")}
    probe = [MetricValue(f"text_reliance.gain_vs_null@{t}", 0.01 * t, 64, (0.0, 0.02), profile="latent_flow:64").to_json()
             for t in (0.2, 0.8)]
    (tmp_path / "probe.json").write_text(json.dumps(probe))
    write_tables(of(run, "metrics"), of(run, "skipped"), run["shared"]["sweep"], run["shared"]["families"], outputs,
                 text_reliance_json=tmp_path / "probe.json")
    table = pd.read_csv(outputs["text_reliance_csv"])
    assert list(table["metric"]) == [r["name"] for r in probe] and (table["family"] == "latent_flow").all()
    assert table["value"].tolist() == pytest.approx([0.002, 0.008]) and (table["n"] == 64).all()
    caption = (tmp_path / "text_reliance.rst").read_text()
    assert "n = 64" in caption and "ignores the text" in caption and "stems" not in caption
    assert "no held-out latents: a gain may be memorisation" in caption
    heldout = probe + [MetricValue("text_reliance.heldout.gain_vs_null@0.8", -0.01, 50, (-0.02, 0.0),
                                   profile="latent_flow:50 held-out latents").to_json()]
    (tmp_path / "heldout.json").write_text(json.dumps(heldout))
    write_tables(of(run, "metrics"), of(run, "skipped"), run["shared"]["sweep"], run["shared"]["families"], outputs,
                 text_reliance_json=tmp_path / "heldout.json")
    assert pd.read_csv(outputs["text_reliance_csv"])["metric"].tolist()[-1] == "text_reliance.heldout.gain_vs_null@0.8"
    assert "held-out latents of the evaluation split" in (tmp_path / "text_reliance.rst").read_text()
    (tmp_path / "empty.json").write_text("[]")
    write_tables(of(run, "metrics"), of(run, "skipped"), run["shared"]["sweep"], run["shared"]["families"], outputs,
                 text_reliance_json=tmp_path / "empty.json")
    assert "text_probe_latents is 0" in (tmp_path / "text_reliance.rst").read_text()


def test_families_figure_marks_the_significant_differences(run, tmp_path):
    summary = json.loads(Path(run["shared"]["families"]).read_text())
    names = {r["name"].split(".", 2)[2]: r for r in summary["metrics"]}
    # the latent flow's probabilities sit 0.3 higher on both classes: the same ranking, so the same AUROC
    assert names["faithfulness.macro_auroc_diff"]["value"] == pytest.approx(0.0)
    assert names["clip_score_diff"]["value"] > 0  # the cascade's CLIP scores were drawn 5 higher
    assert png_size(plot_families(run["shared"]["families"], tmp_path / "f.png", dpi=50))[0] == round(WIDTH_IN * 50)


def test_tstr_absent_and_bad_histograms(run, tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"metrics": []}))
    assert png_size(plot_tstr(tmp_path / "m.json", tmp_path / "t.png", dpi=50))[0] == round(WIDTH_IN * 50)
    assert png_size(plot_tstr(None, tmp_path / "t.png", dpi=50))[0] == round(WIDTH_IN * 50)
    assert png_size(plot_guidance_sweep(None, tmp_path / "g.png", dpi=50))[0] == round(WIDTH_IN * 50)
    (tmp_path / "h.json").write_text(json.dumps({"edges": [0, 1, 2], "generated": [1.0], "real": [1.0]}))
    with pytest.raises(ValueError, match="len"):
        plot_hu_histograms({"cascade": tmp_path / "h.json"}, tmp_path / "h.png")


def _drawn(monkeypatch) -> list:
    """The matplotlib Figures the plotting functions save, kept for inspection."""
    from ctgen.jobs import figures

    kept, save = [], figures._save
    monkeypatch.setattr(figures, "_save", lambda fig, out, dpi: (kept.append(fig), save(fig, out, dpi))[1])
    return kept


def test_flagged_values_are_drawn_as_such_and_every_series_keeps_its_legend(run, tmp_path, monkeypatch):
    """The first label flagged (no value) used to take every series' legend entry with it; a thin value was drawn
    as a result, and a value without a CI as a CI of no width."""
    kept = _drawn(monkeypatch)
    first = metrics_json()
    names = [r["name"] for r in first["metrics"] if r["name"].startswith("faithfulness.generated.")]
    first_label = names[0]
    for r in first["metrics"]:
        if r["name"] == first_label:
            r.update(value=None, ci=None, flag="0 positives")
        elif r["name"].startswith("faithfulness.generated."):
            r.update(flag="only 6 volumes: too few for a reliable bootstrap CI (< 10)", ci=None)
    (tmp_path / "m.json").write_text(json.dumps(first))
    plot_faithfulness({"cascade": tmp_path / "m.json"}, tmp_path / "f.png", dpi=40)
    fig = kept[-1]
    legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert {"generated: cascade", "real scans (ceiling)"} <= set(legend) and any("flagged" in t for t in legend)
    ax = fig.axes[0]
    hollow = [ln for ln in ax.lines if ln.get_marker() == "o" and ln.get_markerfacecolor() in ("white", (1, 1, 1, 1))]
    assert hollow, "flagged values are drawn hollow"
    assert any(t.get_text() == "no CI" for t in ax.texts)
    assert "(flagged)" in ax.get_title() and "cascade 6" in ax.get_title()  # n per series
    # the guidance sweep: a flagged scale hollow, its reason in the title, even where other scales have values
    sweep = sweep_frame()
    sweep.loc[(sweep["metric"] == "clip_score") & (sweep["guidance_scale"] == 3.0), ["flag", "ci_low", "ci_high"]] = \
        ["only 3 volumes: too few", None, None]
    sweep.to_csv(tmp_path / "sweep.csv", index=False)
    plot_guidance_sweep(tmp_path / "sweep.csv", tmp_path / "s.png", dpi=40)
    clip_ax = next(a for a in kept[-1].axes if a.get_title().startswith("CLIP score"))
    assert "only 3 volumes" in clip_ax.get_title()
    assert any(ln.get_markerfacecolor() in ("white", (1, 1, 1, 1)) for ln in clip_ax.lines if ln.get_marker() == "o")


def test_a_volume_without_a_tissue_is_drawn_and_counted(tmp_path, monkeypatch):
    """A volume with no bone voxel has a NaN bone median (the HU checks flag it "missing"); it used to be scattered
    at y = NaN, that is not at all. Its count had no denominator, and the figure gave no family's n."""
    kept = _drawn(monkeypatch)
    pv = pd.DataFrame({"clip_score": [20.0, 21.0, 22.0], "clip_score_real": [25.0, 26.0, 27.0], "n_hu_flags": [0, 0, 1],
                       **{f"hu_{t}_median": [v] * 3 for t, v in (("air", -1000.0), ("lung", -850.0), ("fat", -100.0),
                                                                 ("soft_tissue", 40.0))},
                       "hu_bone_median": [500.0, 510.0, np.nan]})
    pv.to_csv(tmp_path / "pv.csv", index=False)
    plot_per_volume({"cascade": tmp_path / "pv.csv"}, tmp_path / "pv.png", dpi=40)
    ax = kept[-1].axes[1]
    bone = 4  # the column of TISSUES' last
    drawn = [xy for c in ax.collections for xy in np.asarray(c.get_offsets()) if np.isfinite(xy).all() and abs(xy[0] - bone) < 0.5]
    assert len(drawn) == 3  # every volume has a mark in the bone column
    assert any(t.get_text() == "1 of 3 without\nbone" for t in ax.texts) and "no voxel of that tissue" in ax.get_title()
    assert "n = cascade 3" in ax.get_title()  # the figure's n, and a denominator for the count of missing tissues
    legend = [t.get_text() for t in kept[-1].axes[0].get_legend().get_texts()]
    assert "cascade (3 volumes)" in legend and "cascade: 1 of 3 HU flagged" in legend, legend
    caption = (Path(__file__).resolve().parents[2] / "workflow/report/per_volume.rst").read_text()
    assert "no voxel of a tissue" in caption and "triangle" in caption and "k of N without" in caption
    # the n and profile of the numbers it plots: the CLIP network's (the figure's title names no profile) and the HU's
    assert "/report/alignment.rst" in caption and "/report/hu.rst" in caption
    assert "/report/hu.rst" in (Path(__file__).resolve().parents[2] / "workflow/report/hu_histograms.rst").read_text()
    kept.clear()
    plot_per_volume({"cascade": tmp_path / "pv.csv", "latent_flow": tmp_path / "pv.csv"}, tmp_path / "pv2.png", dpi=40)
    ax = kept[-1].axes[1]
    assert any(t.get_text() == "2 of 6 without\nbone" for t in ax.texts)  # one count over the families
    assert "n = cascade 3, latent flow 3" in ax.get_title()


def test_alignment_figure_gives_each_series_its_own_n(tmp_path, monkeypatch):
    """The titles quoted the first series' n: a family scored on 7 volumes read as if on 50."""
    kept = _drawn(monkeypatch)
    paths = {}
    for family, n in (("cascade", 50), ("latent_flow", 7)):
        summary = metrics_json()
        for r in summary["metrics"]:
            r["n"] = n if r["name"].endswith(".generated") else 50
        (tmp_path / f"{family}.json").write_text(json.dumps(summary))
        paths[family] = tmp_path / f"{family}.json"
    plot_alignment(paths, tmp_path / "a.png", dpi=40)
    clip, retrieval = (ax.get_title() for ax in kept[-1].axes)
    for title in (clip, retrieval):
        assert "cascade 50" in title and "latent flow 7" in title and "real 50" in title, title


def test_families_figure_counts_the_reports_or_patients_resampled(run, tmp_path, monkeypatch):
    """Two volumes of each of 3 CT-RATE patients per family: the CI and the test resample and swap the 3 patients,
    which the figure has to say beside the 6 pairs."""
    kept = _drawn(monkeypatch)
    plot_families(run["shared"]["families"], tmp_path / "f.png", dpi=40)
    beside = [t.get_text() for ax in kept[-1].axes for t in ax.texts if "p = " in t.get_text()]
    assert beside and all("n = 6 pairs (3 patients)" in t for t in beside), beside


def test_captions_name_the_patients_the_cis_resample(run, tmp_path):
    """On CT-RATE names the CIs resample patients: the captions (and the front page) said "n = 6", the volumes, for a
    CI that rests on 2 patients; now they say "n = 6 (2 patients)", as the figures' titles do (one wording:
    ctgen.metrics.summary.n_text), and the static text names patients beside reports."""
    from ctgen.metrics.summary import n_text

    clustered = metrics_json()
    for r in clustered["metrics"]:
        r["extra"] = {**(r.get("extra") or {}), "resampled": "patients", "n_resampled": 2}
    metrics = {}
    for family in FAMILIES:
        metrics[family] = tmp_path / f"{family}.json"
        metrics[family].write_text(json.dumps(clustered))
    outputs = {f"{name}_{kind}": str(tmp_path / f"{name}.{kind if kind != 'caption' else 'rst'}")
               for name in TABLES for kind in ("html", "csv", "caption")}
    write_tables(metrics, of(run, "skipped"), run["shared"]["sweep"], run["shared"]["families"], outputs)
    caption = (tmp_path / "faithfulness.rst").read_text()
    assert "n = 6 (2 patients) (``classifier3d@ab``)" in caption, caption
    assert n_text(clustered["metrics"][0]) == "6 (2 patients)"  # the figures' titles' wording
    assert "n = 6 (2 patients)" in (tmp_path / "alignment.rst").read_text()
    # the flag count says where to look, not a fixed list of reasons that missed some
    assert "numbers are flagged** (see the flag column for why)" in caption
    png = run["root"] / "f.png"
    plot_faithfulness(of(run, "metrics"), png, dpi=40)
    intro = write_intro(png, tmp_path / "faithfulness.rst", tmp_path / "intro.rst").read_text()
    assert "over reports or patients where one has several volumes" in intro and "n = 6 (2 patients)" in intro
    report = Path(__file__).resolve().parents[2] / "workflow" / "report"
    for name in ("faithfulness", "workflow"):
        assert "over reports or patients where one has several" in (report / f"{name}.rst").read_text(), name


def test_the_sweep_caption_counts_its_flagged_numbers(run, tmp_path):
    """The guidance sweep's caption alone lacked the "K of M numbers are flagged" of every other table; its figure
    and its table include that caption."""
    outputs = {f"{name}_{kind}": str(tmp_path / f"{name}.{kind if kind != 'caption' else 'rst'}")
               for name in TABLES for kind in ("html", "csv", "caption")}
    sweep = sweep_frame()
    sweep.loc[sweep["metric"] == "clip_score", "flag"] = "only 3 volumes: too few for a reliable bootstrap CI (< 10)"
    sweep.to_csv(tmp_path / "sweep.csv", index=False)
    write_tables(of(run, "metrics"), of(run, "skipped"), tmp_path / "sweep.csv", run["shared"]["families"], outputs)
    caption = (tmp_path / "guidance_sweep.rst").read_text()
    assert "**3 of 14 numbers are flagged**" in caption and "n = 3 (``net@1``)" in caption
    assert "3 of 14 numbers are flagged" in (tmp_path / "guidance_sweep.html").read_text()
    report = Path(__file__).resolve().parents[2] / "workflow" / "report"
    table = (report / "table_guidance_sweep.rst").read_text()
    assert "_diff" in table and "p_value" in table and "versus" in table
    for rst in ("table_guidance_sweep.rst", "guidance_sweep.rst"):
        assert "/report/guidance_sweep.rst" in (report / rst).read_text()
    sweep_frame().to_csv(tmp_path / "clean.csv", index=False)
    write_tables(of(run, "metrics"), of(run, "skipped"), tmp_path / "clean.csv", run["shared"]["families"], outputs)
    assert "flagged" not in (tmp_path / "guidance_sweep.rst").read_text()  # empty flag cells are no flags


def test_sweep_titles_give_the_tests_n_and_flag_and_every_scales_n(tmp_path, monkeypatch):
    """A panel quoted the paired test's difference and p-value without its n pairs or its flag, and the lowest
    scale's n alone (a scale of 1 volume read as one of 3)."""
    kept = _drawn(monkeypatch)
    sweep = sweep_frame()
    sweep.loc[sweep["metric"] == "guidance.faithfulness.macro_auroc_diff", "flag"] = \
        "only 3 pairs: too few for a reliable bootstrap CI (< 10)"
    sweep.loc[(sweep["metric"] == "clip_score") & (sweep["guidance_scale"] == 3.0), ["n", "flag"]] = \
        [1, "only 1 volume: too few"]
    sweep.to_csv(tmp_path / "sweep.csv", index=False)
    plot_guidance_sweep(tmp_path / "sweep.csv", tmp_path / "s.png", dpi=40)
    faith, clip, retrieval, _ = (a.get_title() for a in kept[-1].axes)
    assert "3 vs 1: +0.2 [0.01, 0.3], p = 0.01,\nn = 3 pairs" in faith and "flagged: only 3 pairs" in faith, faith
    assert "n = 1-3" in clip and "only 1 volume" in clip, clip  # the highest scale's n and flag, not the lowest's
    assert retrieval.endswith("\nn = 3"), retrieval


def test_families_figure_gives_the_flag_and_does_not_colour_a_flagged_difference(run, tmp_path, monkeypatch):
    """Every flag was written "(thin)", whatever its reason, and a flagged difference with p < 0.05 was still red."""
    from matplotlib.colors import to_hex

    kept = _drawn(monkeypatch)
    summary = json.loads(Path(run["shared"]["families"]).read_text())
    flagged, clean = summary["metrics"][:2]
    flagged.update(flag="no CI: 60% of the resamples held one class of a label (the interval needs at least half)")
    clean.update(flag=None)
    for r in (flagged, clean):
        r["extra"]["p_value"] = 0.01
    (tmp_path / "f.json").write_text(json.dumps(summary))
    plot_families(tmp_path / "f.json", tmp_path / "f.png", dpi=40)
    axes = kept[-1].axes
    beside = [t.get_text() for t in axes[0].texts]
    assert any("flagged: no CI: 60% of the resamples" in t for t in beside) and not any("thin" in t for t in beside)

    def colours(ax):  # the point's colour (the dashed zero line is grey)
        return {to_hex(ln.get_color()) for ln in ax.lines if ln.get_marker() == "o"}

    assert colours(axes[0]) == {to_hex("#555555")} and colours(axes[1]) == {to_hex("C3")}
