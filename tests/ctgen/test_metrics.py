"""ctgen.metrics: each metric against an independent computation, and each moving the right way.

Real volumes are the CT scans in tests/data (read with nibabel, in the model's (D, H, W) layout).
The feature extractors here are random-but-fixed (seeded) conv nets: they stand in for the
trained CLIP/classifier encoders, which the evaluate rule passes in the same way.
"""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import linalg, stats
from torch import nn

from ctgen.data.layout import to_model_layout
from ctgen.metrics import (
    auroc,
    auroc_per_label,
    clip_score,
    fid_2d,
    fid_from_features,
    fit_gaussian,
    flag_out_of_range,
    frechet_3d,
    frechet_distance,
    frechet_distance_from_stats,
    frechet_distance_scipy,
    hu_histogram,
    image_similarity,
    paired_permutation_test,
    slice_features,
    slice_stack,
    tissue_stats,
    tstr_summary,
    volume_features,
)
from ctgen.metrics.slices import take_slice
from ctgen.metrics.summary import MetricValue
from tests.conftest import DATA, REAL_NIFTI


@pytest.fixture(scope="module")
def real_vols() -> list[np.ndarray]:
    """The three real CT scans, canonical RAS -> (D, H, W) HU float32, in-plane halved for speed."""
    vols = []
    for name in REAL_NIFTI:
        img = nib.as_closest_canonical(nib.load(DATA / name))
        vol = to_model_layout(np.asarray(img.dataobj, dtype=np.float32))[0]  # (D, H, W)
        vols.append(np.ascontiguousarray(vol[:, ::2, ::2]))
    return vols


def noise_like(vol: np.ndarray, seed: int) -> np.ndarray:
    """Uniform HU noise over the usual CT range, same shape."""
    return np.random.default_rng(seed).uniform(-1024, 2000, vol.shape).astype(np.float32)


def kaiming_init(net: nn.Module) -> None:
    """Variance-preserving random weights, so that the features are O(1) rather than vanishing."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight)
            nn.init.normal_(m.bias, std=0.1)


class RandomConv2d(nn.Module):
    """Fixed random 2D features: (B, 1, h, w) HU -> (B, 32), global mean pooling (any slice size)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(1, 16, 5, 2, 2), nn.GELU(), nn.Conv2d(16, 32, 3, 2, 1), nn.GELU(),
                                 nn.Conv2d(32, 32, 3, 2, 1), nn.GELU())
        kaiming_init(self)

    def forward(self, x):
        return self.net(x.clamp(-1024, 2000) / 1000).mean(dim=(2, 3))  # (B, 32)


