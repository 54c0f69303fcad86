"""Super-resolution diffusion: schedule maths, sampler accuracy, the model's contract, and that a
briefly trained demo model beats bicubic upsampling on held-out phantom slices."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctgen.jobs.config import model_preset
from ctgen.models.superres_unet import SuperResConfig, SuperResDiffusion, SuperResOutput
from ctgen.schedulers.diffusion import VDiffusionScheduler, cosine_alphas_cumprod
from ctprep.demo.phantom import sample_anatomy

T = 1000
logger = logging.getLogger(__name__)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB for images in [-1, 1]."""
    return 10.0 * math.log10(data_range**2 / max(F.mse_loss(pred.float(), target.float()).item(), 1e-12))


# --- schedule and sampler -----------------------------------------------------------------------
def test_cosine_schedule_matches_diffusers():
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
    ours = cosine_alphas_cumprod(T)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-7)
    assert ours[0] > 0.9999 and ours[-1] < 1e-6 and (ours.diff() < 0).all()


def test_v_target_identities():
    torch.manual_seed(0)
    s = VDiffusionScheduler(T)
    x0, eps = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randn(6, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 900, 999])
    a, sg = s.alpha_sigma(t, x0)
    assert torch.allclose(a**2 + sg**2, torch.ones_like(a))
    x_t, v = s.add_noise(x0, eps, t), s.v_target(x0, eps, t)
    assert torch.allclose(v, a * eps - sg * x0)
    assert torch.allclose(s.x0_from_v(x_t, v, t), x0, atol=1e-12)
    assert torch.allclose(s.eps_from_v(x_t, v, t), eps, atol=1e-12)


def test_ddim_step_matches_diffusers():
    """One of our DDIM steps equals diffusers' DDIMScheduler (v-prediction, trailing spacing)."""
    from diffusers import DDIMScheduler

    torch.manual_seed(0)
    ref = DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                        timestep_spacing="trailing", clip_sample=False)
    ref.set_timesteps(10)
    ours = VDiffusionScheduler(T, "ddim")
    assert ours.timesteps(10).tolist() == ref.timesteps.tolist()
    x, v = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    ts = ref.timesteps.tolist()
    for i in (0, 3, 9):  # first, middle, last (to clean data: diffusers' set_alpha_to_one)
        expected = ref.step(v, ts[i], x).prev_sample
        assert torch.allclose(ours.ddim_step(x, v, ts[i], ts[i + 1] if i < 9 else None), expected, atol=1e-5)


def _gaussian_oracle(s: VDiffusionScheduler, mu: float, std: float):
    """The exact v of data ~ N(mu, std^2) per pixel: E[x0 | x_t] in closed form."""

    def model(x_t, t):
        a, sg = s.alpha_sigma(t, x_t)
        x0 = mu + a * std**2 / (a**2 * std**2 + sg**2) * (x_t - a * mu)
        return (a * x_t - x0) / sg

    return model


@pytest.mark.parametrize("solver", ["ddim", "dpmsolver"])
def test_sampler_recovers_a_point_mass(solver):
    s = VDiffusionScheduler(T, solver)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = s.sample(_gaussian_oracle(s, mu=0.3, std=0.0), x_T, steps=5)
    assert torch.allclose(out, torch.full_like(out, 0.3), atol=1e-5)


def test_samplers_converge_to_the_gaussian_ode_solution():
    """For Gaussian data the probability-flow ODE is linear: x0 = mu + std (x_T - a mu) / sqrt(a^2 std^2 + s^2).
    Both solvers converge to it; DPM-Solver++(2M) converges faster than DDIM."""
    s = VDiffusionScheduler(T)
    mu, std = 0.3, 0.5
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a, sg = s.alpha_sigma(torch.tensor([T - 1]), x_T)
    exact = mu + std * (x_T - a * mu) / torch.sqrt(a**2 * std**2 + sg**2)
    err = {(solver, n): (s.sample(_gaussian_oracle(s, mu, std), x_T, n, solver=solver) - exact).abs().max().item()
           for solver in ("ddim", "dpmsolver") for n in (5, 10, 20, 50, 100)}
    for solver in ("ddim", "dpmsolver"):
        assert err[solver, 5] > err[solver, 10] > err[solver, 20] > err[solver, 50] > err[solver, 100]
    assert 1.7 < err["ddim", 50] / err["ddim", 100] < 2.3  # first order: error ~ 1/N (0.049 at 50 steps)
    assert err["dpmsolver", 20] < 0.01 and err["dpmsolver", 100] < 1e-3  # 0.0047 and 0.00065
    assert all(err["dpmsolver", n] < err["ddim", n] / 5 for n in (20, 50, 100))


