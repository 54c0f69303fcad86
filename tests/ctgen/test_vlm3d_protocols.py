"""The VLM3D protocols' arithmetic (chunked FVD, CLIP scores, 2.5D FID, selection, CIs) and the scoring job.

Volumes are sub-volumes of the real scans in tests/data (with truthful affines); the feature networks are
seeded random proxies (a tiny 3D classifier of the workflow, a small 2D conv net), so every name says proxy.
Grids are smaller than the challenge's (the protocols take them as parameters; the geometry tests check
the official ones).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import linalg
from torch import nn

from ctgen.cli import main as ctgen_main
from ctgen.jobs.vlm3d import score_vlm3d
from ctgen.metrics.frechet import frechet_distance_scipy
from ctgen.metrics.summary import stems_hash
from ctgen.metrics.vlm3d import (
    Extractor,
    Fid25dSettings,
    chunk_fvds,
    ctclip_scores,
    fid_25d,
    fvd_ctnet,
    pair_volumes,
    slice_proxy,
    volume_proxy,
)
from ctgen.metrics.vlm3d.contract import load_volume
from ctgen.metrics.vlm3d.fid25d import CHANNEL_MEAN, GroupedGaussian
from ctgen.metrics.vlm3d.geometry import ctnet_volume, fid_volume
from ctgen.models.classifier3d import Classifier3D, ClassifierConfig
from ctprep.errors import UserError

DATA = Path(__file__).resolve().parents[1] / "data"
SCANS = ["pulmonary_report_ct_cropped.nii.gz", "example_ct_sm.nii.gz", "example_ct.nii.gz"]
FVD_GRID = (24, 32, 32)
CLIP_GRID = dict(spacing=(6.0, 3.0, 3.0), shape=(30, 64, 64))
FID = Fid25dSettings(spacing=(4.0, 4.0, 4.0), shape=(48, 48, 48), n_bootstrap=40)


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.int16), affine), path)


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    """9 real volumes: three slabs along k of each of the three scans, each with its own (shifted) affine."""
    out = tmp_path_factory.mktemp("real")
    names = []
    for s, scan in enumerate(SCANS):
        img = nib.load(DATA / scan)
        data = np.asarray(img.dataobj)
        k = data.shape[2] // 3
        for part in range(3):
            aff = img.affine.copy()
            aff[:3, 3] = img.affine[:3, :3] @ [0, 0, part * k] + img.affine[:3, 3]
            name = f"case_{s}{part}_{scan.split('_')[0]}"
            _write(out / f"{name}.nii.gz", data[:, :, part * k:(part + 1) * k], aff)
            names.append(name)
    return out


def _derived(tmp_path, real_dir, how, stems=None):
    """A generated folder from the real volumes: mild noise ("real-like") or voxels shuffled ("not a CT")."""
    out = tmp_path / how
    out.mkdir()
    rng = np.random.default_rng(0)
    for path in sorted(real_dir.glob("*.nii.gz")):
        stem = path.name[: -len(".nii.gz")]
        if stems is not None and stem not in stems:
            continue
        img = nib.load(path)
        data = np.asarray(img.dataobj).astype(np.float64)
        if how == "noisy":
            data = data + rng.normal(0, 20, data.shape)
        elif how == "shuffled":
            data = rng.permutation(data.ravel()).reshape(data.shape)
        _write(out / path.name, np.clip(np.rint(data), -1024, 3071), img.affine)
    return out


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    cfg = ClassifierConfig(stem_stride=(2, 4, 4), channels=(8, 16), blocks=(1, 1), norm_groups=4)
    return Classifier3D(cfg).eval()


@pytest.fixture(scope="module")
def volume_net(classifier):
    return volume_proxy(classifier.features, "classifier3d:tiny-random")


@pytest.fixture(scope="module")
def slice_net():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    return slice_proxy(net, "conv2d:tiny-random")


def _pairs(gen_dir, real_dir):
    return list(pair_volumes(gen_dir, real_dir).pairs)


def _challenge_fd(g, r):
    """FVD/fvd_pytorch_model.compute_fvd as written: np.cov, sqrtm of the product, real part."""
    mu_g, mu_r = g.mean(0), r.mean(0)
    sg, sr = np.cov(g, rowvar=False), np.cov(r, rowvar=False)
    s = linalg.sqrtm(sg @ sr)  # the code passes disp=False (deprecated in scipy 1.17; same matrix)
    return float(np.real(np.square(mu_g - mu_r).sum() + np.trace(sg + sr - s * 2)))


def test_chunked_frechet_matches_the_challenges_scipy_computation():
    rng = np.random.default_rng(0)
    gen, real = rng.normal(size=(10, 96)), rng.normal(0.3, 1.2, size=(10, 96))
    values = chunk_fvds(gen, real)
    expected = [_challenge_fd(gen[s:s + 4], real[s:s + 4]) for s in (0, 4, 8)]  # chunks of 4, 4 and 2
    assert len(values) == 3 and np.allclose(values, expected, rtol=1e-5)
    tail = chunk_fvds(gen[:9], real[:9])
    assert len(tail) == 3 and np.isnan(tail[-1])  # one pair: no covariance (NaN in np.cov)


def test_fvd_takes_pairs_in_file_name_order_in_chunks_of_four(tmp_path, real_dir):
    gen_dir = _derived(tmp_path, real_dir, "noisy")
    pairs = _pairs(gen_dir, real_dir)[:8]
    assert [p.generated.name for p in pairs] == sorted(p.generated.name for p in pairs)
    seen = []

    def stats(hu):  # (1, D, H, W) -> simple, deterministic features
        seen.append(hu.shape)
        q = torch.quantile(hu.flatten()[::7].float(), torch.linspace(0.05, 0.95, 6))
        return torch.cat([q, hu.mean()[None], hu.std()[None]])[None]

    rec = fvd_ctnet(pairs, Extractor(stats, "stats", proxy=True), shape=FVD_GRID)
    assert seen and all(s == (1, *FVD_GRID) for s in seen) and len(seen) == 16
    gen = np.stack([stats(ctnet_volume(load_volume(p.generated), FVD_GRID)[None])[0].double().numpy() for p in pairs])
    real = np.stack([stats(ctnet_volume(load_volume(p.real), FVD_GRID)[None])[0].double().numpy() for p in pairs])
    expected = [_challenge_fd(gen[:4], real[:4]), _challenge_fd(gen[4:], real[4:])]
    assert rec.name == "fvd_ctnet_proxy" and rec.profile == "vlm3d-2026:fvd_ctnet:proxy:stats"
    assert rec.n == 2 and rec.extra["chunk_sizes"] == [4, 4] and np.isclose(rec.value, np.mean(expected), rtol=1e-4)
    assert rec.ci is not None and rec.flag and "only 2 chunks" in rec.flag
    odd = fvd_ctnet(_pairs(gen_dir, real_dir), Extractor(stats, "stats", proxy=True), shape=FVD_GRID)  # 9 pairs
    assert odd.value is None and "one pair" in odd.flag and odd.extra["chunk_sizes"] == [4, 4, 1]
    assert np.isclose(odd.extra["mean_without_undefined_chunks"], np.mean(expected), rtol=1e-4)


def test_real_vs_real_scores_better_than_real_vs_shuffled(tmp_path, real_dir, volume_net, slice_net):
    stems = sorted(p.name[: -len(".nii.gz")] for p in real_dir.glob("*.nii.gz"))[:8]
    noisy = _pairs(_derived(tmp_path, real_dir, "noisy", stems), real_dir)
    shuffled = _pairs(_derived(tmp_path, real_dir, "shuffled", stems), real_dir)
    fvd = [fvd_ctnet(p, volume_net, shape=FVD_GRID).value for p in (noisy, shuffled)]
    assert fvd[0] < fvd[1]
    clip = [ctclip_scores(p, volume_net, **CLIP_GRID)[0][0] for p in (noisy, shuffled)]
    assert clip[0].name == "clip_score_i2i_proxy" and clip[0].value > clip[1].value
    # why only the image-image score, and the too-few-volumes flag beside it (it was overwritten)
    assert "no reports given" in clip[0].flag and "only 8 volumes" in clip[0].flag
    reports = {p.stem: "No pleural effusion." for p in noisy}
    [no_text] = ctclip_scores(noisy, volume_net, None, reports, **CLIP_GRID)[0]
    assert "no text encoder" in no_text.flag and "no reports given" not in no_text.flag
    fid = [fid_25d(p, slice_net, FID) for p in (noisy, shuffled)]
    for good, bad in zip(*fid):
        assert good.name == bad.name and good.value < bad.value
    assert [r.name for r in fid[0]] == ["fid_2p5d_proxy.xy", "fid_2p5d_proxy.yz", "fid_2p5d_proxy.zx",
                                        "fid_2p5d_proxy.avg"]
    assert fid[0][3].value == pytest.approx(np.mean([r.value for r in fid[0][:3]]))
    assert all(r.ci is not None and r.ci[0] <= r.ci[1] for r in fid[0])


def test_fid_arithmetic_matches_an_independent_slicing_and_monais_fid(tmp_path, real_dir):
    pairs = _pairs(_derived(tmp_path, real_dir, "noisy"), real_dir)[:4]
    proj = torch.Generator().manual_seed(0)
    weight = torch.randn(3 * 16, 6, generator=proj)

    def net(x):  # (B, 3, h, w) -> (B, 6): 4 x 4 average pooling, then a fixed projection
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)[:, :48] @ weight

    records = fid_25d(pairs, Extractor(net, "projection", proxy=True), FID)

    def reference_features(path):
        v = fid_volume(load_volume(path), FID.spacing, FID.shape).numpy()
        lo, hi = v.min(), v.max()
        planes = {"xy": [v[:, :, k] for k in range(v.shape[2])], "yz": [v[i] for i in range(v.shape[0])],
                  "zx": [v[:, j, :] for j in range(v.shape[1])]}
        out = {}
        for plane, slices in planes.items():
            x = (np.stack(slices) - lo) / (hi - lo + 1e-10)
            x = np.stack([x - m for m in CHANNEL_MEAN], axis=1).astype(np.float32)  # BGR means, channel by channel
            out[plane] = net(torch.from_numpy(x)).double().numpy()
        return out

    gen = [reference_features(p.generated) for p in pairs]
    real = [reference_features(p.real) for p in pairs]
    for rec, plane in zip(records, ("xy", "yz", "zx")):
        g = np.concatenate([f[plane] for f in gen])
        r = np.concatenate([f[plane] for f in real])
        assert rec.extra["slices"] == len(g) == 4 * 48
        assert rec.value == pytest.approx(frechet_distance_scipy(g, r), rel=1e-4)
        monai_fid = pytest.importorskip("monai.metrics.fid")
        assert rec.value == pytest.approx(float(monai_fid.FIDMetric()(torch.from_numpy(g), torch.from_numpy(r))),
                                          rel=1e-4)


def test_fid_scores_the_first_n_pairs_by_sorted_name_and_says_when_fewer(tmp_path, real_dir, slice_net):
    pairs = _pairs(_derived(tmp_path, real_dir, "noisy"), real_dir)
    first = sorted(p.stem for p in pairs)[:3]
    recs = fid_25d(pairs[::-1], slice_net, Fid25dSettings(**{**FID.__dict__, "num_images": 3}))
    assert all(r.n == 3 and r.stems == stems_hash(first) for r in recs)
    # fewer than the protocol's 100 is said, whatever num_images asked for (the records keep the official keys)
    assert all("scored on 3 volumes; the protocol takes the first 100" in r.flag for r in recs)
    few = fid_25d(pairs[:3], slice_net, FID)  # the protocol takes 100
    assert all(r.n == 3 and "scored on 3 volumes" in r.flag for r in few)


def _in_memory_fid(monkeypatch, stems, seed=0, proxy=True):
    """(pairs, extractor) for fid_25d on random 8^3 "volumes" held in memory (axis-aligned, no resampling)."""
    from types import SimpleNamespace

    import ctgen.metrics.vlm3d.fid25d as fid25d
    from ctgen.metrics.vlm3d.contract import Pair

    rng = np.random.default_rng(seed)
    vols = {}

    def make(key):
        data = torch.from_numpy(rng.normal(size=(8, 8, 8)).astype(np.float32)) + float(rng.normal()) * 0.3
        vols[key] = SimpleNamespace(data=data, affine=np.eye(4))
        return key

    monkeypatch.setattr(fid25d, "load_volume", lambda path: vols[path])
    monkeypatch.setattr(fid25d, "fid_volume", lambda v, spacing, shape: v.data)
    weight = torch.from_numpy(rng.normal(size=(3 * 64, 6)).astype(np.float32))
    extractor = Extractor(lambda x: x.reshape(x.shape[0], -1) @ weight, "proj" if proxy else "squeezenet1.1", proxy)
    return [Pair(stem, make(f"g{stem}"), make(f"r{stem}")) for stem in stems], extractor


def test_fid_ci_is_shifted_by_the_bootstraps_bias_and_holds_the_estimate(monkeypatch):
    """Both sides alike: resamples duplicate volumes, so their FIDs sit above the estimate (a raw percentile interval
    excluded it on three of the four records); the CI is shifted by that bias, which the record keeps."""
    pairs, extractor = _in_memory_fid(monkeypatch, [f"s{i:02d}" for i in range(20)])
    recs = fid_25d(pairs, extractor, Fid25dSettings(n_bootstrap=200))
    for r in recs:
        assert r.ci[0] <= r.value <= r.ci[1], r.name
        assert r.extra["bootstrap_bias"] > 0 and r.extra["dropped_resamples"] == 0, r.name


def test_fid_flags_a_num_images_other_than_the_challenges_100_even_with_more_volumes(monkeypatch):
    """105 pairs and num_images 105: no fewer than 100 volumes, but not the challenge's number either."""
    pairs, published = _in_memory_fid(monkeypatch, [f"c{i:03d}" for i in range(105)], proxy=False)
    settings = dict(slice_batch=64, n_bootstrap=2)
    more = fid_25d(pairs, published, Fid25dSettings(num_images=105, **settings))
    assert all(r.n == 105 and "num_images 105, not the challenge's 100" in r.flag for r in more)
    assert [r.extra["official_key"] for r in more] == ["FID_2p5D_XY", "FID_2p5D_YZ", "FID_2p5D_XZ", "FID_2p5D_Avg"]
    exact = fid_25d(pairs, published, Fid25dSettings(**settings))  # the first 100: the challenge's number
    assert all(r.n == 100 and r.flag is None for r in exact)