class RandomConv3d(nn.Module):
    """Fixed random 3D features: (B, 1, D, H, W) HU -> (B, 16)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv3d(1, 8, 3, 2, 1), nn.GELU(), nn.Conv3d(8, 16, 3, 2, 1), nn.GELU())
        kaiming_init(self)

    def forward(self, x):
        return self.net(x.clamp(-1024, 2000) / 1000).mean(dim=(2, 3, 4))  # (B, 16)


def random_spd(rng, f: int) -> np.ndarray:
    a = rng.normal(size=(f, f))
    return a @ a.T / f + 0.1 * np.eye(f)


# --- Fréchet distance ------------------------------------------------------------------------

def test_frechet_closed_form_diagonal():
    """Commuting (diagonal) covariances: FD = |mu_a - mu_b|^2 + sum (sqrt a - sqrt b)^2."""
    rng = np.random.default_rng(0)
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    va, vb = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
    got = frechet_distance_from_stats(mu_a, np.diag(va), mu_b, np.diag(vb))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_general_covariances_match_scipy_sqrtm():
    """Full covariances: the eigh form against tr sqrtm(sqrtm(S_a) S_b sqrtm(S_a)) by scipy."""
    rng = np.random.default_rng(1)
    for f in (3, 17, 64):
        mu_a, mu_b = rng.normal(size=f), rng.normal(size=f)
        s_a, s_b = random_spd(rng, f), random_spd(rng, f)
        root_a = linalg.sqrtm(s_a).real
        expected = np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2 * linalg.sqrtm(root_a @ s_b @ root_a).real)
        assert frechet_distance_from_stats(mu_a, s_a, mu_b, s_b) == pytest.approx(expected, rel=1e-8)


def test_frechet_from_samples_converges_to_closed_form():
    rng = np.random.default_rng(2)
    mu_a, mu_b = np.zeros(4), np.array([1.0, -0.5, 0.0, 2.0])
    s_a, s_b = random_spd(rng, 4), random_spd(rng, 4)
    a = rng.multivariate_normal(mu_a, s_a, size=40_000)
    b = rng.multivariate_normal(mu_b, s_b, size=40_000)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance_from_stats(mu_a, s_a, mu_b, s_b), rel=0.03)


def test_frechet_eigh_matches_scipy_on_real_slice_features(real_vols):
    net = RandomConv2d()
    feats = slice_features(real_vols, net, planes=("axial",))["axial"]  # (S, 32)
    a, b = feats[0::2], feats[1::2]
    mu, sigma = fit_gaussian(a)
    np.testing.assert_allclose(mu, a.mean(0))
    np.testing.assert_allclose(sigma, torch.cov(torch.from_numpy(a).T).numpy(), rtol=1e-10, atol=1e-14)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance_scipy(a, b), rel=1e-6)
    noise = slice_features([noise_like(v, 0) for v in real_vols], net, planes=("axial",))["axial"]
    assert frechet_distance(a, noise) == pytest.approx(frechet_distance_scipy(a, noise), rel=1e-6)


def test_frechet_rank_deficient_and_properties():
    """Fewer samples than features: finite, agrees with scipy (eps path); FD(x, x) = 0; symmetric."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(20, 50)), rng.normal(0.3, 1.2, size=(25, 50))
    fd = frechet_distance(a, b)
    assert math.isfinite(fd) and fd == pytest.approx(frechet_distance_scipy(a, b), rel=1e-4)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # symmetric to rounding (~1e-14 relative over 200 random shapes): eigenvalues below the numerical rank
    # threshold are dropped rather than square-rooted as noise, so 1e-10 leaves a margin of 10^4
    assert frechet_distance(b, a) == pytest.approx(fd, rel=1e-10)
    # bf16 features (autocast outputs) are accepted and promoted to float64.
    t = torch.from_numpy(a).bfloat16()
    assert frechet_distance(t, b) == pytest.approx(frechet_distance(t.double().numpy(), b), rel=1e-12)
    with pytest.raises(ValueError):
        fit_gaussian(a[:1])
    with pytest.raises(ValueError):
        frechet_distance(a, b[:, :10])


def test_frechet_3d_moves_the_right_way(real_vols):
    """FD(real crops, other real crops) << FD(real crops, noise crops) in a fixed 3D feature space."""
    rng = np.random.default_rng(4)

    def crops(n):
        out = []
        for _ in range(n):
            v = real_vols[rng.integers(len(real_vols))]
            d, h, w = (rng.integers(0, s - 16 + 1) for s in v.shape)
            out.append(v[d:d + 16, h:h + 16, w:w + 16])
        return out

    real_a, real_b = crops(40), crops(40)
    noise = [noise_like(c, i) for i, c in enumerate(crops(40))]
    net = RandomConv3d()
    fa, fb, fn = (volume_features(x, net, batch_size=8) for x in (real_a, real_b, noise))
    assert fa.shape == (40, 16)
    assert frechet_3d(fa, fb) * 10 < frechet_3d(fa, fn)


def test_volume_features_batches_mixed_shapes_in_order(real_vols):
    net = RandomConv3d()
    vols = [real_vols[1][:8, :16, :16], real_vols[1][8:16, :16, :16], real_vols[0][:8, :20, :12],
            torch.from_numpy(real_vols[2][:8, :16, :16])[None]]  # (1, D, H, W) accepted too
    feats = volume_features(vols, net, batch_size=2)
    one_by_one = np.concatenate([volume_features([v], net) for v in vols])
    np.testing.assert_allclose(feats, one_by_one, rtol=1e-5, atol=1e-6)


# --- FID on slices ---------------------------------------------------------------------------