# --- the model ----------------------------------------------------------------------------------
# A 1.8M-parameter UNet on 2x2 patches, 16 -> 64 px: residual mode and 5 DDIM steps (after a few hundred
# steps the model knows edges but not sub-pixel detail, and fewer steps hallucinate less of it).
TEST_SR = dict(in_size=16, out_size=64, patch_size=2, channels=32, channel_mult=(1, 2, 2), layers_per_block=1,
               attention_levels=(1, 2), attention_head_dim=16, norm_groups=8, text_dim=32, cross_attention_dim=32,
               noise_aug_max=0.2, noise_aug_sample=0.05, residual=True, sample_steps=5, sampler="ddim")


def small(**overrides) -> SuperResConfig:
    """The test model at 8 -> 32 px: the contract tests run in seconds."""
    return SuperResConfig(**{**TEST_SR, "in_size": 8, "out_size": 32, **overrides})


def _batch(b=3, cfg=None, seed=0):
    cfg = cfg or small()
    g = torch.Generator().manual_seed(seed)
    hr = torch.rand(b, 1, cfg.out_size, cfg.out_size, generator=g) * 2 - 1
    lr = F.avg_pool2d(hr, cfg.out_size // cfg.in_size)
    text = torch.randn(b, 5, cfg.text_dim, generator=g)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] + [False] * 4][:b] + [[True] * 5] * max(0, b - 3))
    return {"hr": hr, "lr": lr, "text": text, "text_mask": mask}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SuperResDiffusion(small()).eval()


def test_forward_and_sample_shapes(model):
    batch = _batch()
    torch.manual_seed(1)
    out = model(**batch, step=7)
    assert isinstance(out, SuperResOutput) and out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.logs()) == {"loss", "x0_mse", "aug_level", "text_dropped"}
    out.loss.backward()
    assert model.null_text.grad is not None  # in the graph whether or not a sample dropped its text (DDP)
    model.zero_grad()
    y = model.sample(batch["lr"], batch["text"], batch["text_mask"], generator=torch.Generator().manual_seed(0))
    assert y.shape == (3, 1, 32, 32) and y.abs().max() <= 1.0
    y2 = model.sample(batch["lr"], batch["text"], batch["text_mask"], generator=torch.Generator().manual_seed(0),
                      batch_size=2)
    assert torch.allclose(y, y2, atol=1e-5)  # chunking does not change the slices
    assert model.sample(batch["lr"][:1], batch["text"][:1], batch["text_mask"][:1], out_size=64, steps=2).shape == (1, 1, 64, 64)


def test_sampling_is_deterministic_given_the_generator(model):
    b = _batch()
    args = (b["lr"], b["text"], b["text_mask"])
    y1 = model.sample(*args, generator=torch.Generator().manual_seed(5))
    y2 = model.sample(*args, generator=torch.Generator().manual_seed(5))
    y3 = model.sample(*args, generator=torch.Generator().manual_seed(6))
    assert torch.equal(y1, y2) and not torch.allclose(y1, y3)


def test_save_from_pretrained_gives_identical_outputs(model, tmp_path):
    model.save_pretrained(tmp_path / "sr", seed=0)
    loaded = SuperResDiffusion.from_pretrained(tmp_path / "sr").eval()
    assert loaded.config == model.config
    b = _batch()
    args = (b["lr"], b["text"], b["text_mask"])
    assert torch.equal(model.sample(*args, steps=3, generator=torch.Generator().manual_seed(3), guidance_scale=2.0),
                       loaded.sample(*args, steps=3, generator=torch.Generator().manual_seed(3), guidance_scale=2.0))


