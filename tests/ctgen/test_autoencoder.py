"""MAISI autoencoder: NVIDIA checkpoints through our loader, the layout and intensity map against MONAI's
network called directly, the (mu, sigma) cache side, bounded-memory decoding, the training loss."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from einops import rearrange
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from safetensors.torch import save_file

from ctgen.models.autoencoder import LatentStats, MaisiAutoencoder, MaisiAutoencoderConfig

PRESET = Path(__file__).resolve().parents[2] / "config.yaml"  # model_presets.report2ct

# NVIDIA's published MAISI CT autoencoder, as written in MONAI's model zoo
# (models/maisi_ct_generative/configs/inference.json, "autoencoder_def"), typed in independently
# of MaisiAutoencoderConfig so that a drift in our defaults fails here.
NVIDIA_AUTOENCODER = dict(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4,
                          num_channels=[64, 128, 256], num_res_blocks=[2, 2, 2], norm_num_groups=32, norm_eps=1e-6,
                          attention_levels=[False, False, False], with_encoder_nonlocal_attn=False,
                          with_decoder_nonlocal_attn=False, use_checkpointing=False, use_convtranspose=False,
                          norm_float16=False, num_splits=1, dim_split=1)


def tiny(**overrides) -> MaisiAutoencoderConfig:
    """A 3-level MAISI autoencoder small enough for CPU tests (4x down-sampling like NVIDIA's)."""
    base = dict(num_channels=(8, 16, 16), norm_num_groups=4, disc_channels=4, disc_layers=2, decode_window=(4, 4, 4))
    return MaisiAutoencoderConfig(**{**base, **overrides})


def volume(b=1, d=16, h=24, w=32, seed=0) -> torch.Tensor:
    """A smooth random volume (B, 1, D, H, W) in [-1, 1]: no axis is symmetric, so a wrong permutation shows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.avg_pool3d(torch.rand(b, 1, d + 2, h + 2, w + 2, generator=g), 3, stride=1)
    return (x - x.amin()) / (x.amax() - x.amin()) * 2 - 1


@pytest.fixture(scope="module")
def nvidia_net():
    """MONAI's network with NVIDIA's settings, seeded: the 'released checkpoint' of these tests."""
    torch.manual_seed(0)
    return AutoencoderKlMaisi(**NVIDIA_AUTOENCODER).eval()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MaisiAutoencoder(tiny()).eval()


# --- NVIDIA checkpoints -----------------------------------------------------------------------
def _monai_generative_layout(state: dict) -> dict:
    """The older MONAI Generative key layout: one `.conv` level fewer inside encoder/decoder convs."""
    return {k.replace("conv.conv.weight", "conv.weight").replace("conv.conv.bias", "conv.bias")
            if k.startswith(("encoder.", "decoder.")) else k: v for k, v in state.items()}


@pytest.mark.parametrize("layout", ["plain", "unet_state_dict", "monai_generative", "dataparallel", "safetensors"])
def test_loads_an_nvidia_layout_checkpoint(nvidia_net, tmp_path, layout):
    state = {k: v.clone() for k, v in nvidia_net.state_dict().items()}
    path = tmp_path / ("ae.safetensors" if layout == "safetensors" else "autoencoder_epoch273.pt")
    if layout == "safetensors":
        save_file(state, path)
    else:
        obj = {"plain": state, "unet_state_dict": {"unet_state_dict": state, "epoch": 273},
               "monai_generative": _monai_generative_layout(state),
               "dataparallel": {f"module.{k}": v for k, v in state.items()}}[layout]
        torch.save(obj, path)
    if layout == "monai_generative":
        assert set(obj) != set(state)  # the old layout really differs
    ours = MaisiAutoencoder.from_maisi_checkpoint(path)  # NVIDIA's architecture is our default
    loaded = ours.net.state_dict()
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    assert ours.discriminator is not None  # training extras stay; the checkpoint only fills the network


def test_our_layout_and_intensity_map_match_monai_called_directly(nvidia_net, tmp_path):
    """Our (D, H, W) [-1, 1] interface == MONAI's network on the RAS (I, J, K) [0, 1] array it was trained on."""
    torch.save(nvidia_net.state_dict(), tmp_path / "ae.pt")
    ours = MaisiAutoencoder.from_maisi_checkpoint(tmp_path / "ae.pt", adv_weight=0.0).eval()
    x = volume(1, 8, 12, 16)  # (B, C, D, H, W)
    with torch.no_grad():
        mu, sigma = ours.encode(x)
        ref_mu, ref_sigma = nvidia_net.encode(rearrange((x + 1) / 2, "b c d h w -> b c w h d"))
        assert torch.allclose(mu, rearrange(ref_mu, "b c i j k -> b c k j i"), atol=1e-5)
        assert torch.allclose(sigma, rearrange(ref_sigma, "b c i j k -> b c k j i"), atol=1e-5)
        ref = nvidia_net.decode(rearrange(mu, "b c d h w -> b c w h d"))  # in [0, 1] units, (I, J, K)
        assert torch.allclose(ours.decode(mu, window=None), rearrange(ref * 2 - 1, "b c i j k -> b c k j i"), atol=1e-5)
    assert mu.shape == (1, 4, 2, 3, 4)


def test_mismatching_checkpoints_are_refused_with_keys_named(nvidia_net, tmp_path):
    state = nvidia_net.state_dict()
    torch.save(state, tmp_path / "ae.pt")
    with pytest.raises(ValueError, match=r"shape mismatches.*encoder\.blocks\.0\.conv\.conv\.weight \(64, 1, 3, 3, 3\) "
                                         r"vs \(32, 1, 3, 3, 3\)"):
        MaisiAutoencoder(MaisiAutoencoderConfig(num_channels=(32, 64, 128))).load_maisi_checkpoint(tmp_path / "ae.pt")
    dropped = dict(state)
    del dropped["quant_conv_mu.conv.weight"]
    torch.save(dropped, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"1 missing keys \(first: quant_conv_mu\.conv\.weight\)"):
        MaisiAutoencoder.from_maisi_checkpoint(tmp_path / "missing.pt")
    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"1 unexpected keys \(first: extra\.weight\)"):
        MaisiAutoencoder.from_maisi_checkpoint(tmp_path / "extra.pt")