def test_slice_stack_planes_and_deterministic_sampling():
    vol = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(4, 5, 6)  # (D, H, W)
    assert torch.equal(slice_stack(vol, "axial"), vol)
    assert torch.equal(slice_stack(vol, "coronal")[2], vol[:, 2, :].flip(0))  # (D, W), superior first
    assert torch.equal(slice_stack(vol, "sagittal")[5], vol[:, :, 5].flip(0))  # (D, H)
    assert slice_stack(vol.numpy()[None], "sagittal", n=3).shape == (3, 4, 5)
    picked = slice_stack(vol, "sagittal", n=3)
    assert torch.equal(picked, slice_stack(vol, "sagittal", n=3))
    assert torch.equal(picked[:, 0, 0], vol[3, 0, [1, 3, 5]])  # bin centres of 6 in 3: 1, 3, 5
    assert slice_stack(vol, "axial", n=10).shape == (4, 5, 6)
    with pytest.raises(ValueError):
        slice_stack(vol, "oblique")


def test_fid_2d_moves_the_right_way(real_vols):
    """Interleaved real halves << real vs real + noise << real vs pure noise, in every plane."""
    net = RandomConv2d()
    half_a = [v[0::2] for v in real_vols]
    half_b = [v[1::2] for v in real_vols]
    noisy = [b + np.random.default_rng(i).normal(0, 150, b.shape).astype(np.float32) for i, b in enumerate(half_b)]
    noise = [noise_like(b, i) for i, b in enumerate(half_b)]
    real_feats = slice_features(half_a, net)
    same = fid_from_features(real_feats, slice_features(half_b, net))
    worse = fid_from_features(real_feats, slice_features(noisy, net))
    worst = fid_from_features(real_feats, slice_features(noise, net))
    assert set(same) == {"axial", "coronal", "sagittal", "mean"}
    for key in same:
        assert same[key] < worse[key] < worst[key], key
        assert same[key] * 10 < worst[key], key
    assert same["mean"] == pytest.approx(np.mean([same[p] for p in ("axial", "coronal", "sagittal")]))
    direct = fid_2d(half_a, half_b, net, planes=("axial",), n_slices=40)
    assert set(direct) == {"axial", "mean"} and direct["axial"] == direct["mean"]


# --- CLIP score ------------------------------------------------------------------------------

def test_clip_score_formula_and_matched_pairs_score_higher():
    rng = np.random.default_rng(5)
    img = rng.normal(size=(64, 32))
    txt = img + 0.5 * rng.normal(size=img.shape)  # matched: close to its own volume
    matched, shuffled = clip_score(img, txt), clip_score(img, txt[rng.permutation(64)])
    assert matched.shape == (64,) and matched.mean() > shuffled.mean() + 30
    cos = (img * txt).sum(1) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)
    np.testing.assert_allclose(matched, 100 * np.maximum(cos, 0), rtol=1e-10)
    np.testing.assert_allclose(clip_score(img, -img), 0.0)  # negative cosine clipped to 0
    np.testing.assert_allclose(clip_score(torch.from_numpy(img), 3 * torch.from_numpy(img)), 100.0)
    np.testing.assert_allclose(image_similarity(img, -2 * img), -1.0)
    assert image_similarity(img, txt).mean() > image_similarity(img, txt[::-1]).mean()
    with pytest.raises(ValueError):
        clip_score(img, txt[:10])


# --- abnormality faithfulness ----------------------------------------------------------------

def test_auroc_against_sklearn_and_pairwise_count_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(6)
    for _ in range(20):
        n = int(rng.integers(5, 60))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            continue
        s = np.round(rng.normal(size=n) + y, 1)  # rounding makes ties
        pos, neg = s[y == 1], s[y == 0]
        pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (pos.size * neg.size)
        assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert auroc(s, y) == pytest.approx(pairwise, abs=1e-12)