def _record_unet_calls(m, calls):
    orig = m.unet_v

    def spy(x_t, t, cond, aug_t, text, text_mask):
        calls.append((cond.clone(), aug_t.clone(), text.clone(), text_mask.clone()))
        return orig(x_t, t, cond, aug_t, text, text_mask)

    m.unet_v = spy  # instance attribute shadows the method that forward/sample call


def test_noise_augmentation_random_in_training_fixed_in_sampling():
    torch.manual_seed(0)
    cfg = small(noise_aug_max=0.3, noise_aug_sample=0.1)
    m, calls = SuperResDiffusion(cfg), []
    _record_unet_calls(m, calls)
    b = _batch(8)
    clean = m.upsample(b["lr"], (32, 32))
    m(**b)
    cond, aug_t, _, _ = calls[-1]
    assert aug_t.unique().numel() > 3 and aug_t.min() >= 0 and aug_t.max() < 0.3 * T
    noisy = aug_t > 50
    assert (cond - clean)[noisy].std() > 0.1  # sigma at t=50 is ~0.09 and grows with t
    calls.clear()
    m.sample(b["lr"], b["text"], b["text_mask"], steps=3, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 3 and all((c[1] == 100).all() for c in calls)
    assert all(torch.equal(c[0], calls[0][0]) for c in calls)  # one augmented conditioning for all steps
    a, sg = m.scheduler.alpha_sigma(torch.tensor([100]), clean)
    assert abs((calls[0][0] - a * clean).std().item() - sg.item()) < 0.01


def test_text_is_used_and_the_mask_respected(model):
    b = _batch()
    x_t, t = torch.randn(3, 1, 32, 32), torch.tensor([10, 500, 900])
    cond, aug = model.upsample(b["lr"], (32, 32)), torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        v = model.unet_v(x_t, t, cond, aug, b["text"], b["text_mask"])
        other = b["text"].clone()
        other[:, 0] += 1.0
        assert (model.unet_v(x_t, t, cond, aug, other, b["text_mask"]) - v).abs().amax(dim=(1, 2, 3)).min() > 1e-4
        hidden = b["text"].clone()
        hidden[~b["text_mask"]] = 100.0  # only masked-out tokens change
        assert torch.allclose(model.unet_v(x_t, t, cond, aug, hidden, b["text_mask"]), v, atol=1e-5)
    args = (b["lr"], b["text"], b["text_mask"])
    y1 = model.sample(*args, steps=2, generator=torch.Generator().manual_seed(0))
    y3 = model.sample(*args, steps=2, generator=torch.Generator().manual_seed(0), guidance_scale=3.0)
    assert not torch.allclose(y1, y3)


def test_text_dropout_replaces_text_by_the_null_token():
    torch.manual_seed(0)
    m = SuperResDiffusion(small(cond_drop_prob=1.0))
    b = _batch()
    other = {**b, "text": torch.randn_like(b["text"])}
    torch.manual_seed(1)
    out1 = m(**b)
    torch.manual_seed(1)
    out2 = m(**other)
    assert out1.text_dropped == 1.0 and torch.equal(out1.loss, out2.loss)
    out1.loss.backward()
    assert m.null_text.grad is not None and m.null_text.grad.abs().sum() > 0


def test_bf16_autocast_forward(model):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**_batch(2))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_config_presets_and_validation():
    paper, demo = (SuperResDiffusion.config_from_dict(model_preset(name, "superres")["model"]) for name in ("paper", "demo"))
    assert (paper.in_size, paper.out_size, paper.sample_steps) == (128, 512, 25)
    assert demo.out_size // demo.in_size == 2  # config.yaml: models.lowres_scale
    with pytest.raises(ValueError):
        SuperResConfig(**{**TEST_SR, "sampler": "euler"})
    with pytest.raises(ValueError):
        SuperResConfig(**{**TEST_SR, "in_size": 24})


