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


def test_fid_ci_is_shifted_by_the_bootstraps_bias_and_holds_the_estimate(monkeypatch):
    """Both sides alike: resamples duplicate volumes, so their FIDs sit above the estimate (a raw percentile interval
    excluded it on three of the four records); the CI is shifted by that bias, which the record keeps."""
    import ctgen.metrics.vlm3d.fid25d as fid25d
    from ctgen.metrics.vlm3d.contract import Pair

    rng = np.random.default_rng(0)
    vols = {}

    def make(key):
        vols[key] = torch.from_numpy(rng.normal(size=(8, 8, 8)).astype(np.float32)) + float(rng.normal()) * 0.3
        return key

    monkeypatch.setattr(fid25d, "load_volume", lambda path: vols[path])
    monkeypatch.setattr(fid25d, "fid_volume", lambda v, spacing, shape: v)
    weight = torch.from_numpy(rng.normal(size=(3 * 64, 6)).astype(np.float32))
    extractor = Extractor(lambda x: x.reshape(x.shape[0], -1) @ weight, "proj", proxy=True)
    pairs = [Pair(f"s{i:02d}", make(f"g{i}"), make(f"r{i}")) for i in range(20)]
    recs = fid_25d(pairs, extractor, Fid25dSettings(n_bootstrap=200))
    for r in recs:
        assert r.ci[0] <= r.value <= r.ci[1], r.name
        assert r.extra["bootstrap_bias"] > 0 and r.extra["dropped_resamples"] == 0, r.name


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
    assert len(pd.read_csv(out / "clip_per_volume.csv")) == 8
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