def test_auroc_per_label_moves_the_right_way():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, (400, 4)).astype(float)
    labels[:, 3] = 0  # one class only: no AUROC
    scores = np.stack([labels[:, 0], -labels[:, 1], rng.normal(size=400), rng.normal(size=400)], 1)
    out = auroc_per_label(scores, labels, ["perfect", "reversed", "random", "absent"])
    assert out["perfect"] == 1.0 and out["reversed"] == 0.0
    assert abs(out["random"] - 0.5) < 0.08
    assert math.isnan(out["absent"])
    assert out["macro"] == pytest.approx((1.0 + 0.0 + out["random"]) / 3)
    labels_unknown = labels.copy()
    labels_unknown[:10, 0] = np.nan  # unknown labels are skipped
    assert auroc_per_label(scores, labels_unknown, ["perfect", "reversed", "random", "absent"])["perfect"] == 1.0
    with pytest.raises(ValueError):
        auroc_per_label(scores, labels, ["a", "b", "c"])


def test_tstr_summary():
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 2, (200, 2)).astype(float)
    real_trained = labels + 0.3 * rng.normal(size=labels.shape)
    synth_trained = labels + 1.5 * rng.normal(size=labels.shape)
    out = tstr_summary(real_trained, synth_trained, labels, ["a", "b"])
    assert set(out) == {"a", "b", "macro"}
    for row in out.values():
        assert row["trtr"] > row["tstr"] > 0.5 and row["gap"] == pytest.approx(row["trtr"] - row["tstr"])


# --- HU checks -------------------------------------------------------------------------------

def test_tissue_stats_on_known_blocks():
    vol = np.concatenate([np.full((2, 4, 4), v, np.float32) for v in (-1000, -800, -100, 40, 700, 200)])
    st = tissue_stats(vol)
    expected = {"air": -1000, "lung": -800, "fat": -100, "soft_tissue": 40, "bone": 700}
    for tissue, hu in expected.items():
        assert st[tissue]["median"] == st[tissue]["p5"] == st[tissue]["p95"] == hu
        assert st[tissue]["fraction"] == pytest.approx(1 / 6)
    empty = tissue_stats(np.full((2, 2, 2), 40.0))["lung"]
    assert empty["fraction"] == 0 and math.isnan(empty["median"])


def test_hu_histogram_counts_every_voxel(real_vols):
    density, edges = hu_histogram(real_vols[0])
    assert edges[0] == -1024 and edges[-1] == 3072
    assert (density * np.diff(edges)).sum() == pytest.approx(1.0)
    # every voxel counted: those outside the range in the end bins (numpy's own histogram as the reference)
    v = np.asarray(real_vols[0], dtype=np.float64)
    counts = np.histogram(v, bins=edges)[0]
    counts[0] += int((v < edges[0]).sum())
    counts[-1] += int((v > edges[-1]).sum())
    assert counts.sum() == v.size
    np.testing.assert_allclose(density, counts / (v.size * np.diff(edges)))
    low = hu_histogram(np.array([-3000.0, 0.0, 5000.0, 5000.0]))[0] * 16.0  # 16 HU bins: the share of each
    assert low[0] == pytest.approx(0.25) and low[-1] == pytest.approx(0.5)
    d2, e2 = hu_histogram(real_vols[0], bins=50)
    assert d2.shape == (50,) and e2.shape == (51,)


def test_hu_flags_noise_but_not_a_real_like_volume(real_vols):
    reals = [tissue_stats(v) for v in real_vols]
    assert all(s["lung"]["fraction"] > 0.05 for s in reals)
    rng = np.random.default_rng(9)
    # Real-like: a chest scan, resampled and with some acquisition noise.
    real_like = real_vols[0][::2] + rng.normal(0, 10, real_vols[0][::2].shape).astype(np.float32)
    assert flag_out_of_range(tissue_stats(real_like), reals) == []
    flags = flag_out_of_range(tissue_stats(noise_like(real_vols[0], 1)), reals)
    assert {f["tissue"] for f in flags} >= {"lung", "bone"}
    assert all(f["reason"] == "above" for f in flags if f["tissue"] in ("lung", "bone"))
    no_bone = flag_out_of_range(tissue_stats(np.clip(real_vols[0], None, 250)), reals)
    assert [f["reason"] for f in no_bone] == ["missing"]
    # Tolerance widens the range: a lung shifted by 60 HU is flagged at 20 HU, not at 200 HU.
    shifted = tissue_stats(real_vols[0])
    shifted["lung"]["median"] = max(s["lung"]["median"] for s in reals) + 60
    assert [f["tissue"] for f in flag_out_of_range(shifted, reals, tolerance_hu=20)] == ["lung"]
    assert flag_out_of_range(shifted, reals, tolerance_hu=200) == []