# --- learning on phantom slices -----------------------------------------------------------------
def phantom_slices(seed: int, zs, n: int = 64, spacing: float = 5.5, supersample: int = 2) -> torch.Tensor:
    """Axial slices (S, 1, n, n) of a demo phantom at RAS z = ``zs`` (mm), ``spacing`` mm pixels
    (each the mean of supersample^2 point samples), HU clipped to [-1000, 1000] and scaled to [-1, 1]."""
    p = sample_anatomy(np.random.default_rng(seed))  # centred at the origin, lung apex at z = 0
    m = n * supersample
    c = (np.arange(m) - (m - 1) / 2) * spacing / supersample
    x, y = np.meshgrid(-c, c[::-1], indexing="xy")  # radiological view: patient's right on the left, anterior up
    out = []
    for z in zs:
        hu = p.hu_at(np.stack([x.ravel(), y.ravel(), np.full(x.size, z)], axis=1)).reshape(m, m)
        hu = hu.reshape(n, supersample, n, supersample).mean(axis=(1, 3))
        out.append(np.clip(hu, -1000, 1000) / 1000.0)
    return torch.from_numpy(np.stack(out).astype(np.float32))[:, None]


def test_beats_bicubic_on_held_out_phantom_slices():
    """300 Adam steps on 32 px crops of 32 slices (two phantoms), then the demo sampler (5 DDIM
    steps) on two slices half-way between training slices: at least 0.3 dB better than bicubic."""
    torch.manual_seed(0)
    zs = np.linspace(-10.0, -240.0, 16)  # 15.3 mm apart, apex to upper abdomen
    train = torch.cat([phantom_slices(0, zs), phantom_slices(1, zs)])  # (32, 1, 64, 64)
    held_out = phantom_slices(0, [zs[5] - 7.67, zs[9] - 7.67])  # (2, 1, 64, 64)
    m = SuperResDiffusion(SuperResConfig(**TEST_SR))
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    text, mask = torch.randn(1, 4, 32), torch.ones(8, 4, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    for step in range(300):
        hr = train[torch.randint(0, len(train), (8,), generator=g)]
        ys, xs = (torch.randint(0, 9, (8,), generator=g) * 4).tolist(), (torch.randint(0, 9, (8,), generator=g) * 4).tolist()
        hr = torch.stack([h[:, y:y + 32, x:x + 32] for h, y, x in zip(hr, ys, xs)])  # (8, 1, 32, 32)
        hr = torch.where(torch.rand(8, 1, 1, 1, generator=g) < 0.5, hr.flip(-1), hr)
        loss = m(hr=hr, lr=F.avg_pool2d(hr, 4), text=text.expand(8, -1, -1), text_mask=mask, step=step).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    lr = F.avg_pool2d(held_out, 4)  # (2, 1, 16, 16)
    sr = m.sample(lr, text.expand(2, -1, -1), mask[:2], generator=torch.Generator().manual_seed(1))
    bicubic = m.upsample(lr, (64, 64))
    gain = psnr(sr, held_out) - psnr(bicubic, held_out)
    logger.info("held-out PSNR: super-resolution %.2f dB, bicubic %.2f dB", psnr(sr, held_out), psnr(bicubic, held_out))
    assert gain > 0.3, f"super-resolution {psnr(sr, held_out):.2f} dB vs bicubic {psnr(bicubic, held_out):.2f} dB"
    assert math.isfinite(gain)


def test_sampling_noise_level_must_be_one_the_training_saw():
    with pytest.raises(ValueError, match="noise_aug_sample 0.1 must lie in"):
        SuperResConfig(**{**TEST_SR, "noise_aug_max": 0.0, "noise_aug_sample": 0.1})  # "0 disables" needs both
    SuperResConfig(**{**TEST_SR, "noise_aug_max": 0.0, "noise_aug_sample": 0.0})
