"""Latent rectified flow: the training target and the Euler sampler against independent hand
computations of MONAI's RFlow conventions, classifier-free guidance, report conditioning (null
segments, fixed-length context, DDP-safe graph), the pipeline end to end, and the report2ct preset."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ctgen.models.latent_flow import LatentFlow, LatentFlowConfig
from ctgen.models.report_context import blank_empty
from ctgen.pipelines.latent_flow import euler_sample

logger = logging.getLogger(__name__)
PRESET = Path(__file__).resolve().parents[2] / "config.yaml"  # model_presets.report2ct
T = 1000


def tiny(**overrides) -> LatentFlowConfig:
    """A 4-level MAISI U-Net of ~0.3M parameters on an 8x8x8 latent."""
    base = dict(channels=(8, 16, 16, 16), attention_levels=(False, False, True, True), num_head_channels=(0, 0, 8, 8),
                norm_num_groups=4, num_res_blocks=1, latent_shape=(8, 8, 8), cross_attention_dim=16, text_dims=(12,),
                max_text_tokens=6, sample_steps=4)
    return LatentFlowConfig(**{**base, **overrides})


DIT = dict(backbone="dit", dit_width=16, dit_depth=2, dit_heads=2)  # the transformer backbone, ~30k parameters


def same_backbone(m: LatentFlow) -> dict:
    """The backbone fields of ``m``'s config, to build a sibling that takes its state dict."""
    return DIT if m.config.backbone == "dit" else {}


def awake(m: LatentFlow) -> LatentFlow:
    """Re-initialise MAISI's zero-initialised output and attention projections, so the text and the
    input reach the output (an untrained U-Net predicts exactly 0, which would hide every effect)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1 and p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def batch(b=3, seed=0, shape=(8, 8, 8), empty_findings=(), text_len=(5, 3)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    f_mask = torch.ones(b, text_len[0], dtype=torch.bool)
    f_mask[:, text_len[0] - 1] = False  # some padding
    for i in empty_findings:
        f_mask[i] = False
    return {"latent_mu": torch.randn(b, 4, *shape, generator=g), "latent_sigma": torch.rand(b, 4, *shape, generator=g) * 0.2 + 0.05,
            "findings": torch.randn(b, text_len[0], 12, generator=g) * f_mask[..., None],
            "findings_mask": f_mask,
            "impression": torch.randn(b, text_len[1], 12, generator=g), "impression_mask": torch.ones(b, text_len[1], dtype=torch.bool)}


def text_of(b: dict) -> dict:
    return {k: v for k, v in b.items() if not k.startswith("latent")}


@pytest.fixture(scope="module", params=["unet", "dit"])
def model(request):
    torch.manual_seed(0)
    return awake(LatentFlow(tiny(**(DIT if request.param == "dit" else {})))).eval()


@contextlib.contextmanager
def recording(m: LatentFlow):
    """Records every network call (inputs and predicted velocity) while the block runs."""
    calls = []
    net = m.dit if m.config.backbone == "dit" else m.unet
    orig = net.forward

    def spy(x, timesteps, context=None, *args, **kw):
        out = orig(x, timesteps, context, *args, **kw)
        calls.append({"x": x.detach().clone(), "t": timesteps.detach().clone(), "context": context.detach().clone(),
                      "v": out.detach().clone()})
        return out

    net.forward = spy  # an instance attribute shadows the method
    try:
        yield calls
    finally:
        del net.forward


# --- MONAI's rectified-flow conventions, by hand ------------------------------------------------
def shift(t: np.ndarray, numel: int, base: int = 32**3) -> np.ndarray:
    """MONAI's timestep transform written out: t/T -> r s / (1 + (r - 1) s), r = (numel / base)^(1/3)."""
    r = (numel / base) ** (1 / 3)
    s = np.asarray(t, dtype=np.float64) / T
    return r * s / (1 + (r - 1) * s) * T


def test_training_target_is_the_rectified_flow_velocity_by_hand():
    """Replays the documented draws and recomputes x_t, t and the loss without MONAI."""
    torch.manual_seed(0)
    m = awake(LatentFlow(tiny(sample_method="uniform", scale_factor=0.8, cond_drop_prob=0.15, segment_drop_prob=0.1)))
    b = batch(4)
    with recording(m) as calls:
        torch.manual_seed(7)
        out = m(**b, step=3)
    torch.manual_seed(7)  # the same draws, in the documented order
    torch.rand(4)
    torch.rand(4, 2)
    eps, noise = torch.randn(4, 4, 8, 8, 8), torch.randn(4, 4, 8, 8, 8)
    u = torch.rand(4) * T  # uniform t, then the shift for a 512-voxel latent (r = 1/4)
    t = torch.from_numpy(shift(u.numpy(), 8 * 8 * 8)).float()
    z = (b["latent_mu"] + b["latent_sigma"] * eps) * 0.8
    tt = (t / T).reshape(-1, 1, 1, 1, 1)
    x_t = (1 - tt) * z + tt * noise
    (call,) = calls
    assert torch.allclose(call["t"], t, atol=1e-3) and torch.allclose(call["x"], x_t, atol=1e-5)
    expected = ((call["v"] - (z - noise)) ** 2).mean()
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(out.x0_mse) == pytest.approx(float(((x_t + call["v"] * tt - z) ** 2).mean()), rel=1e-4)
    assert float(out.t_mean) == pytest.approx(float(t.mean() / T), rel=1e-4)