# --- paired permutation test -----------------------------------------------------------------

def _scipy_paired(a, b, n, alternative, seed=0):
    res = stats.permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), vectorized=True,
                                 permutation_type="samples", n_resamples=n, alternative=alternative,
                                 rng=np.random.default_rng(seed))
    return res.pvalue


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_permutation_exact_matches_scipy(alternative):
    rng = np.random.default_rng(10)
    a = rng.normal(size=10)
    b = a - 0.4 + 0.5 * rng.normal(size=10)
    ours = paired_permutation_test(a, b, n_permutations=10_000, alternative=alternative)
    assert ours["exact"] and ours["diff"] == pytest.approx(np.mean(a - b))
    assert ours["p_value"] == pytest.approx(_scipy_paired(a, b, 10_000, alternative), rel=1e-12)


def test_permutation_random_matches_scipy_within_monte_carlo_error():
    rng = np.random.default_rng(11)
    a = rng.normal(size=40)
    b = a - 0.15 + 0.6 * rng.normal(size=40)
    ours = paired_permutation_test(a, b, n_permutations=10_000, seed=3)
    ref = _scipy_paired(a, b, 10_000, "two-sided")
    assert not ours["exact"] and 0.005 < ref < 0.5
    assert abs(ours["p_value"] - ref) < 4 * math.sqrt(ref * (1 - ref) / 10_000) + 1e-3
    assert paired_permutation_test(a, b, seed=3) == ours  # seeded: reproducible


def test_permutation_moves_the_right_way():
    rng = np.random.default_rng(12)
    a = rng.normal(size=50)
    assert paired_permutation_test(a, a.copy())["p_value"] == 1.0
    same_dist = paired_permutation_test(a, a + 0.05 * rng.normal(size=50))
    assert same_dist["p_value"] > 0.05
    better = paired_permutation_test(a + 1.0 + 0.3 * rng.normal(size=50), a)
    assert better["diff"] > 0.8 and better["p_value"] < 0.01
    assert better["p_value"] == pytest.approx(1 / 10_001)  # no pattern as extreme: (0 + 1) / (n + 1)
    with pytest.raises(ValueError, match="one shape"):
        paired_permutation_test(a, a[:5])


# --- InceptionV3 from a local path -----------------------------------------------------------

def test_inception_from_path_roundtrip_and_key_check(tmp_path, real_vols):
    """No real weights offline: random weights saved as pytorch-fid would (.pth without BatchNorm
    counters) and as safetensors load by name; a foreign state dict is refused."""
    from safetensors.torch import save_file

    from ctgen.metrics.inception import InceptionConfig, InceptionV3Features

    torch.manual_seed(0)
    cfg = InceptionConfig(size=75)  # the smallest input that runs, for speed
    model = InceptionV3Features(cfg)
    assert sum(p.numel() for p in model.parameters()) == 23_850_960  # torchvision's, less aux, fc 1008
    for m in model.modules():  # non-trivial BatchNorm statistics, so that loading them matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "pt_inception.pth")
    save_file(state, tmp_path / "inception.safetensors")
    x = torch.from_numpy(slice_stack(real_vols[0], "axial", n=2).numpy())[:, None]  # (2, 1, H, W) HU
    expected = model(x)
    assert expected.shape == (2, 2048)
    for name in ("pt_inception.pth", "inception.safetensors"):
        loaded = InceptionV3Features.from_path(tmp_path / name, cfg)
        torch.testing.assert_close(loaded(x), expected)
    feats = slice_features(real_vols[:1], loaded, planes=("coronal",), n_slices=3)["coronal"]
    assert feats.shape == (3, 2048)
    torch.save({"fc.weight": state["fc.weight"]}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an InceptionV3"):
        InceptionV3Features.from_path(tmp_path / "other.pth", cfg)


# --- reported numbers: guard, CI, profile ------------------------------------------------------------


def test_bootstrap_ci_two_resamples_both_sets_independently():
    from ctgen.metrics.summary import bootstrap_ci_two

    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 300), rng.normal(1, 2, 200)
    (lo, hi), dropped = bootstrap_ci_two(lambda i, j: b[j].mean() - a[i].mean(), len(a), len(b), n_boot=2000)
    se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))  # the independent normal approximation
    diff = b.mean() - a.mean()
    assert dropped == 0 and abs(lo - (diff - 1.96 * se)) < 0.04 and abs(hi - (diff + 1.96 * se)) < 0.04