def test_fid_and_clip_cis_resample_ctrate_patients_not_their_reconstructions(tmp_path, monkeypatch, volume_net):
    """Two reconstructions of one CT-RATE scan share anatomy: the CIs draw whole patients, and the too-few flag
    counts patients (ctgen's own CLIP score does the same)."""
    stems = [f"train_{p}_a_{r}" for p in range(1, 7) for r in (1, 2)]  # 6 patients, 12 volumes
    pairs, extractor = _in_memory_fid(monkeypatch, stems)
    for r in fid_25d(pairs, extractor, Fid25dSettings(n_bootstrap=20)):
        assert r.n == 12 and r.extra["resampled"] == "patients" and r.extra["n_resampled"] == 6, r.name
    gen, real = tmp_path / "gen", tmp_path / "real"
    gen.mkdir()
    real.mkdir()
    rng = np.random.default_rng(0)
    for stem in stems:
        for folder in (gen, real):
            _write(folder / f"{stem}.nii.gz", rng.integers(-1000, 1000, (8, 8, 6)), np.diag([1.0, 1, 2, 1]))
    [clip], rows = ctclip_scores(_pairs(gen, real), volume_net, spacing=(2.0, 1.0, 1.0), shape=(6, 8, 8))
    assert clip.n == 12 and clip.extra["resampled"] == "patients" and clip.extra["n_resampled"] == 6
    assert "only 6 patients" in clip.flag and "only 12 volumes" not in clip.flag