class _NotWeights:
    pass


def test_non_weight_files_are_refused_without_unpickling(tmp_path):
    torch.save({"net": _NotWeights()}, tmp_path / "code.pt")
    with pytest.raises(ValueError, match="not a weights-only torch checkpoint"):
        MaisiAutoencoder.from_maisi_checkpoint(tmp_path / "code.pt")
    torch.save({"epoch": 3}, tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match="expected a state dict of tensors"):
        MaisiAutoencoder.from_maisi_checkpoint(tmp_path / "nothing.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MaisiAutoencoder.from_maisi_checkpoint(tmp_path / "absent.pt")
    # a download cut short, or an HTML error page saved under the name: one line naming the file
    save_file({"w": torch.zeros(64)}, tmp_path / "whole.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "whole.safetensors").read_bytes()[:40])
    (tmp_path / "page.safetensors").write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    for name in ("cut.safetensors", "page.safetensors"):
        with pytest.raises(ValueError, match=rf"{name}: not a readable safetensors file \(SafetensorError"):
            MaisiAutoencoder.from_maisi_checkpoint(tmp_path / name)


def test_nvidia_weights_through_the_training_job(nvidia_net, tmp_path):
    """train_autoencoder with maisi_checkpoint: the same file gives the same weights file each time (the
    discriminator it does not hold is built seeded: its hash names the autoencoder in the latents' and samples'
    records), and a prep window other than NVIDIA's [-1000, 1000] is refused (their encoder would read shifted
    intensities)."""
    from safetensors.torch import load_file

    from ctgen.jobs.train_latent import train_autoencoder

    torch.save(nvidia_net.state_dict(), tmp_path / "ae.pt")
    cfg = {"model": {"adv_weight": 0.1}, "data": {"hu_window": [-1000, 1000]}, "maisi_checkpoint": str(tmp_path / "ae.pt")}
    torch.manual_seed(123)
    first = load_file(train_autoencoder(cfg, tmp_path / "a", tmp_path / "ck") / "model.safetensors")
    torch.manual_seed(456)
    second = load_file(train_autoencoder(cfg, tmp_path / "b", tmp_path / "ck") / "model.safetensors")
    assert any(k.startswith("discriminator.") for k in first)
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(ValueError, match=r"trained on HU \[-1000.0, 1000.0\].*clips to \[-1024.0, 3071.0\]"):
        train_autoencoder({**cfg, "data": {"hu_window": [-1024, 3071]}}, tmp_path / "c", tmp_path / "ck")


# --- our own format and the latent cache side -------------------------------------------------
def test_save_from_pretrained_round_trip(model, tmp_path):
    model.set_scale_factor(0.731)
    model.save_pretrained(tmp_path / "ae", seed=0)
    loaded = MaisiAutoencoder.from_pretrained(tmp_path / "ae").eval()
    assert loaded.config == model.config and float(loaded.scale_factor) == pytest.approx(0.731)
    x = volume()
    with torch.no_grad():
        for a, b in zip(model.encode(x), loaded.encode(x)):
            assert torch.equal(a, b)
        z = torch.randn(1, 4, 4, 6, 8, generator=torch.Generator().manual_seed(1))
        assert torch.equal(model.decode(z), loaded.decode(z))
    model.set_scale_factor(1.0)


def test_encode_returns_mu_and_sigma_deterministically(model):
    x = volume(2)
    with torch.no_grad():
        mu, sigma = model.encode(x)
        mu2, sigma2 = model.encode(x)
        model.train()
        mu3, _ = model.encode(x)  # no dropout or sampling in train mode either
        model.eval()
    assert mu.shape == sigma.shape == (2, 4, 4, 6, 8)
    assert (sigma > 0).all() and torch.equal(mu, mu2) and torch.equal(sigma, sigma2) and torch.equal(mu, mu3)
    assert not torch.allclose(sigma, torch.ones_like(sigma))  # a real posterior width, not a constant


def test_latent_stats_match_the_std_of_sampled_latents():
    g = torch.Generator().manual_seed(0)
    mus = [torch.randn(1, 4, 3, 5, 6, generator=g) * 0.7 + 0.3 for _ in range(5)]
    sigmas = [torch.rand(1, 4, 3, 5, 6, generator=g) * 0.5 + 0.1 for _ in range(5)]
    stats = LatentStats()
    for mu, sigma in zip(mus, sigmas):
        stats.update(mu, sigma)
    mu, sigma = torch.cat(mus).double(), torch.cat(sigmas).double()
    draws = mu + sigma * torch.randn((4000, *mu.shape), generator=g, dtype=torch.float64)  # Monte Carlo over eps
    assert stats.std == pytest.approx(float(draws.std()), rel=2e-3)
    assert stats.scale_factor == pytest.approx(1 / float(draws.std()), rel=2e-3)
    with pytest.raises(ValueError):
        MaisiAutoencoder(tiny()).set_scale_factor(float("nan"))


# --- bounded-memory decoding ------------------------------------------------------------------
def test_tensor_split_decode_equals_unsplit():
    torch.manual_seed(0)
    whole = MaisiAutoencoder(tiny()).eval()
    split = MaisiAutoencoder(tiny(num_splits=4, dim_split=1)).eval()
    split.load_state_dict(whole.state_dict())
    z = torch.randn(1, 4, 8, 16, 8, generator=torch.Generator().manual_seed(2))  # split axis J = H: 16 latent rows
    with torch.no_grad():
        a, b = whole.decode(z, window=None), split.decode(z, window=None)
    assert (a - b).abs().max() < 1e-4 and a.shape == (1, 1, 32, 64, 32)
    # MONAI's splitting dropped the rows past the last whole chunk without a word (14 latent rows decoded to 12 x 4
    # voxels), and failed inside a convolution below 3 rows a chunk: both refused in one line, before any work
    for rows in (14, 8):
        with pytest.raises(ValueError, match=f"{rows} voxels along the split axis .* use a multiple of 4"):
            split.decode(torch.zeros(1, 4, 8, rows, 8), window=None)
    with pytest.raises(ValueError, match="56 voxels along the split axis .* use a multiple of 16 .at least 48"):
        split.encode(torch.zeros(1, 1, 32, 56, 32), window=None)
    with pytest.raises(ValueError, match="the training crop: 40 voxels"):
        split(torch.zeros(1, 1, 32, 40, 32))
    assert split.encode(torch.zeros(1, 1, 32, 48, 32), window=None)[0].shape == (1, 4, 8, 12, 8)


def test_sliding_window_decode_stitches_windows(model):
    """The window reaches the code; a region covered by one window only is exactly that window's decode."""
    z = torch.randn(1, 4, 12, 12, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = model.decode(z, window=None)
        assert torch.equal(model.decode(z, window=(12, 12, 12)), whole)  # one window = the whole latent
        tiled = model.decode(z, window=(8, 8, 8))  # overlap 0.4: windows start at 0 and 4 on each axis
        corner = model.decode(z[:, :, :8, :8, :8], window=None)
    assert tiled.shape == whole.shape == (1, 1, 48, 48, 48) and torch.isfinite(tiled).all()
    assert torch.allclose(tiled[..., :16, :16, :16], corner[..., :16, :16, :16], atol=1e-5)
    assert not torch.allclose(tiled, whole, atol=1e-3)  # windows see their own GroupNorm statistics


def test_sliding_window_encode_places_each_windows_latent_on_its_own_voxels(model):
    """A whole 480x480x256 encode held ~53 GiB on the CPU: windows bound it. Where one window alone covers a region,
    the latents are exactly that window's encode, at the latent voxels of its place (the window's step is checked to
    be a whole number of latent voxels, else windows would blend latents half a voxel apart)."""
    x = volume(1, 16, 16, 32, seed=4)
    with torch.no_grad():
        whole = model.encode(x, window=None)
        assert all(torch.equal(a, b) for a, b in zip(model.encode(x, window=(16, 16, 32)), whole))  # "config": None
        assert all(torch.equal(a, b) for a, b in zip(model.encode(x), whole))
        halves = MaisiAutoencoder(tiny(encode_window=(16, 16, 16), encode_overlap=0.0)).eval()
        halves.load_state_dict(model.state_dict())
        mu, sigma = halves.encode(x)
        left, right = model.encode(x[..., :16], window=None), model.encode(x[..., 16:], window=None)
        overlapping = model.encode(x, window=(16, 16, 16))  # overlap 0.25: windows start at 0, 12, 16 voxels
    assert mu.shape == sigma.shape == whole[0].shape == (1, 4, 4, 4, 8)
    assert torch.allclose(mu[..., :4], left[0], atol=1e-6) and torch.allclose(mu[..., 4:], right[0], atol=1e-6)
    assert torch.allclose(sigma[..., 4:], right[1], atol=1e-6)
    assert torch.allclose(overlapping[0][..., :3], left[0][..., :3], atol=1e-5)  # seen by the first window alone
    assert not torch.allclose(mu, whole[0], atol=1e-3)  # windows see their own GroupNorm statistics
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny(encode_window=(16, 16, 18))
    with pytest.raises(ValueError, match=r"steps by \[9, 9, 9\] voxels: each step must be a multiple of 4"):
        tiny(encode_window=(12, 12, 12), encode_overlap=0.2)


# --- training -----------------------------------------------------------------------------------
def test_training_loss_terms_and_adversarial_switch():
    torch.manual_seed(0)
    m = MaisiAutoencoder(tiny(adversarial_start=5))
    x = volume(2, 16, 16, 16)
    before = m(x, step=4)
    assert before.adversarial_active == 0.0
    assert float(before.loss.detach()) == pytest.approx(float((before.recon_loss + 1e-7 * before.kl_loss).detach()), rel=1e-6)
    before.loss.backward()
    assert all(p.grad is not None for p in m.parameters())  # DDP: every parameter in the graph while off
    m.zero_grad()
    after = m(x, step=5)
    assert after.adversarial_active == 1.0 and after.disc_loss > 0 and after.kl_loss > 0
    # the generator's adversarial term trains only the autoencoder, never the discriminator
    grads = torch.autograd.grad(after.gen_adv_loss, list(m.discriminator.parameters()), allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads)
    assert set(after.logs()) >= {"loss", "recon_loss", "kl_loss", "gen_adv_loss", "disc_loss", "latent_sigma"}


def test_bad_input_shapes_are_named(model):
    with pytest.raises(ValueError, match=r"must be divisible by 4"):
        model.encode(torch.zeros(1, 1, 10, 16, 16))
    with pytest.raises(ValueError, match=r"expected a latent"):
        model.decode(torch.zeros(1, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="num_channels, num_res_blocks"):
        MaisiAutoencoderConfig(num_channels=(8, 16))


def test_overfits_one_volume():
    torch.manual_seed(0)
    m = MaisiAutoencoder(tiny(adv_weight=0.0))
    x = volume(1, 8, 16, 16)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        out = m(x, step=step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.recon_loss.detach()))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_report2ct_autoencoder_preset_builds_nvidia_architecture_and_trains_a_step(tmp_path):
    """The preset's autoencoder is NVIDIA's network; one step of the one loop on a training crop."""
    from ctgen.training.loop import TrainConfig, train

    section = yaml.safe_load(PRESET.read_text())["model_presets"]["report2ct"]["autoencoder"]
    torch.manual_seed(0)
    m = MaisiAutoencoder(MaisiAutoencoder.config_from_dict(section["model"]))
    reference = AutoencoderKlMaisi(**NVIDIA_AUTOENCODER).state_dict()
    assert {k: v.shape for k, v in m.net.state_dict().items()} == {k: v.shape for k, v in reference.items()}
    patch = [s // 2 for s in section["data"]["patch_size"]]  # half the training crop on each axis: CPU time
    x = volume(1, *patch)
    cfg = TrainConfig.from_dict({**section["train"], "max_steps": 1, "warmup_steps": 0, "tensorboard": False})
    before = {k: v.clone() for k, v in m.net.state_dict().items()}
    train(m, lambda ctx: iter([{"video": x}]), cfg, tmp_path / "ae", checkpoint_dir=tmp_path / "ckpt")
    after = MaisiAutoencoder.from_pretrained(tmp_path / "ae").net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert dataclasses.asdict(m.config)["num_channels"] == (64, 128, 256)


def test_the_window_benchmark_measures_zero_for_whole_windows_and_a_change_for_smaller_ones(tmp_path):
    """benchmarks/windowed_autoencoder.py on saved weights and real shards: windows as large as the volume are the
    whole encode and decode (no change); smaller ones change the latent and the decoded HU, with n and CIs."""
    from ctprep.shards import write_shards
    from ctprep.volume import Volume
    from tests.workflow.wf import benchmark

    torch.manual_seed(0)
    MaisiAutoencoder(tiny()).save_pretrained(tmp_path / "ae", seed=0)
    rng = np.random.default_rng(0)
    samples = [{"key": f"valid_{i}_a_1", "prompt": "", "prompts": {}, "meta": {}, "labels": [0] * 18,
                "volume": Volume.from_3d(rng.integers(-1000, 1000, (32, 24, 16), dtype=np.int16),
                                         np.diag([0.7, 0.8, 1.5, 1.0]))} for i in range(3)]
    write_shards(samples, tmp_path / "shards", "valid", shard_size=2, split="valid")
    manifest = tmp_path / "shards" / "valid.manifest.json"
    bench = benchmark("windowed_autoencoder")
    whole = bench.measure(tmp_path / "ae", manifest, (16, 24, 32), (4, 6, 8), n=2, hu_window=(-1000, 1000),
                          encode_overlap=0.5)
    assert whole["n"] == 2 and whole["volume_shapes"] == [[16, 24, 32]]  # (D, H, W) of a (I, J, K) = 32 x 24 x 16
    for name in ("latent_change", "encode_window_hu", "decode_window_hu"):
        assert whole[name]["mean"] == 0 and whole[name]["n"] == 2
    assert whole["recon_error_hu"]["mean"] > 0
    small = bench.measure(tmp_path / "ae", manifest, (8, 16, 16), (2, 3, 4), n=3, hu_window=(-1000, 1000),
                          encode_overlap=0.5)
    assert small["n"] == 3 and small["recon_error_hu"]["mean"] == pytest.approx(whole["recon_error_hu"]["mean"], rel=0.5)
    for name in ("latent_change", "encode_window_hu", "decode_window_hu"):
        assert small[name]["mean"] > 0 and small[name]["n"] == 3, (name, small[name])


def test_windows_are_d_h_w_in_the_model_layout():
    """An encode window that splits D alone is the two halves along D encoded apart (no overlap), and a decode
    window the same in latent voxels: a window given to MONAI in another axis order (the network's layout is
    W, H, D) would split other axes, which the cubic windows of the tests above cannot tell."""
    torch.manual_seed(0)
    m = MaisiAutoencoder(tiny(encode_overlap=0.0, decode_overlap=0.0)).eval()
    x = volume(1, 16, 24, 32, seed=1)  # (B, C, D, H, W)
    with torch.no_grad():
        mu = m.encode(x, window=(8, 24, 32))[0]
        halves = torch.cat([m.encode(x[:, :, :8], window=None)[0], m.encode(x[:, :, 8:], window=None)[0]], dim=2)
        torch.testing.assert_close(mu, halves, atol=1e-5, rtol=0)
        z = m.encode(x, window=None)[0]  # (1, 4, 4, 6, 8)
        y = m.decode(z, window=(2, 6, 8))
        parts = torch.cat([m.decode(z[:, :, :2], window=None), m.decode(z[:, :, 2:], window=None)], dim=2)
        torch.testing.assert_close(y, parts, atol=1e-5, rtol=0)