def test_frechet_value_matches_the_plain_distance_and_carries_its_record():
    from ctgen.metrics.distribution import FeatureRows, frechet_value

    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(120, 6)), rng.normal(size=(100, 6)) + 0.4
    m = frechet_value(FeatureRows.per_volume(real), FeatureRows.per_volume(fake), "fd", profile="net@1234",
                      stems="abc", n_boot=100)
    assert m.value == pytest.approx(frechet_distance_scipy(real, fake), rel=1e-6)  # pytorch-fid's computation
    assert m.n == 100 and m.extra["n_real"] == 120 and m.profile == "net@1234" and m.stems == "abc"
    assert m.flag is None and m.extra["dim"] == m.extra["full_dim"] == 6
    assert m.ci[0] <= m.value <= m.ci[1] and m.ci[1] - m.ci[0] > 0
    record = m.to_json()
    assert record["ci"] == list(m.ci) and MetricValue.from_json(record) == m


def test_frechet_ci_resamples_whole_reports_and_patients():
    """Four volumes of each of 30 reports nearly alike (repeats of one prompt), against real reconstructions of
    30 patients (three each): resampling volumes narrows the CI as if there were 120 and 90 independent
    ones; resampling reports and patients gives the interval of one volume per report and patient. Groups of
    one volume each draw exactly what no groups draw."""
    from ctgen.metrics.distribution import FeatureRows, frechet_value

    rng = np.random.default_rng(4)
    fake_once, real_once = rng.normal(size=(30, 3)) + 0.8, rng.normal(size=(30, 3))
    near = lambda x, k: np.repeat(x, k, axis=0) + 0.01 * rng.normal(size=(len(x) * k, 3))  # noqa: E731
    fake, real = near(fake_once, 4), near(real_once, 3)
    fake_stems = [f"valid_{i}_a_1" for i in range(30) for _ in range(4)]
    real_stems = [f"valid_{100 + i}_a_{r}" for i in range(30) for r in (1, 2, 3)]
    kw = {"n_boot": 300, "seed": 2}
    width = lambda m: m.ci[1] - m.ci[0]  # noqa: E731
    once = frechet_value(FeatureRows.per_volume(real_once), FeatureRows.per_volume(fake_once), "fd", **kw)
    naive = frechet_value(FeatureRows.per_volume(real), FeatureRows.per_volume(fake), "fd", **kw)
    grouped = frechet_value(FeatureRows.per_volume(real), FeatureRows.per_volume(fake), "fd", groups_fake=fake_stems,
                            groups_real=real_stems, **kw)
    assert grouped.value == naive.value and width(naive) < 0.7 * width(once)
    assert width(grouped) == pytest.approx(width(once), rel=0.25)
    assert grouped.extra["resampled"] == "patients" and grouped.extra["n_resampled"] == 30
    assert grouped.extra["n_resampled_real"] == 30 and "only" not in (grouped.flag or "")
    singles = frechet_value(FeatureRows.per_volume(real_once), FeatureRows.per_volume(fake_once), "fd",
                            groups_fake=[f"p{i}" for i in range(30)], groups_real=[f"q{i}" for i in range(30)], **kw)
    assert singles.ci == once.ci and "resampled" not in singles.extra
    few = frechet_value(FeatureRows.per_volume(real), FeatureRows.per_volume(fake[:36]), "fd",
                        groups_fake=fake_stems[:36], **kw)
    assert "only 9 patients" in few.flag  # 36 volumes of 9 reports: the thin side's units are counted