def test_config_values_are_checked_before_any_volume_is_read():
    """fid_bootstrap 0 used to fail after every feature was computed, num_images -2 to drop two pairs silently."""
    from ctgen.jobs.vlm3d import vlm3d_settings

    assert vlm3d_settings({"num_images": 50, "ctnet_weights": "w.pth"})["num_images"] == 50
    for key, value in (("fid_bootstrap", 0), ("num_images", -2), ("num_images", "abc"), ("num_images", 2.5),
                       ("fid_bootstrap", True)):
        with pytest.raises(UserError, match=f"evaluation.vlm3d.{key}: not a positive integer"):
            vlm3d_settings({key: value})
    with pytest.raises(UserError, match="evaluation.vlm3d.squeezenet_weights: not a path"):
        vlm3d_settings({"squeezenet_weights": 3})


def test_grouped_resample_equals_the_covariance_of_the_repeated_rows():
    rng = np.random.default_rng(0)
    groups = [rng.normal(i, 1 + i / 3, size=(n, 5)).astype(np.float32) for i, n in enumerate((7, 3, 9, 4))]
    stats = GroupedGaussian(groups)
    counts = torch.tensor([2, 0, 1, 1])
    rows = np.concatenate([g for g, c in zip(groups, counts.tolist()) for _ in range(c)]).astype(np.float64)
    mu, cov = stats.stats(counts)
    assert np.allclose(mu.numpy(), rows.mean(0)) and np.allclose(cov.numpy(), np.cov(rows, rowvar=False), atol=1e-5)


