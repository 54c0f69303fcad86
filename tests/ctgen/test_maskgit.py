"""MaskGIT and its masking scheduler: shapes, memory scaling, condition dropout, sampling, overfitting."""

from __future__ import annotations

import math

import pytest
import torch

from ctgen.models.maskgit import MaskGIT, MaskGITConfig
from ctgen.schedulers.masking import MaskingScheduler, cosine_schedule

TINY = MaskGITConfig(codebook_size=32, dim=64, depth=2, heads=4, dim_head=16, ff_mult=2, text_dim=16,
                     max_t=9, max_h=4, max_w=4, cond_drop_prob=0.0, dropout=0.0)


def tiny(**overrides) -> MaskGIT:
    torch.manual_seed(0)
    return MaskGIT(MaskGITConfig(**{**TINY.__dict__, **overrides}))


def text_batch(b: int, length: int = 5, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(b, length, dim, generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[:, -2:] = False  # padded tail
    return text, mask


def train(model: MaskGIT, tokens: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
        out = model(tokens=tokens, text=text, text_mask=mask, step=step)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    model.eval()
    return float(out.loss.detach())


# ---------------------------------------------------------------------------------- scheduler
def test_cosine_schedule_values():
    r = torch.tensor([0.0, 1 / 3, 0.5, 1.0])
    expected = torch.tensor([1.0, math.cos(math.pi / 6), math.sqrt(0.5), 0.0])
    torch.testing.assert_close(cosine_schedule(r), expected, atol=1e-6, rtol=0)
    assert float(cosine_schedule(0.25)) == pytest.approx(math.cos(math.pi / 8))


def test_add_noise_masks_exact_count_per_sample():
    sched = MaskingScheduler(mask_token_id=99)
    tokens = torch.randint(0, 50, (3, 4, 5, 6))
    ratio = torch.tensor([0.1, 0.5, 1.0])
    masked, mask = sched.add_noise(tokens, ratio, generator=torch.Generator().manual_seed(1))
    assert mask.shape == tokens.shape and mask.dtype == torch.bool
    assert mask.flatten(1).sum(1).tolist() == [12, 60, 120]
    assert (masked[mask] == 99).all() and torch.equal(masked[~mask], tokens[~mask])
    again, _ = sched.add_noise(tokens, ratio, generator=torch.Generator().manual_seed(1))
    assert torch.equal(masked, again)
    # an int is a sampling timestep: after step i of N, cos(pi/2 (i+1)/N) stays masked
    sched.set_timesteps(4)
    _, mask = sched.add_noise(tokens, 3, generator=torch.Generator().manual_seed(0))  # first step, i = 0
    assert mask.flatten(1).sum(1).tolist() == [round(120 * math.cos(math.pi / 8))] * 3


def test_step_unmasks_on_schedule_and_never_remasks_known_tokens():
    sched = MaskingScheduler(mask_token_id=7)
    n_steps, n = 5, 40
    sched.set_timesteps(n_steps, temperature=(2.0, 0.0))
    assert sched.temperatures.tolist() == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0])
    g = torch.Generator().manual_seed(0)
    sample = torch.full((2, n), 7)
    sample[0, :3] = torch.tensor([1, 2, 3])  # given tokens (inpainting): must survive
    logits = torch.randn(2, n, 7, generator=g)
    for i, timestep in enumerate(sched.timesteps):
        sample = sched.step(logits, int(timestep), sample, generator=g)
        left = (sample == 7).sum(1)
        if i < n_steps - 1:
            assert left[1] == math.floor(n * math.cos(math.pi / 2 * (i + 1) / n_steps))
        assert sample[0, :3].tolist() == [1, 2, 3]
    assert not (sample == 7).any()


def test_a_single_step_decodes_at_the_end_temperature():
    """One step (a quick preview) is the last step: greedy where the temperature anneals to 0, as documented."""
    sched = MaskingScheduler(mask_token_id=7)
    sched.set_timesteps(1, temperature=2.0)
    assert sched.temperatures.tolist() == [0.0]
    logits = torch.zeros(3, 20, 7)
    logits[..., 4] = 1.0  # token 4 is the most likely everywhere, the others far from impossible
    picks = sched.step(logits, int(sched.timesteps[0]), torch.full((3, 20), 7), generator=torch.Generator().manual_seed(0))
    assert (picks == 4).all()


# ---------------------------------------------------------------------------------- model
@pytest.mark.parametrize("attention", ["full", "divided"])
@pytest.mark.parametrize("t", [1, 3, 9])
def test_shapes_for_any_slice_count(t, attention):
    model = tiny(attention=attention).eval()
    text, mask = text_batch(2)
    tokens = torch.randint(0, 32, (2, t, 4, 4))
    assert model.logits(tokens, text, mask).shape == (2, t, 4, 4, 32)
    out = model(tokens=tokens, text=text, text_mask=mask, step=0)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert 0 < float(out.mask_ratio) <= 1 and set(out.logs()) >= {"loss", "accuracy_masked", "mask_ratio"}
    sample = model.generate(text, mask, grid=(t, 4, 4), steps=3, generator=torch.Generator().manual_seed(0))
    assert sample.shape == (2, t, 4, 4) and sample.max() < 32 and sample.min() >= 0
    with pytest.raises(ValueError):
        model.logits(torch.randint(0, 32, (1, 10, 4, 4)), text[:1], mask[:1])  # beyond max_t


def test_no_quadratic_parameters_or_buffers():
    """Every parameter/buffer is O(N): doubling max_t grows only the t table (linearly)."""
    sizes = {}
    for max_t in (50, 100):
        model = tiny(max_t=max_t)
        sizes[max_t] = {k: v.numel() for k, v in [*model.named_parameters(), *model.named_buffers()]}
        n_tokens = max_t * 4 * 4
        assert max(sizes[max_t].values()) < n_tokens * 64  # < N * dim, far below N^2 * anything
    grew = {k for k in sizes[50] if sizes[50][k] != sizes[100][k]}
    assert grew == {"pos_emb.t"} and sizes[100]["pos_emb.t"] == 2 * sizes[50]["pos_emb.t"]


def _capture_cross_masks(model: MaskGIT) -> list[torch.Tensor]:
    seen = []
    model.blocks[0].cross_attn.register_forward_hook(lambda mod, args, out: seen.append(args[2].clone()))
    return seen


def test_condition_dropout_applied_in_train_mode_only():
    model = tiny(cond_drop_prob=0.5)
    seen = _capture_cross_masks(model)
    text, mask = text_batch(64)
    tokens = torch.randint(0, 32, (64, 2, 4, 4))
    torch.manual_seed(1)
    model.train()
    out = model(tokens=tokens, text=text, text_mask=mask)
    dropped = ~seen[-1][:, 1:].any(dim=1)  # only the null token visible
    assert 10 < int(dropped.sum()) < 54 and float(out.cond_dropped) == pytest.approx(float(dropped.float().mean()))
    assert seen[-1][:, 0].all()  # the null token is always visible
    model.eval()
    out = model(tokens=tokens, text=text, text_mask=mask)
    assert torch.equal(seen[-1][:, 1:], mask) and float(out.cond_dropped) == 0


def test_condition_dropout_changes_the_loss():
    """With p = 1 the training loss ignores the text; with p = 0 it does not."""
    text_a, mask = text_batch(4, seed=1)
    text_b, _ = text_batch(4, seed=2)
    tokens = torch.randint(0, 32, (4, 2, 4, 4))
    for p, same in ((1.0, True), (0.0, False)):
        model = tiny(cond_drop_prob=p).train()
        losses = []
        for text in (text_a, text_b):
            torch.manual_seed(3)  # same mask and same drop decisions for both texts
            losses.append(float(model(tokens=tokens, text=text, text_mask=mask).loss.detach()))
        assert (losses[0] == losses[1]) is same, (p, losses)


def test_generate_is_deterministic_and_has_no_mask_ids():
    model = tiny().eval()
    text, mask = text_batch(2)
    run = lambda seed: model.generate(text, mask, grid=(3, 4, 4), steps=4, guidance_scale=3.0,
                                      temperature=1.0, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not (a == model.mask_id).any()


@pytest.mark.parametrize("attention", ["full", "divided"])
def test_save_and_from_pretrained_identical_logits(tmp_path, attention):
    model = tiny(max_t=5, attention=attention).eval()
    model.save_pretrained(tmp_path / "mg", seed=0)
    loaded = MaskGIT.from_pretrained(tmp_path / "mg").eval()
    assert loaded.config == model.config
    text, mask = text_batch(2)
    tokens = torch.randint(0, 33, (2, 5, 4, 4))  # including [MASK] ids
    torch.testing.assert_close(loaded.logits(tokens, text, mask), model.logits(tokens, text, mask), rtol=0, atol=0)


@pytest.mark.parametrize("attention", ["full", "divided"])
def test_overfits_one_grid(attention):
    model = tiny(attention=attention)
    g = torch.Generator().manual_seed(5)
    grid = torch.randint(0, 32, (1, 3, 4, 4), generator=g)
    text, mask = text_batch(1)
    loss = train(model, grid.expand(8, -1, -1, -1), text.expand(8, -1, -1), mask.expand(8, -1), steps=200)
    assert loss < 0.1
    sample = model.generate(text, mask, grid=(3, 4, 4), steps=6, guidance_scale=1.0,
                            generator=torch.Generator().manual_seed(0))
    assert (sample == grid).float().mean() >= 0.9


def test_guidance_separates_two_texts_after_training_with_dropout():
    model = tiny(cond_drop_prob=0.3)
    g = torch.Generator().manual_seed(6)
    grids = torch.randint(0, 32, (2, 3, 4, 4), generator=g)
    texts, masks = text_batch(2, seed=7)
    idx = torch.arange(16) % 2
    train(model, grids[idx], texts[idx], masks[idx], steps=300)

    all_masked = torch.full((1, 3, 4, 4), model.mask_id)
    cond = model.logits(all_masked, texts[:1], masks[:1]).log_softmax(-1)
    uncond = model.logits(all_masked, texts[:1], masks[:1], keep=torch.zeros(1, dtype=torch.bool)).log_softmax(-1)
    # the text picks one grid; the trained null branch spreads its belief over both (without
    # dropout it puts ~0.8 of its mass there, with it ~0.96)
    assert (cond - uncond).abs().max() > 1.0
    p_a, p_b = (uncond.exp().gather(-1, grid[None, ..., None])[..., 0] for grid in grids)  # (1, t, h, w)
    assert torch.where(grids[0] == grids[1], p_a, p_a + p_b).mean() > 0.9
    assert (cond.argmax(-1) == grids[:1]).float().mean() > (uncond.argmax(-1) == grids[:1]).float().mean()

    sample = model.generate(texts, masks, grid=(3, 4, 4), steps=6, guidance_scale=3.0,
                            generator=torch.Generator().manual_seed(0))
    assert (sample[0] == grids[0]).float().mean() >= 0.9
    assert (sample[1] == grids[1]).float().mean() >= 0.9


@pytest.mark.parametrize("attention", ["full", "divided"])
def test_checkpoint_blocks_gives_the_same_gradients(attention):
    text, mask = text_batch(2)
    tokens = torch.randint(0, 32, (2, 3, 4, 4))
    grads = []
    for flag in (False, True):
        model = tiny(checkpoint_blocks=flag, cond_drop_prob=0.5, dropout=0.1, attention=attention).train()
        torch.manual_seed(4)
        model(tokens=tokens, text=text, text_mask=mask).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(g is not None for g in grads[1])  # every parameter is used (DDP needs it)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_prepared_positions_and_context_give_the_same_logits():
    model = tiny().eval()
    text, mask = text_batch(2)
    tokens = torch.randint(0, model.config.codebook_size + 1, (2, 3, 4, 4))
    keep = torch.tensor([True, False])
    prepared = model.prepare((3, 4, 4), text, mask, keep)  # what generate() computes once per prompt
    assert torch.equal(model.logits(tokens, text, mask, keep), model.logits(tokens, text, mask, keep, prepared))


# ---------------------------------------------------------------------------------- divided attention
def test_divided_attention_is_per_slice_group_then_per_position():
    """The divided block against a loop: self_attn over each slice group's h*w tokens, time_attn over each (h, w)."""
    block = tiny(attention="divided").blocks[0].eval()
    t, h, w = 3, 4, 4
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, t * h * w, 64, generator=g)
    ctx, ctx_mask = torch.randn(2, 5, 64, generator=g), torch.tensor([[True] * 5, [True, True, False, False, False]])
    grid = x.reshape(2, t, h * w, 64)
    space = torch.stack([grid[:, k] + block.self_attn(grid[:, k]) for k in range(t)], dim=1)  # (B, t, hw, D)
    time = torch.stack([space[:, :, n] + block.time_attn(space[:, :, n]) for n in range(h * w)], dim=2)
    expected = time.reshape(2, t * h * w, 64)
    expected = expected + block.cross_attn(expected, ctx, ctx_mask)
    expected = expected + block.ff(expected)
    with torch.no_grad():
        torch.testing.assert_close(block(x, ctx, ctx_mask, (t, h, w)), expected, rtol=1e-5, atol=1e-5)


def test_divided_attention_reaches_every_token_in_one_block():
    """Space then time: one block carries a token's change to every position; space alone stays in its slice group."""
    model = tiny(attention="divided", depth=1).eval()
    text, mask = text_batch(1)
    tokens = torch.randint(0, 32, (1, 3, 4, 4), generator=torch.Generator().manual_seed(9))
    changed = tokens.clone()
    changed[0, 1, 2, 3] = (changed[0, 1, 2, 3] + 1) % 32
    with torch.no_grad():
        moved = (model.logits(tokens, text, mask) - model.logits(changed, text, mask)).abs().amax(-1)  # (1, t, h, w)
    assert (moved > 1e-6).all()
    block = model.blocks[0]
    x = torch.randn(1, 3 * 16, 64, generator=torch.Generator().manual_seed(10))
    y = x.clone()
    y[0, 16 + 2 * 4 + 3] += 1.0  # the token at (1, 2, 3)
    space = lambda v: v + block.self_attn(v.reshape(3, 16, 64)).reshape(1, 48, 64)  # noqa: E731
    with torch.no_grad():
        diff = (space(x) - space(y)).abs().amax(-1).reshape(3, 16)
    assert (diff[1] > 0).all() and (diff[[0, 2]] == 0).all()


def test_unknown_attention_is_refused():
    with pytest.raises(ValueError, match="attention"):
        MaskGITConfig(attention="axial")