def test_frechet_with_fewer_samples_than_dimensions_is_reduced_and_flagged():
    from ctgen.metrics.distribution import FeatureRows, frechet_value, principal_axes

    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(10, 32)), rng.normal(size=(12, 32))
    m = frechet_value(FeatureRows.per_volume(real), FeatureRows.per_volume(fake), "fd", n_boot=50)
    assert m.extra["full_dim"] == 32 and m.extra["dim"] == 9 and "9 principal axes" in m.flag
    axes = principal_axes(torch.as_tensor(real), 9).numpy()  # the stated reduction, computed independently
    assert m.value == pytest.approx(frechet_distance(real @ axes, fake @ axes), rel=1e-6)
    one = frechet_value(FeatureRows.per_volume(real[:1]), FeatureRows.per_volume(fake), "fd", n_boot=20)
    assert one.value is None and "fewer than 2" in one.flag


def test_frechet_over_slices_resamples_volumes_and_moves_the_right_way():
    from ctgen.metrics.distribution import FeatureRows, frechet_values

    rng = np.random.default_rng(3)
    volumes = lambda shift, n: [rng.normal(shift, 1, size=(8, 4)) for _ in range(n)]  # noqa: E731  8 slices each
    real = {"axial": FeatureRows.stacked(volumes(0, 30)), "coronal": FeatureRows.stacked(volumes(0, 30))}
    same = {"axial": FeatureRows.stacked(volumes(0, 25)), "coronal": FeatureRows.stacked(volumes(0, 25))}
    far = {"axial": FeatureRows.stacked(volumes(2, 25)), "coronal": FeatureRows.stacked(volumes(1, 25))}
    near = frechet_values(real, same, "fid", n_boot=60, mean=True)
    shifted = frechet_values(real, far, "fid", n_boot=60, mean=True)
    assert near["axial"].n == 25 and near["axial"].extra["rows_generated"] == 200  # n counts volumes, not slices
    for plane in ("axial", "coronal", "mean"):
        assert shifted[plane].ci[0] > near[plane].ci[1], plane  # separated beyond their CIs
    assert shifted["mean"].value == pytest.approx((shifted["axial"].value + shifted["coronal"].value) / 2)
    assert shifted["axial"].value == pytest.approx(16.0, abs=3.0)  # |mu_a - mu_b|^2 = 4 dims x 2^2, same covariances


def test_retrieval_ranks_against_a_brute_force_count():
    from ctgen.metrics.retrieval import distinct_texts, retrieval_ranks, top_k_accuracy

    rng = np.random.default_rng(4)
    img, txt = rng.normal(size=(20, 8)), rng.normal(size=(30, 8))
    target = rng.integers(0, 30, 20)
    ranks = retrieval_ranks(img, txt, target)
    cos = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
    assert (ranks == np.array([(cos[i] >= cos[i, target[i]]).sum() for i in range(20)])).all()
    texts, index = distinct_texts(["a", "b", "a", "c"])
    assert texts == ["a", "b", "c"] and index.tolist() == [0, 1, 0, 2]
    m = top_k_accuracy(ranks, 5, 30, "retrieval.top5", profile="clip@1")
    assert m.value == pytest.approx((ranks <= 5).mean()) and m.extra["chance"] == pytest.approx(5 / 30)
    assert m.n == 20 and m.ci is not None and m.profile == "clip@1"
    tied = retrieval_ranks(np.ones((3, 4)), np.ones((5, 4)), np.array([0, 1, 2]))
    assert (tied == 5).all()  # a constant embedding is never a hit by ties


def test_retrieval_moves_the_right_way():
    from ctgen.metrics.retrieval import retrieval_ranks, top_k_accuracy

    rng = np.random.default_rng(5)
    txt = rng.normal(size=(40, 16))
    target = np.arange(40)
    aligned = txt + 0.3 * rng.normal(size=txt.shape)  # volumes near their own report
    unrelated = rng.normal(size=txt.shape)
    good = top_k_accuracy(retrieval_ranks(aligned, txt, target), 1, 40, "r")
    bad = top_k_accuracy(retrieval_ranks(unrelated, txt, target), 1, 40, "r")
    assert good.value > 0.9 and good.ci[0] > bad.ci[1]
    assert bad.value < 0.2  # about chance (1/40)