def test_score_vlm3d_runs_each_protocol_on_its_proxy_and_writes_its_tables(tmp_path, real_dir, volume_net,
                                                                           slice_net):
    stems = sorted(p.name[: -len(".nii.gz")] for p in real_dir.glob("*.nii.gz"))
    gen_dir = _derived(tmp_path, real_dir, "noisy", stems[:8])
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"input_image_name": s, "report": f"report {i}"} for i, s in enumerate(stems)]))

    def text(reports):  # a deterministic "text encoder": hashed words
        return torch.stack([torch.tensor([float(sum(map(ord, w)) % 97) for w in r.split()][-1:] * 16) for r in reports])

    proxies = {"fvd": volume_net, "clip_image": volume_net, "fid": slice_net,
               "clip_text": Extractor(text, "words", proxy=True)}
    out = tmp_path / "scores"
    grids = {"fvd_shape": FVD_GRID, "clip_spacing": CLIP_GRID["spacing"], "clip_shape": CLIP_GRID["shape"],
             "fid_spacing": FID.spacing, "fid_shape": FID.shape}
    summary = score_vlm3d(gen_dir, real_dir, prompts, {"num_images": 8, "fid_bootstrap": 20}, proxies, out,
                          grids=grids)
    assert summary["n_pairs"] == 8 and summary["real_without_prediction"] == [stems[8]]
    names = [r["name"] for r in summary["records"]["vlm3d-2026"]]
    assert names == ["fvd_ctnet_proxy", "clip_score_proxy", "clip_score_i2i_proxy", "clip_score_mean_proxy",
                     "fid_2p5d_proxy.xy", "fid_2p5d_proxy.yz", "fid_2p5d_proxy.zx", "fid_2p5d_proxy.avg"]
    assert all(":proxy:" in r["profile"] and "not the challenge's" in r["flag"] for r in summary["records"]["vlm3d-2026"])
    assert summary["records"]["papers"] == [] and "fid_papers" in summary["skipped"]
    table = pd.read_csv(out / "vlm3d_2026.csv")
    assert list(table["name"]) == names and {"ci_low", "ci_high", "n", "profile", "flag"} <= set(table.columns)
    assert not (out / "papers.csv").exists() and not (out / "leaderboard.json").exists()  # proxies never
    assert table["official_key"].isna().all()  # nor a leaderboard key in the tables
    per_volume = pd.read_csv(out / "clip_per_volume.csv")
    assert len(per_volume) == 8 and list(per_volume.columns) == [
        "stem", "clip_score_i2i_proxy", "clip_score_proxy", "clip_score_real_proxy", "clip_score_mean_proxy"]
    assert json.loads((out / "vlm3d.json").read_text())["stems"] == stems[:8]