def test_monai_rflow_direction_and_step():
    """t = 0 is data, t = T is noise; MONAI's step moves x by v (t - t_next)/T (exact on integer timesteps)."""
    s = LatentFlowConfig(use_discrete_timesteps=True, use_timestep_transform=False).make_scheduler()
    g = torch.Generator().manual_seed(0)
    z, n, v = (torch.randn(2, 4, 4, 4, 4, generator=g) for _ in range(3))
    assert torch.equal(s.add_noise(z, n, torch.tensor([0, 0])), z)
    assert torch.allclose(s.add_noise(z, n, torch.tensor([T, T])), n)
    s.set_timesteps(10)
    assert s.timesteps.tolist() == [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100]
    x_next, x0 = s.step(v, 700, z, 600)
    assert torch.allclose(x_next, z + v * 0.1) and torch.allclose(x0, z + v * 0.7)


def hand_euler(velocity, x, steps: int, numel: int, discrete: bool = False, transform: bool = True,
               fp16: bool = True) -> torch.Tensor:
    ts = [(1 - i / steps) * T for i in range(steps)]
    if discrete:
        ts = [float(round(t)) for t in ts]
    if transform:
        ts = list(shift(ts, numel))
    ts = [float(np.float16(t)) if fp16 else float(t) for t in ts] + [0.0]  # MONAI holds the schedule in float16
    x = x.double()
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + velocity(x, t) * ((t - t_next) / T)
    return x


def gaussian_velocity(mu: float, std: float):
    """E[x0 - n | x_t] for data ~ N(mu, std^2) per element, x_t = (1 - t/T) x0 + (t/T) n."""

    def v(x, t):
        tau = float(t) / T
        a = 1 - tau
        var = a * a * std * std + tau * tau
        return (mu + a * std * std * (x - a * mu) / var) - tau * (x - a * mu) / var

    return v


def test_euler_sampler_matches_an_independent_loop():
    x_T = torch.randn(2, 4, 8, 8, 16, generator=torch.Generator().manual_seed(0))
    v = gaussian_velocity(0.3, 0.5)
    ours = euler_sample(v, tiny().make_scheduler(), x_T, 7)
    assert torch.allclose(ours.double(), hand_euler(v, x_T, 7, 8 * 8 * 16), atol=1e-5)
    exact_schedule = hand_euler(v, x_T, 7, 8 * 8 * 16, fp16=False)  # MONAI's float16 rounding is a small effect
    assert 0 < (ours.double() - exact_schedule).abs().max() < 1e-2
    # with integer timesteps our update is exactly MONAI's step
    sched = tiny(use_discrete_timesteps=True, use_timestep_transform=False).make_scheduler()
    ours = euler_sample(v, sched, x_T, 7)
    sched.set_timesteps(7)
    ts = sched.timesteps.tolist() + [0]
    x = x_T.clone()
    for t, t_next in zip(ts[:-1], ts[1:]):
        x, _ = sched.step(v(x, t), t, x, t_next)
    assert torch.allclose(ours, x, atol=1e-6)
    assert torch.allclose(ours.double(), hand_euler(v, x_T, 7, 0, discrete=True, transform=False), atol=1e-5)