def test_take_slice_is_the_slice_stack_cut():
    vol = torch.arange(5 * 6 * 7, dtype=torch.float32).reshape(5, 6, 7)
    for plane, size in (("axial", 5), ("coronal", 6), ("sagittal", 7)):
        stack = slice_stack(vol, plane)
        assert len(stack) == size
        for i in range(size):
            assert torch.equal(stack[i], take_slice(vol, plane, i)), (plane, i)


def test_swap_test_of_the_mean_is_the_sign_flip_test_and_matches_scipy():
    from ctgen.metrics.permutation import paired_swap_test

    rng = np.random.default_rng(13)
    a = rng.normal(size=10)
    b = a - 0.4 + 0.5 * rng.normal(size=10)
    swap = paired_swap_test(lambda u, v: float(np.mean(u - v)), a, b, n_permutations=10_000)
    assert swap["exact"] and swap["dropped"] == 0
    assert swap["p_value"] == pytest.approx(_scipy_paired(a, b, 10_000, "two-sided"), rel=1e-9)


def test_permutation_tests_swap_whole_reports_where_a_report_has_several_pairs():
    """Repeats of one report share its labels and text: the null swaps whole reports. Flipping a report's sign
    flips the sum of its differences, so the test equals scipy's on the per-report sums (an independent reference);
    counting the 24 repeats as independent pairs gives a far smaller, wrong p-value."""
    from ctgen.metrics.permutation import paired_swap_test

    rng = np.random.default_rng(15)
    groups = np.repeat(np.arange(8), 3)  # 8 reports x 3 repeats
    shift = rng.normal(size=8)[groups]  # what a report does to both runs alike, and a per-report effect
    a = shift + 0.3 + 0.6 * rng.normal(size=8)[groups] + 0.05 * rng.normal(size=24)
    b = shift.copy()
    sums = [np.bincount(groups, weights=x) for x in (a, b)]
    ours = paired_permutation_test(a, b, n_permutations=10_000, groups=groups)
    assert ours["exact"] and ours["diff"] == pytest.approx(np.mean(a - b))
    assert ours["p_value"] == pytest.approx(_scipy_paired(*sums, 10_000, "two-sided"), rel=1e-9)
    swap = paired_swap_test(lambda u, v: float(np.mean(u - v)), a, b, n_permutations=10_000, groups=groups)
    assert swap["exact"] and swap["p_value"] == pytest.approx(ours["p_value"], rel=1e-9)
    assert paired_permutation_test(a, b, n_permutations=10_000)["p_value"] < ours["p_value"] / 4
    with pytest.raises(ValueError, match="groups"):
        paired_permutation_test(a, b, groups=groups[:5])


def test_swap_test_of_a_macro_auroc_difference():
    """Swapping rows of two runs' (N, L) probabilities: a run that ranks the labels right beats a random one."""
    from ctgen.metrics.permutation import paired_swap_test

    rng = np.random.default_rng(14)
    y = (rng.uniform(size=(40, 3)) < 0.4).astype(float)
    good = np.clip(y * 0.6 + 0.2 + 0.2 * rng.normal(size=y.shape), 0, 1)
    noise = rng.uniform(size=y.shape)

    def macro_diff(u, v):
        return float(np.mean([auroc(u[:, j], y[:, j]) - auroc(v[:, j], y[:, j]) for j in range(3)]))

    res = paired_swap_test(macro_diff, good, noise, n_permutations=500, seed=1)
    assert not res["exact"] and res["diff"] > 0.3 and res["p_value"] < 0.01
    same = paired_swap_test(macro_diff, good, good.copy(), n_permutations=200)
    assert same["diff"] == 0 and same["p_value"] == 1.0
    null = paired_swap_test(macro_diff, noise, rng.uniform(size=y.shape), n_permutations=500, seed=2)
    assert null["p_value"] > 0.05