def test_score_vlm3d_refuses_unpaired_or_unreported_volumes_and_an_empty_run(tmp_path, real_dir, volume_net):
    gen_dir = _derived(tmp_path, real_dir, "noisy")
    extra = gen_dir / "not_in_real.nii.gz"
    extra.write_bytes((gen_dir / sorted(p.name for p in gen_dir.iterdir())[0]).read_bytes())
    with pytest.raises(ValueError, match="1 generated volume.*no ground truth.*not_in_real"):
        score_vlm3d(gen_dir, real_dir, proxies={"fvd": volume_net})
    extra.unlink()
    with pytest.raises(UserError, match="nothing to score"):
        score_vlm3d(gen_dir, real_dir)
    stems = sorted(p.stem for p in _pairs(gen_dir, real_dir))
    with pytest.raises(ValueError, match=f"no report for 1 generated volume.*{stems[-1]}"):
        ctclip_scores(_pairs(gen_dir, real_dir), volume_net, Extractor(lambda r: torch.ones(len(r), 3), "t", True),
                      {s: "text" for s in stems[:-1]}, **CLIP_GRID)
    with pytest.raises(ValueError, match="must be marked proxy=True"):
        score_vlm3d(gen_dir, real_dir, proxies={"fvd": Extractor(volume_net.fn, "mine")})