def test_euler_sampler_converges_to_the_exact_flow_of_a_gaussian():
    """The rectified-flow ODE of N(mu, s^2) data maps noise n to mu + s n; Euler converges to it (first order)."""
    x_T = torch.randn(2, 4, 8, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = 0.3 + 0.5 * x_T
    err = {n: float((euler_sample(gaussian_velocity(0.3, 0.5), tiny().make_scheduler(), x_T, n).double() - exact)
                    .abs().max()) for n in (5, 20, 80)}
    assert err[5] > err[20] > err[80] and err[80] < 0.05, err
    assert 3.0 < err[20] / err[80] < 5.0, err  # first order: 4x the steps, ~1/4 the error (0.13 -> 0.034)


# --- guidance -----------------------------------------------------------------------------------
def test_guidance_scale_one_is_the_conditional_pass_alone(model):
    b = batch(2)
    x, ctx = torch.randn(2, 4, 8, 8, 8), model.encode_text(**text_of(b))
    with torch.no_grad(), recording(model) as calls:
        v = model.guided_velocity(x, 500.0, ctx, model.null_context(2), 1.0)
        assert torch.equal(v, model.velocity(x, 500.0, ctx))
    assert [c["x"].shape[0] for c in calls] == [2, 2]  # no unconditional pass


def test_guidance_is_batched_and_equals_two_separate_passes(model):
    b = batch(2)
    x, ctx, null = torch.randn(2, 4, 8, 8, 8), model.encode_text(**text_of(b)), model.null_context(2)
    with torch.no_grad(), recording(model) as calls:
        guided = model.guided_velocity(x, 321.0, ctx, null, 3.0)
        assert [c["x"].shape[0] for c in calls] == [4]  # one forward on a 2B batch
        v_c, v_u = model.velocity(x, 321.0, ctx), model.velocity(x, 321.0, null)
    assert torch.allclose(guided, v_u + 3.0 * (v_c - v_u), atol=1e-5)
    assert not torch.allclose(v_c, v_u, atol=1e-4)  # the text matters


# --- report conditioning ------------------------------------------------------------------------
def test_empty_sections_condition_on_the_null_segment(model):
    b = batch(3, empty_findings=(1,))
    with torch.no_grad():
        ctx = model.encode_text(**text_of(b))
        null = model.null_context(3)
    slot = model.context.slot
    assert ctx.shape == (3, 2 * slot, 16)
    assert torch.equal(ctx[1, :slot], null[1, :slot])  # the empty findings -> the null findings tokens
    assert not torch.equal(ctx[1, slot:], null[1, slot:])  # the impression is kept
    assert not torch.equal(ctx[0, :slot], null[0, :slot])
    assert (ctx[0, 4:slot] == 0).all()  # padding rows are exactly zero (4 valid findings tokens)
    with torch.no_grad():  # runs through the network without complaint
        assert torch.isfinite(model.velocity(torch.randn(3, 4, 8, 8, 8), 400.0, ctx)).all()
    mask = torch.ones(3, 4, dtype=torch.bool)
    assert blank_empty(["Effusion.", "  ", ""], mask).any(1).tolist() == [True, False, False]


def test_a_sample_does_not_depend_on_what_it_is_batched_with(model):
    """Fixed-length zero padding: MONAI's cross-attention has no key mask, yet batching changes nothing."""
    long = text_of(batch(2, seed=1, text_len=(6, 5)))
    short = text_of(batch(1, seed=2, text_len=(3, 2)))
    x = torch.randn(1, 4, 8, 8, 8)

    def pad_to(v: torch.Tensor, length: int) -> torch.Tensor:  # right-pad the token axis (states or mask)
        return torch.nn.functional.pad(v, (0, 0, 0, length - v.shape[1]) if v.ndim == 3 else (0, length - v.shape[1]))

    joint = {k: torch.cat([pad_to(short[k], long[k].shape[1]), long[k]]) for k in short}
    with torch.no_grad():
        alone = model.velocity(x, 250.0, model.encode_text(**short))
        together = model.velocity(torch.cat([x, torch.randn(2, 4, 8, 8, 8)]), 250.0, model.encode_text(**joint))[:1]
    assert torch.allclose(alone, together, atol=1e-5)


def test_null_context_is_always_in_the_graph():
    """No sample dropped and no section empty: the null tokens still get a gradient, exactly zero."""
    torch.manual_seed(0)
    m = awake(LatentFlow(tiny(cond_drop_prob=0.0)))
    m(**batch(2)).loss.backward()
    assert all(p.grad is not None for p in m.parameters())  # DDP (find_unused_parameters=False) is satisfied
    assert m.context.null.grad.abs().max() == 0
    m.zero_grad()
    m(**batch(2, empty_findings=(0,))).loss.backward()
    assert m.context.null.grad[0].abs().max() > 0 and m.context.null.grad[1].abs().max() == 0


def test_condition_dropout_rate_and_null_replacement():
    torch.manual_seed(0)
    m = LatentFlow(tiny(cond_drop_prob=0.5))
    rates = [float(m(**batch(8, seed=i)).cond_dropped) for i in range(6)]
    assert 0.25 < sum(rates) / len(rates) < 0.75
    b = batch(2)
    everything = torch.ones(2, 2, dtype=torch.bool)
    assert torch.equal(m.encode_text(use_null=everything, **text_of(b)), m.null_context(2))


def test_word_dropout_masks_report_tokens_in_training_steps_only():
    """``token_drop_prob``: a training step masks out about that share of the report's tokens (never
    unmasking padding, never touching the states); encoding a report for sampling drops nothing."""
    torch.manual_seed(0)
    m = LatentFlow(tiny(token_drop_prob=0.4, cond_drop_prob=0.0, max_text_tokens=64))
    seen = []
    encode = m.encode_text

    def spy(use_null=None, **text):
        seen.append(text)
        return encode(use_null=use_null, **text)

    m.encode_text = spy
    b = batch(8, text_len=(60, 50))
    m(**b)
    for seg in ("findings", "impression"):
        got, given = seen[0][f"{seg}_mask"], b[f"{seg}_mask"]
        assert not (got & ~given).any() and torch.equal(seen[0][seg], b[seg])
        assert 0.5 < got.sum() / given.sum() < 0.7, seg  # about 1 - 0.4 of the tokens kept
    del m.encode_text
    plain = LatentFlow(tiny(cond_drop_prob=0.0, max_text_tokens=64))
    plain.load_state_dict(m.state_dict())
    with torch.no_grad():  # sampling's context: the same as a model's without word dropout
        assert torch.equal(m.encode_text(**text_of(b)), plain.encode_text(**text_of(b)))


def test_small_trainable_text_encoder_and_pooled_multi_encoder_context():
    torch.manual_seed(0)
    small = awake(LatentFlow(tiny(text_encoder={"vocab_size": 40, "dim": 16, "depth": 1, "heads": 2, "max_length": 6})))
    ids = torch.randint(1, 40, (2, 5))
    b = {"latent_mu": torch.randn(2, 4, 8, 8, 8), "latent_sigma": torch.full((2, 4, 8, 8, 8), 0.1),
         "findings_ids": ids, "findings_mask": ids > 0, "impression_ids": ids.flip(1), "impression_mask": ids > 0}
    small(**b).loss.backward()
    assert small.context.encoder.token.weight.grad.abs().sum() > 0
    # Report2CT's pooled context: three encoders' mean-pooled states concatenated, one row per section
    pooled = LatentFlow(tiny(text_pooling="mean", text_dims=(1024, 768, 768)))
    text = {}
    for seg in ("findings", "impression"):
        for e, (key, width) in enumerate(zip(("", "_enc1", "_enc2"), (1024, 768, 768))):
            text[f"{seg}{key}"] = torch.randn(2, 7, width)
            text[f"{seg}_mask{key}"] = torch.arange(7).expand(2, 7) < 4
    ctx = pooled.encode_text(**text)
    assert ctx.shape == (2, 2, 16) and pooled.context.proj.in_features == 2560
    means = torch.cat([text[f"findings{k}"][:, :4].mean(1) for k in ("", "_enc1", "_enc2")], -1)
    expected = pooled.context.proj(pooled.context.norm(means)) + pooled.context.segment[0]
    assert torch.allclose(ctx[:, 0], expected, atol=1e-5)
    with pytest.raises(ValueError, match="pooling='mean'"):
        LatentFlow(tiny(text_dims=(768, 768)))
    with pytest.raises(ValueError, match="small trainable text encoder gives token states"):  # one row a section
        LatentFlow(tiny(text_pooling="mean", text_encoder={"vocab_size": 40, "dim": 16, "depth": 1, "heads": 2,
                                                           "max_length": 6}))


def test_structured_prompt_as_the_only_segment():
    torch.manual_seed(0)
    m = awake(LatentFlow(tiny(segments=("structured",)))).eval()
    text = {"structured": torch.randn(2, 4, 12), "structured_mask": torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]]).bool()}
    with torch.no_grad():
        ctx = m.encode_text(**text)
        assert ctx.shape == (2, 6, 16) and torch.equal(ctx[1], m.null_context(1)[0])  # empty prompt -> null
        assert torch.isfinite(m(latent_mu=torch.randn(2, 4, 8, 8, 8), latent_sigma=torch.full((2, 4, 8, 8, 8), 0.1),
                                **text).loss)


def test_bad_inputs_are_named(model):
    b = batch(1)
    with pytest.raises(ValueError, match=r"missing report inputs \['impression', 'impression_mask'\]"):
        model(**{k: v for k, v in b.items() if not k.startswith("impression")})
    with pytest.raises(ValueError, match="unknown batch keys"):
        model(**b, prompt=torch.zeros(1))
    with pytest.raises(ValueError, match=r"latent_mu/latent_sigma"):
        model(**{**b, "latent_sigma": b["latent_sigma"][:, :3]})
    with pytest.raises(ValueError, match="7 tokens > max_tokens 6"):
        model.encode_text(**{**text_of(b), "findings": torch.zeros(1, 7, 12), "findings_mask": torch.ones(1, 7, dtype=torch.bool)})
    with pytest.raises(ValueError, match="spacing"):
        LatentFlow(tiny(include_spacing_input=True)).velocity(torch.zeros(1, 4, 8, 8, 8), 10.0, model.null_context(1))
    with pytest.raises(ValueError, match="latent_shape divisible by 8"):
        tiny(latent_shape=(8, 8, 12))


# --- the network and its variants ---------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_spacing_input_reaches_the_network(backbone):
    torch.manual_seed(0)
    m = awake(LatentFlow(tiny(include_spacing_input=True, **(DIT if backbone == "dit" else {})))).eval()
    x, ctx = torch.randn(1, 4, 8, 8, 8), m.null_context(1)
    with torch.no_grad():
        a = m.velocity(x, 300.0, ctx, spacing=torch.tensor([[0.75, 0.75, 1.5]]))
        b = m.velocity(x, 300.0, ctx, spacing=torch.tensor([[1.5, 1.5, 3.0]]))
    assert not torch.allclose(a, b, atol=1e-5)


def test_dit_ignores_padding_rows_starts_at_zero_and_can_pool_the_report():
    """The transformer's cross-attention masks the zero padding rows of a slot (the U-Net's cannot:
    they add to its softmax denominator), so the same report in a longer slot gives the same
    velocity; untrained, it predicts exactly zero (DiT's zero-initialised output layer); with
    ``pooled_text_embedding`` the report reaches it even with every cross-attention silenced."""
    torch.manual_seed(0)
    fresh = LatentFlow(tiny(**DIT))
    x = torch.randn(2, 4, 8, 8, 8)
    with torch.no_grad():
        ctx = fresh.encode_text(**text_of(batch(2)))
        assert fresh.velocity(x, 500.0, ctx).abs().max() == 0
        longer = torch.nn.functional.pad(ctx, (0, 0, 0, 7))  # 7 more zero rows
        dit, unet = awake(fresh).eval(), awake(LatentFlow(tiny())).eval()
        for m, same in ((dit, True), (unet, False)):
            a, b = m.velocity(x, 500.0, ctx), m.velocity(x, 500.0, longer)
            assert torch.allclose(a, b, atol=1e-6) == same, m.config.backbone
            assert not torch.allclose(a, m.velocity(x, 500.0, m.null_context(2)), atol=1e-4)  # the report matters
        torch.manual_seed(0)
        pooled = awake(LatentFlow(tiny(pooled_text_embedding=True, **DIT))).eval()
        for block in pooled.dit.blocks:
            block.attn2.to_out[0].weight.zero_()
            block.attn2.to_out[0].bias.zero_()
        assert not torch.allclose(pooled.velocity(x, 500.0, ctx), pooled.velocity(x, 500.0, pooled.null_context(2)),
                                  atol=1e-4)
    with pytest.raises(ValueError, match=r"latent_shape divisible by dit_patch_size \(2, 2, 2\)"):
        tiny(latent_shape=(8, 8, 5), **DIT)
    with pytest.raises(ValueError, match="backbone 'unet' or 'dit'"):
        tiny(backbone="vit")