def test_cli_without_weights_ends_in_one_line(tmp_path, real_dir, capsys):
    code = ctgen_main(["vlm3d-score", "--generated", str(real_dir), "--real", str(real_dir), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nothing to score" in err[0]
    assert ctgen_main(["vlm3d-score", "--generated", str(real_dir), "--real", str(real_dir), "--out", str(tmp_path),
                       "--ctnet-weights", str(tmp_path / "absent.pth")]) == 2
    assert "CT-Net weights not found" in capsys.readouterr().err


def _save_float(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), path)


def test_values_that_are_not_hu_are_named_and_flagged(tmp_path, real_dir, volume_net):
    """A generator's [-1, 1] output or raw stored values (HU + 1024) are named per volume; HU volumes pass."""
    from ctgen.metrics.vlm3d.contract import hu_problem

    reals = sorted(real_dir.glob("*.nii.gz"))
    assert [hu_problem(p) for p in reals] == [None] * len(reals)  # real scans, and the noisy copies below
    gen_dir = _derived(tmp_path, real_dir, "noisy")
    img = nib.load(reals[0])
    hu = np.asarray(img.dataobj, dtype=np.float32)
    _save_float(tmp_path / "norm.nii.gz", np.clip(hu, -1000, 1000) / 1000, img.affine)
    _save_float(tmp_path / "unit.nii.gz", (np.clip(hu, -1000, 1000) + 1000) / 2000, img.affine)
    _write(tmp_path / "raw.nii.gz", hu + 1024, img.affine)
    assert hu_problem(gen_dir / reals[0].name) is None
    assert "normalised values, not HU" in hu_problem(tmp_path / "norm.nii.gz")
    assert "normalised values, not HU" in hu_problem(tmp_path / "unit.nii.gz")
    assert "read as HU only 1024 lower" in hu_problem(tmp_path / "raw.nii.gz")
    # one normalised prediction: scored, named in vlm3d.json, every record flagged
    (gen_dir / reals[0].name).write_bytes((tmp_path / "norm.nii.gz").read_bytes())
    summary = score_vlm3d(gen_dir, real_dir, proxies={"fvd": volume_net}, out_dir=tmp_path / "one",
                          grids={"fvd_shape": FVD_GRID})
    stem = reals[0].name[: -len(".nii.gz")]
    assert list(summary["hu_problems"]) == [stem] and "normalised" in summary["hu_problems"][stem]["generated"]
    records = summary["records"]["vlm3d-2026"]
    assert records and all("1 of 9 pairs hold a volume whose values do not read as HU" in r["flag"] for r in records)
    assert json.loads((tmp_path / "one" / "vlm3d.json").read_text())["hu_problems"] == summary["hu_problems"]
    # no prediction in HU: one line, nothing scored
    for path in gen_dir.iterdir():
        data = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        _save_float(path, np.clip(data, -1000, 1000) / 1000, nib.load(path).affine)
    with pytest.raises(UserError, match=r"no generated volume reads as HU \(9 of 9\); case_00_pulmonary: .*normalised"):
        score_vlm3d(gen_dir, real_dir, proxies={"fvd": volume_net}, grids={"fvd_shape": FVD_GRID})


def test_centre_slices_are_min_max_normalised_over_the_kept_slices_only():
    """get_features_2p5d normalises each plane's stack of kept slices: an extreme voxel outside the centre
    slices does not change the kept slices' intensities."""
    from ctgen.metrics.vlm3d.fid25d import plane_slices, volume_plane_features

    rng = np.random.default_rng(0)
    vol = torch.from_numpy(rng.uniform(-500, 500, size=(8, 8, 8)).astype(np.float32))
    vol[0, 0, 0], vol[-1, -1, -1] = -1000.0, 1000.0  # outside the central half along every axis
    ex = Extractor(lambda x: x.flatten(1), "identity", proxy=True)
    settings = Fid25dSettings(center_slices_ratio=0.5)
    feats = volume_plane_features(vol, ex, settings)
    for plane in ("xy", "yz", "zx"):
        kept = plane_slices(vol, plane, 0.5)
        x = (kept - kept.min()) / (kept.max() - kept.min() + 1e-10)
        expected = torch.stack([x - m for m in CHANNEL_MEAN], dim=1).flatten(1).numpy()
        assert feats[plane].shape == expected.shape and np.allclose(feats[plane], expected, atol=1e-6), plane


def test_a_sheared_volume_leaves_its_pair_out_named_and_counted(tmp_path, real_dir, volume_net, slice_net):
    """A gantry tilt kept in the header: SimpleITK (the evaluation's reader) refuses it and the 2.5D FID needs a
    rectilinear grid; it used to stop the run after FVD and CLIP were done, with nothing written."""
    stems = sorted(p.name[: -len(".nii.gz")] for p in real_dir.glob("*.nii.gz"))[:4]
    gen_dir = _derived(tmp_path, real_dir, "noisy", stems)
    real = tmp_path / "real"
    real.mkdir()
    for stem in stems:
        (real / f"{stem}.nii.gz").write_bytes((real_dir / f"{stem}.nii.gz").read_bytes())
    img = nib.load(real / f"{stems[1]}.nii.gz")
    tilted = img.affine.copy()
    tilted[1, 2] += 0.35 * np.linalg.norm(tilted[:3, 2])  # about 20 degrees
    _write(real / f"{stems[1]}.nii.gz", np.asarray(img.dataobj), tilted)
    summary = score_vlm3d(gen_dir, real, proxies={"fvd": volume_net, "fid": slice_net}, out_dir=tmp_path / "out",
                          cfg={"fid_bootstrap": 5}, grids={"fvd_shape": FVD_GRID, "fid_spacing": FID.spacing,
                                                           "fid_shape": FID.shape})
    assert summary["n_pairs"] == 3 and summary["n_skipped_pairs"] == 1
    assert "sheared voxel axes" in summary["skipped_pairs"][stems[1]]["real"]
    records = summary["records"]["vlm3d-2026"]
    assert len(records) == 5 and all("1 of 4 pairs not scored" in r["flag"] for r in records)
    assert (tmp_path / "out" / "vlm3d.json").exists()


def test_leaderboard_json_keeps_published_numbers_with_their_flags_beside(tmp_path, real_dir, slice_net,
                                                                          monkeypatch):
    """num_images 6 (not the challenge's 100): the 2.5D FID keeps its official keys, and leaderboard.json says why
    the number is not the challenge's beside it."""
    import ctgen.jobs.vlm3d as job

    published = Extractor(slice_net.fn, "squeezenet1.1")  # as if loaded from squeezenet_weights
    monkeypatch.setattr(job, "build_extractors", lambda cfg, proxies, device: ({"fid": published}, {}))
    gen_dir = _derived(tmp_path, real_dir, "noisy")
    score_vlm3d(gen_dir, real_dir, cfg={"num_images": 6, "fid_bootstrap": 5}, out_dir=tmp_path / "out",
                grids={"fid_spacing": FID.spacing, "fid_shape": FID.shape})
    board = json.loads((tmp_path / "out" / "leaderboard.json").read_text())
    keys = ["FID_2p5D_XY", "FID_2p5D_YZ", "FID_2p5D_XZ", "FID_2p5D_Avg"]
    assert list(board["metrics"]) == keys and list(board["flags"]) == keys
    assert all("num_images 6, not the challenge's 100" in board["flags"][k] for k in keys)


def test_fid_on_oblique_volumes_counts_them_in_its_flag(tmp_path, real_dir, slice_net):
    """Rotated voxel axes: resampled along them, where MONAI may centre its grid instead; the records say how many."""
    from scipy.spatial.transform import Rotation

    stems = sorted(p.name[: -len(".nii.gz")] for p in real_dir.glob("*.nii.gz"))[:3]
    gen_dir = _derived(tmp_path, real_dir, "noisy", stems)
    img = nib.load(gen_dir / f"{stems[0]}.nii.gz")
    rotated = img.affine.copy()
    rotated[:3, :3] = Rotation.from_euler("z", 10, degrees=True).as_matrix() @ rotated[:3, :3]
    _write(gen_dir / f"{stems[0]}.nii.gz", np.asarray(img.dataobj), rotated)
    recs = fid_25d(_pairs(gen_dir, real_dir), slice_net, FID)
    assert all(r.extra["n_oblique"] == 1 and "1 of 6 volumes oblique" in r.flag for r in recs)