def test_sdpa_attention_and_checkpointing_change_nothing_but_cost(model):
    kind = same_backbone(model)
    slow = awake(LatentFlow(tiny(use_flash_attention=False, **kind))).eval()
    slow.load_state_dict(model.state_dict())
    x, ctx = torch.randn(2, 4, 8, 8, 8), model.encode_text(**text_of(batch(2)))
    with torch.no_grad():
        assert torch.allclose(model.velocity(x, 700.0, ctx), slow.velocity(x, 700.0, ctx), atol=1e-5)
    ck = LatentFlow(tiny(gradient_checkpointing=True, **kind))
    plain = LatentFlow(tiny(**kind))
    ck.load_state_dict(model.state_dict())
    plain.load_state_dict(model.state_dict())
    losses = []
    for m in (plain, ck):
        torch.manual_seed(3)
        loss = m(**batch(2)).loss
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1])
    for (name, p), q in zip(plain.named_parameters(), ck.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_save_from_pretrained_gives_identical_outputs(model, tmp_path):
    model.save_pretrained(tmp_path / "flow", seed=0)
    loaded = LatentFlow.from_pretrained(tmp_path / "flow").eval()
    assert loaded.config == model.config
    b = batch(2)
    x = torch.randn(2, 4, 8, 8, 8)
    with torch.no_grad():
        args = (x, 600.0, model.encode_text(**text_of(b)), model.null_context(2), 4.0)
        assert torch.equal(model.guided_velocity(*args), loaded.guided_velocity(*args))
    torch.manual_seed(5)
    a = model(**b)
    torch.manual_seed(5)
    assert torch.equal(a.loss, loaded(**b).loss)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_overfits_one_sample(backbone):
    """The same draws every step: the velocity regression of one sample drops steadily."""
    torch.manual_seed(0)
    m = LatentFlow(tiny(cond_drop_prob=0.0, **(DIT if backbone == "dit" else {})))
    b = batch(1)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        torch.manual_seed(0)
        loss = m(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


# --- the pipeline -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A tiny autoencoder + flow model with the small text encoder, saved with the sampling spec."""
    from ctgen.models.autoencoder import MaisiAutoencoder, MaisiAutoencoderConfig
    from ctgen.models.text_encoders import fit_text_tokenizer
    from ctgen.pipelines.latent_flow import write_latent_flow_spec

    out = tmp_path_factory.mktemp("latent_models")
    tok = fit_text_tokenizer(["No pleural effusion.", "Right pleural effusion.", "Cardiomegaly. Lungs clear."],
                             60, out / "tok.json")
    torch.manual_seed(0)
    ae = MaisiAutoencoder(MaisiAutoencoderConfig(num_channels=(8, 16, 16), norm_num_groups=4, adv_weight=0.0,
                                                 decode_window=(4, 8, 8)))
    ae.set_scale_factor(1.7)
    ae.save_pretrained(out / "autoencoder", seed=0)
    flow = awake(LatentFlow(tiny(latent_shape=(8, 16, 8), scale_factor=1.7, text_encoder={
        "vocab_size": tok.vocab_size, "dim": 16, "depth": 1, "heads": 2, "max_length": 6})))
    flow.save_pretrained(out / "latent_flow", seed=0)
    write_latent_flow_spec(out, {"spacing": [0.8, 0.7, 1.5], "shape": [32, 64, 32], "clip": [-1000, 1000]},
                           [{"kind": "small", "path": None, "max_length": 6}], {"steps": 3, "guidance_scale": 2.0},
                           text_tokenizer=out / "tok.json")
    return out


def test_pipeline_samples_int16_hu_with_a_truthful_affine(models_dir):
    from ctgen.pipelines.latent_flow import LatentFlowPipeline, LatentSampleSettings

    pipe = LatentFlowPipeline.from_pretrained(models_dir)
    settings = LatentSampleSettings(steps=3, guidance_scale=2.0)
    findings = ["Right pleural effusion.", "No pleural effusion."]
    gens = lambda s: [torch.Generator().manual_seed(s), torch.Generator().manual_seed(s + 1)]  # noqa: E731
    a = pipe(findings, ["", "Lungs clear."], settings=settings, generators=gens(0))  # empty impression: its null
    b = pipe(findings, [None, "Lungs clear."], settings=settings, generators=gens(0))  # None: an absent one, the same
    c = pipe(findings, ["", "Lungs clear."], settings=settings, generators=gens(5))
    vol = a[0]
    assert vol.array.dtype == np.int16 and vol.array.shape == (1, 32, 64, 32)  # (C, I, J, K) from latent (D, H, W) = (8, 16, 8)
    assert np.allclose(vol.spacing, [0.8, 0.7, 1.5]) and "".join(vol.orientation) == "RAS"
    centre = vol.affine @ np.array([15.5, 31.5, 15.5, 1.0])
    assert np.allclose(centre[:3], 0.0)  # centred at the origin like the cascade's outputs
    assert vol.array.min() >= -1000 and vol.array.max() <= 1000 and vol.meta["synthetic"] is True
    assert vol.meta["report"] == {"findings": "Right pleural effusion.", "impression": ""}
    assert np.array_equal(a[1].array, b[1].array) and not np.array_equal(a[1].array, c[1].array)
    side = pipe.sidecar(vol.meta["report"], 0, settings)
    assert side["family"] == "latent_flow" and set(side["weights_sha256"]) == {"autoencoder", "latent_flow"}
    assert side["settings"]["steps"] == 3  # given
    unset = pipe.sidecar(vol.meta["report"], 0, LatentSampleSettings(guidance_scale=2.0))
    assert unset["settings"]["steps"] == pipe.flow.config.sample_steps != 3  # what None took from the model
    # each section's tokens against what its encoder takes: a longer one is cut, and the sidecar says so
    tokens = side["text_tokens"]
    limit = pipe.spec["text_encoders"][0]["max_length"]
    assert set(tokens) == {"findings"} and tokens["findings"]["max"] == limit  # the empty impression: none
    assert 1 < tokens["findings"]["n"] <= limit
    long = pipe.sidecar({"findings": "Right pleural effusion. " * 20, "impression": ""}, 0, settings)["text_tokens"]
    assert long["findings"]["n"] > long["findings"]["max"] == limit
    assert side["settings"]["precision"] == "fp32" and side["weights_used"]["autoencoder"] == "autoencoder"
    json.dumps(side)


def test_pipeline_refuses_mixed_runs(models_dir, tmp_path):
    import shutil

    from ctgen.models.autoencoder import MaisiAutoencoder
    from ctgen.pipelines.latent_flow import LatentFlowPipeline

    mixed = tmp_path / "mixed"
    shutil.copytree(models_dir, mixed)
    ae = MaisiAutoencoder.from_pretrained(mixed / "autoencoder")
    ae.set_scale_factor(2.0)
    ae.save_pretrained(mixed / "autoencoder")
    with pytest.raises(ValueError, match="sha256 differs"):
        LatentFlowPipeline.from_pretrained(mixed)
    spec = json.loads((mixed / "latent_flow.json").read_text())
    from ctprep.shards import sha256_file

    spec["weights"]["autoencoder"] = sha256_file(mixed / "autoencoder" / "model.safetensors")
    (mixed / "latent_flow.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="autoencoder/config.json changed since latent_flow.json"):
        LatentFlowPipeline.from_pretrained(mixed)
    del spec["files"]  # a spec from before the configs were hashed: the weights' own checks still hold
    (mixed / "latent_flow.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="latent scale 1.7 but the autoencoder stores 2"):
        LatentFlowPipeline.from_pretrained(mixed)
    with pytest.raises(ValueError, match=r"conditions on \['findings', 'impression'\], not \['structured'\]"):
        LatentFlowPipeline.from_pretrained(models_dir)(structured=["right effusion"])


def test_sections_for_a_plain_prompt_follow_the_models_segments():
    """A free text is the findings of a findings/impression model and, parsed and rendered as the training
    prompts were, the structured section of a structured model; given sections are kept as they are."""
    from ctgen.jobs.sample_latent import REPORT, sections_for

    free = {REPORT: "Moderate right pleural effusion. No pericardial effusion. No pneumothorax."}
    assert sections_for(free, ["findings", "impression"]) == {"findings": free[REPORT], "impression": ""}
    assert sections_for(free, ["structured"]) == {"structured": "moderate right pleural effusion"}
    stated = sections_for(free, ["structured"], {"negated": "state", "max_chars": 0})
    assert stated == {"structured": "moderate right pleural effusion; no pericardial effusion"}  # pneumothorax: no label
    split = {"findings": "Cardiomegaly.", "impression": "Bilateral pleural effusion."}
    assert sections_for(split, ["structured"]) == {"structured": "cardiomegaly; bilateral pleural effusion"}
    assert sections_for({**split, "structured": "given"}, ["structured"]) == {"structured": "given"}
    assert sections_for({"impression": "No acute findings."}, ["findings", "impression"]) == {
        "findings": "", "impression": "No acute findings."}
    for blank in ("Not given.", "not given", "  "):  # CT-RATE's empty section: the null segment, as in training
        assert sections_for({"findings": "Right pleural effusion.", "impression": blank}, ["findings", "impression"]) \
            == {"findings": "Right pleural effusion.", "impression": ""}
    assert sections_for({REPORT: "Lungs are clear."}, ["structured"]) == {"structured": "no acute findings"}
    headed = {REPORT: "Findings: Small right pleural effusion. Impression: Right pleural effusion."}
    assert sections_for(headed, ["findings", "impression"]) == {"findings": "Small right pleural effusion.",
                                                                "impression": "Right pleural effusion."}
    assert sections_for({REPORT: "Clinical information: cough."}, ["findings", "impression"]) == {
        "findings": "Clinical information: cough.", "impression": ""}  # nothing else: all of it is the findings
    assert sections_for({}, ["structured"]) == {"structured": ""}  # nothing given: refused by the caller



def test_samples_csv_records_the_text_a_report_gave():
    """One section's text as it is (as the cascade's prompt: what a CLIP model reads), several named."""
    from ctgen.jobs.sample_latent import recorded_prompt

    assert recorded_prompt({"structured": "mild cardiomegaly"}) == "mild cardiomegaly"
    assert recorded_prompt({"findings": "Effusion.", "impression": ""}) == "Effusion."
    assert recorded_prompt({"findings": "Effusion.", "impression": "Cardiomegaly."}) == \
        "findings: Effusion. | impression: Cardiomegaly."


def test_a_structured_model_samples_from_a_plain_prompt(models_dir, tmp_path):
    """``ctgen sample --family latent_flow --prompt`` for a model trained on the structured prompt: the prompt
    is parsed and rendered with the spec's settings, and the sidecar records the text the model saw."""
    import shutil

    from ctgen.cli import main as ctgen_main

    structured = tmp_path / "structured"
    shutil.copytree(models_dir, structured)
    flow = LatentFlow.from_pretrained(structured / "latent_flow")
    other = awake(LatentFlow(dataclasses.replace(flow.config, segments=("structured",))))
    other.save_pretrained(structured / "latent_flow", seed=0)
    spec = json.loads((structured / "latent_flow.json").read_text())
    from ctprep.shards import sha256_file

    spec["weights"]["latent_flow"] = sha256_file(structured / "latent_flow" / "model.safetensors")
    spec["files"]["latent_flow/config.json"] = sha256_file(structured / "latent_flow" / "config.json")
    spec["prompt_rendering"] = {"negated": "state", "max_chars": 0}
    (structured / "latent_flow.json").write_text(json.dumps(spec))
    out = tmp_path / "one.nii.gz"  # no --family: the folder holds the latent flow family only
    assert ctgen_main(["sample", "--models", str(structured), "--prompt",
                       "Small left pleural effusion. Cardiomegaly.", "--out", str(out), "--steps", "2"]) == 0
    side = json.loads(out.with_name("one.json").read_text())
    assert side["report"]["structured"].startswith("cardiomegaly; ") and "left pleural effusion" in side["report"]["structured"]
    assert "no pericardial effusion" not in side["report"]["structured"]  # nothing negated in this report
    assert side["prompt_given"] == "Small left pleural effusion. Cardiomegaly."  # what the section was made of


def test_a_structured_section_the_parser_finds_nothing_in_is_warned_about(caplog):
    """A report outside the parser's vocabulary became the structured section "no acute findings" silently."""
    from ctgen.jobs.sample_latent import REPORT, sections_for

    with caplog.at_level("WARNING", logger="ctgen.jobs.inputs"):
        assert sections_for({REPORT: "Massive pulmonary embolism."}, ["structured"], pid="r7") == {
            "structured": "no acute findings"}
        assert sections_for({REPORT: "No pleural effusion."}, ["structured"], pid="r8") == {
            "structured": "no acute findings"}  # understood (a finding stated absent): no warning
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["prompt r7"]


# --- the report2ct preset at the paper geometry -------------------------------------------------
def test_report2ct_preset_trains_one_step_at_the_paper_geometry(tmp_path):
    """One optimiser step of the one loop on a 4x64x120x120 latent (480x480x256 at 0.75x0.75x1.5 mm).

    Several minutes on 2 CPU cores (~215M parameters; gradient checkpointing keeps activations
    to a few GiB); the loop's train_summary.json records the time and peak RSS, logged here.
    Where the CPU computes in bf16 (AMX, or AVX-512 BF16 as on AMD's Zen 4), the step runs under bf16
    autocast, as the preset's "auto" precision does on a GPU: its 3D convolutions take half the time
    there (a 64-channel 3x3x3 convolution's forward and backward, 2 threads: 0.72 s against 1.58 s on
    32x120x120 with AMX; 1.7 s against 3.2 s on 64x120x120 with AVX-512 BF16).
    """
    from ctgen.jobs.smoke import cpu_computes_bf16
    from ctgen.training.loop import TrainConfig, train

    section = yaml.safe_load(PRESET.read_text())["model_presets"]["report2ct"]["latent_flow"]
    cfg = LatentFlow.config_from_dict(section["model"])
    assert (cfg.channels, cfg.attention_levels, cfg.latent_shape) == ((64, 128, 256, 512), (False, False, True, True),
                                                                       (64, 120, 120))
    torch.manual_seed(0)
    m = LatentFlow(cfg)
    g = torch.Generator().manual_seed(0)
    sample = {"latent_mu": torch.randn(1, 4, *cfg.latent_shape, generator=g),
              "latent_sigma": torch.full((1, 4, *cfg.latent_shape), 0.05),
              "findings": torch.randn(1, 180, 768, generator=g), "findings_mask": torch.ones(1, 180, dtype=torch.bool),
              "impression": torch.randn(1, 40, 768, generator=g), "impression_mask": torch.ones(1, 40, dtype=torch.bool)}
    bf16 = cpu_computes_bf16()
    train_cfg = TrainConfig.from_dict({**section["train"], "max_steps": 1, "warmup_steps": 0, "tensorboard": False,
                                       "ema_start": 0, "precision": "bf16" if bf16 else "fp32"})
    before = m.unet.out[-1].conv.weight.detach().clone()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the session fixture pins 1 thread for the tiny models
    t0 = time.perf_counter()
    try:
        train(m, lambda ctx: iter([sample]), train_cfg, tmp_path / "flow", checkpoint_dir=tmp_path / "ckpt")
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((tmp_path / "flow" / "train_summary.json").read_text())
    logger.info("report2ct one step (%s): %.0f s, peak RSS %.2f GiB, loss %.4f", summary["precision"],
                time.perf_counter() - t0, summary["peak_memory_bytes"] / 2**30, summary["final_loss"])
    assert summary["precision"] == train_cfg.precision
    assert summary["steps"] == 1 and math.isfinite(summary["final_loss"])
    after = LatentFlow.from_pretrained(tmp_path / "flow").unet.out[-1].conv.weight
    assert not torch.equal(before, after)  # the step changed the weights


# --- the text-reliance probe --------------------------------------------------------------------
def test_text_reliance_probe_against_a_hand_computation(model):
    """Per-latent losses under the own, null and next latent's report, with the same noise, by hand."""
    from ctgen.jobs.text_reliance import context_losses

    b = batch(4, seed=3)
    got = context_losses(model, b, (0.8,), torch.Generator().manual_seed(7))
    noise = torch.randn(b["latent_mu"].shape, generator=torch.Generator().manual_seed(7))
    z = b["latent_mu"] * model.config.scale_factor
    x_t = 0.2 * z + 0.8 * noise  # MONAI's add_noise at t = 0.8 T, written out
    t = torch.full((4,), 0.8 * T)
    rolled = {k: v.roll(1, dims=0) for k, v in text_of(b).items()}  # the other report: the previous latent's
    with torch.no_grad():
        v_own = model.velocity(x_t, t, model.encode_text(**text_of(b)))
        v_null = model.velocity(x_t, t, model.null_context(4))
        v_other = model.velocity(x_t, t, model.encode_text(**rolled))
    for name, v in (("own", v_own), ("null", v_null), ("other", v_other)):
        want = ((v - (z - noise)) ** 2).mean(dim=(1, 2, 3, 4)).numpy()
        np.testing.assert_allclose(got[f"{name}@0.8"], want, rtol=1e-4, atol=1e-7)
    shift = ((v_own - v_null).flatten(1).norm(dim=1) / v_own.flatten(1).norm(dim=1)).numpy()
    np.testing.assert_allclose(got["shift@0.8"], shift, rtol=1e-4)
    assert (got["own@0.8"] != got["null@0.8"]).all()  # this network reads its context


def test_text_reliance_is_zero_for_a_network_the_text_cannot_reach():
    """Cross-attention outputs zeroed: the report cannot change the velocity, so every gain and shift is 0;
    with them, the gains are measured with n and a CI."""
    from monai.networks.blocks.crossattention import CrossAttentionBlock

    from ctgen.jobs.text_reliance import text_reliance

    torch.manual_seed(0)
    m = awake(LatentFlow(tiny())).eval()
    batches = [batch(4, seed=s) for s in range(3)]
    reads = {v.name: v for v in text_reliance(m, batches, max_latents=10)}
    assert reads["text_reliance.gain_vs_null@0.8"].n == 10  # 4 + 4 + 2 of the third batch
    assert any(abs(v.value) > 1e-4 for v in reads.values()) and all(v.ci for v in reads.values())
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, CrossAttentionBlock):
                mod.out_proj.weight.zero_()
                mod.out_proj.bias.zero_()
    blind = text_reliance(m, batches, max_latents=10)
    assert len(blind) == 9 and all(abs(v.value) < 1e-6 for v in blind), [(v.name, v.value) for v in blind]
    with pytest.raises(ValueError, match="at least 2 latents"):
        text_reliance(m, [batch(1)])


def test_pooled_text_embedding_reaches_every_block_through_the_timestep_embedding(tmp_path):
    """The option adds MONAI's embedding MLP of the mean context row to the timestep embedding: with that
    MLP's output zeroed the network is exactly the plain one; otherwise the report moves the velocity even
    with every cross-attention output zeroed; it saves and loads."""
    from monai.networks.blocks.crossattention import CrossAttentionBlock

    torch.manual_seed(0)
    plain = awake(LatentFlow(tiny())).eval()
    pooled = LatentFlow(tiny(pooled_text_embedding=True)).eval()
    missing, unexpected = pooled.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == sorted(f"unet.class_embedding.{i}.{p}" for i in (0, 2) for p in ("weight", "bias"))
    assert not unexpected and pooled.unet.class_embedding[0].in_features == 16  # cross_attention_dim
    b = batch(2)
    x, t = torch.randn(2, 4, 8, 8, 8), torch.tensor([700.0, 300.0])
    with torch.no_grad():
        ctx = pooled.encode_text(**text_of(b))
        pooled.unet.class_embedding[2].weight.zero_()
        pooled.unet.class_embedding[2].bias.zero_()
        torch.testing.assert_close(pooled.velocity(x, t, ctx), plain.velocity(x, t, ctx))
        pooled.unet.class_embedding[2].weight.normal_(0, 0.5)
        for m in (plain, pooled):
            for mod in m.modules():
                if isinstance(mod, CrossAttentionBlock):
                    mod.out_proj.weight.zero_()
                    mod.out_proj.bias.zero_()
        null = pooled.null_context(2)
        torch.testing.assert_close(plain.velocity(x, t, ctx), plain.velocity(x, t, null))  # no route for the text
        assert (pooled.velocity(x, t, ctx) - pooled.velocity(x, t, null)).abs().max() > 1e-4
    pooled.save_pretrained(tmp_path / "m", seed=0)
    again = LatentFlow.from_pretrained(tmp_path / "m").eval()
    assert again.config.pooled_text_embedding
    with torch.no_grad():
        torch.testing.assert_close(again.velocity(x, t, ctx), pooled.velocity(x, t, ctx))


def test_non_finite_decoder_output_is_counted_not_written_as_water(models_dir, monkeypatch, caplog):
    """NaN from the autoencoder was cast to 0 HU (water) silently: it becomes the window's lower bound, counted."""
    from ctgen.pipelines.latent_flow import LatentFlowPipeline, LatentSampleSettings

    pipe = LatentFlowPipeline.from_pretrained(models_dir)
    decode = pipe.autoencoder.decode

    def diverged(*args, **kwargs):
        x = decode(*args, **kwargs)  # (1, 1, D, H, W)
        x[..., :2, :] = float("nan")
        return x

    monkeypatch.setattr(pipe.autoencoder, "decode", diverged)
    with caplog.at_level("WARNING", logger="ctgen.pipelines.latent_flow"):
        vol = pipe(["Right pleural effusion."], [""], settings=LatentSampleSettings(steps=2),
                   generators=[torch.Generator().manual_seed(0)])[0]
    assert (vol.data[:, :2] == -1000).all() and vol.meta["n_nonfinite"] == 32 * 2 * 32
    assert "non-finite voxels" in caplog.text


def test_a_rerun_with_dicom_replaces_the_latent_familys_series(models_dir, tmp_path):
    """The latent family's --prompt --dicom rerun refused the DICOM after replacing the NIfTI: both are replaced."""
    import pydicom

    from ctgen.cli import main as ctgen_main

    out, dcm = tmp_path / "ct.nii.gz", tmp_path / "dcm"
    for seed in ("1", "2"):
        assert ctgen_main(["sample", "--models", str(models_dir), "--prompt", "Right pleural effusion.", "--out",
                           str(out), "--seed", seed, "--steps", "2", "--dicom", str(dcm)]) == 0
    first = pydicom.dcmread(sorted(dcm.glob("*.dcm"))[0])
    assert json.loads(first[0x0011, 0x1010].value)["seed"] == 2
