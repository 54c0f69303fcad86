"""CT-ViT tokenizer, its VQ codebook, discriminator wiring and perceptual loss (tiny seeded configs, CPU)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ctgen.models.attention import Attention
from ctgen.jobs.config import model_preset
from ctgen.models.ctvit import CTViT, CTViTConfig
from ctgen.models.perceptual import PerceptualLoss
from ctgen.models.vq import VectorQuantizer


def tiny(**overrides) -> CTViTConfig:
    values = dict(image_size=32, num_slices=9, patch_size=8, temporal_patch_size=2, dim=32, heads=2, dim_head=16,
                  spatial_depth=1, temporal_depth=1, codebook_size=64, codebook_dim=16, disc_dim=8, disc_layers=3,
                  disc_slices=2, adversarial_start=10)
    return CTViTConfig(**{**values, **overrides})


def chest(slices: int = 9, size: int = 32) -> torch.Tensor:
    """A smooth synthetic chest in [-1, 1]: body ellipse, two lungs growing along z, a spine. (1, 1, D, H, W)."""
    z = torch.linspace(-1, 1, slices)[:, None, None]
    y = torch.linspace(-1, 1, size)[None, :, None]
    x = torch.linspace(-1, 1, size)[None, None, :]
    inside = lambda r: torch.sigmoid(-12 * r)  # noqa: E731  soft indicator of r < 0
    body = inside((x / 0.85) ** 2 + (y / 0.65) ** 2 - 1)
    ly = 0.45 + 0.1 * z
    lungs = inside(((x - 0.4) / 0.28) ** 2 + (y / ly) ** 2 - 1) + inside(((x + 0.4) / 0.28) ** 2 + (y / ly) ** 2 - 1)
    spine = inside((x / 0.12) ** 2 + ((y - 0.5) / 0.12) ** 2 - 1)
    hu = -1000 + 1000 * body - 800 * lungs + 700 * spine
    return (hu / 1000).clamp(-1, 1)[None, None]


@pytest.mark.parametrize("first_separate", [True, False])
@pytest.mark.parametrize("slices", [1, 2, 5, 17, 32])
def test_any_slice_count_round_trips_to_same_count(slices, first_separate):
    torch.manual_seed(0)
    model = CTViT(tiny(first_slice_separate=first_separate)).eval()
    video = torch.rand(2, 1, slices, 32, 24) * 2 - 1
    indices = model.encode(video)
    t = 1 + -(-(slices - 1) // 2) if first_separate else -(-slices // 2)
    assert indices.shape == (2, t, 4, 3) and indices.dtype == torch.long
    assert model.tokens_shape(slices, 32, 24) == (t, 4, 3)
    assert model.decode(indices, slices).shape == (2, 1, slices, 32, 24)
    out = model(video)
    assert out.recon.shape == video.shape and out.indices.shape == indices.shape
    assert torch.equal(out.indices, indices)  # eval forward and encode agree


def test_bad_shapes_raise():
    model = CTViT(tiny())
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model.encode(torch.zeros(1, 1, 4, 30, 32))
    with pytest.raises(ValueError, match="expected video"):
        model.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError):
        CTViTConfig(image_size=100, patch_size=16)


def test_presets():
    demo, paper = (CTViT.config_from_dict(model_preset(name, "tokenizer")["model"]) for name in ("demo", "paper"))
    assert (demo.image_size, demo.num_slices, demo.patch_size, demo.dim, demo.codebook_size) == (32, 32, 4, 64, 256)
    assert (paper.image_size, paper.num_slices, paper.patch_size, paper.temporal_patch_size) == (128, 201, 16, 2)
    assert (paper.dim, paper.codebook_size, paper.spatial_depth, paper.temporal_depth, paper.heads) == (512, 8192, 4, 4, 8)
    with torch.device("meta"):
        assert CTViT(paper).tokens_shape(201, 128, 128) == (101, 8, 8)


@pytest.mark.parametrize("first_separate", [True, False])
def test_encoder_and_decoder_are_causal_along_depth(first_separate):
    torch.manual_seed(0)
    model = CTViT(tiny(first_slice_separate=first_separate)).eval()
    video = torch.rand(1, 1, 11, 32, 32) * 2 - 1
    tubelet = (lambda s: 0 if s == 0 else 1 + (s - 1) // 2) if first_separate else (lambda s: s // 2)
    with torch.no_grad():
        z = model._encode_continuous(video)
        for k in (0, 3, 6):
            changed = video.clone()
            changed[:, :, k + 1:] = torch.rand_like(changed[:, :, k + 1:])
            z2 = model._encode_continuous(changed)
            keep = tubelet(k + 1)  # time steps before the first altered tubelet
            torch.testing.assert_close(z2[:, :keep], z[:, :keep], rtol=0, atol=1e-5)
            assert not torch.allclose(z2[:, keep:], z[:, keep:], atol=1e-3)  # the change does reach later steps
            assert torch.equal(model.encode(changed)[:, :keep], model.encode(video)[:, :keep])
        # decoder: altering tokens from time step 2 on leaves the slices of steps 0-1 unchanged
        idx = model.encode(video)
        idx2 = idx.clone()
        idx2[:, 2:] = torch.randint_like(idx2[:, 2:], model.config.codebook_size)
        first_changed = 3 if first_separate else 4
        a, b = model.decode(idx, 11), model.decode(idx2, 11)
        torch.testing.assert_close(b[:, :, :first_changed], a[:, :, :first_changed], rtol=0, atol=1e-5)
        assert not torch.allclose(b[:, :, first_changed:], a[:, :, first_changed:], atol=1e-3)


def test_save_and_load_give_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = CTViT(tiny())
    video = chest()
    model(video).loss.backward()  # one training pass: the codebook buffers move off their init
    model.eval()
    model.save_pretrained(tmp_path / "ctvit", seed=0)
    loaded = CTViT.from_pretrained(tmp_path / "ctvit").eval()
    assert loaded.config == model.config
    assert torch.equal(loaded.vq.embed, model.vq.embed) and torch.equal(loaded.vq.cluster_size, model.vq.cluster_size)
    with torch.no_grad():
        idx = model.encode(video)
        assert torch.equal(loaded.encode(video), idx)
        assert torch.equal(loaded.decode(idx, 9), model.decode(idx, 9))


def test_perceptual_loss_from_local_file_is_not_in_state_dict(tmp_path):
    torch.manual_seed(0)
    weights = {f"features.{k}": v for k, v in PerceptualLoss().features.state_dict().items()}
    save_file(weights, tmp_path / "vgg.safetensors")
    torch.save({k.removeprefix("features."): v for k, v in weights.items()}, tmp_path / "vgg.pt")
    net = PerceptualLoss.from_path(tmp_path / "vgg.safetensors")
    net_pt = PerceptualLoss.from_path(tmp_path / "vgg.pt")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net_pt.state_dict().values()))
    x, y = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1
    assert net.loss(x, x).item() == pytest.approx(0.0, abs=1e-6) and net.loss(x, y).item() > 0
    with pytest.raises(ValueError, match="needs a network"):
        CTViT(tiny(perceptual_weight=0.1))
    model = CTViT(tiny(perceptual_weight=0.1), perceptual=net)
    assert not any("perceptual" in k or k.startswith("features.") for k in model.state_dict())
    assert all(p.requires_grad for p in model.parameters())  # the frozen VGG is not among them
    out = model(chest())
    assert out.perceptual_loss.item() > 0
    out.loss.backward()
    assert all(p.grad is None for p in net.parameters())
    truncated = {k: v for k, v in weights.items() if not k.startswith("features.28")}
    save_file(truncated, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="lack"):
        PerceptualLoss.from_path(tmp_path / "bad.safetensors")


def test_discriminator_is_trained_only_by_its_own_loss():
    torch.manual_seed(0)
    model = CTViT(tiny(adversarial_start=10))
    disc = list(model.discriminator.parameters())
    tok = [p for n, p in model.named_parameters() if not n.startswith("discriminator.")]
    out = model(chest(), step=10)
    assert out.adversarial_active == 1.0 and out.adaptive_weight.item() > 0
    assert all(g is None for g in torch.autograd.grad(out.gen_adv_loss, disc, retain_graph=True, allow_unused=True))
    assert any(g is not None for g in torch.autograd.grad(out.gen_adv_loss, tok, retain_graph=True, allow_unused=True))
    assert all(g is None for g in torch.autograd.grad(out.disc_loss, tok, retain_graph=True, allow_unused=True))
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc if p.ndim > 1)  # conv weights learn


def test_adversarial_terms_are_zero_before_start():
    torch.manual_seed(0)
    model = CTViT(tiny(adversarial_start=10))
    out = model(chest(), step=9)
    assert out.adversarial_active == 0.0 and out.adaptive_weight.item() == 0.0
    assert out.disc_loss.item() > 0  # computed all the same (DDP sees the parameters used) ...
    expected = out.recon_loss + model.config.commitment_weight * out.commit_loss
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)  # ... but counted 0 times
    out.loss.backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in model.discriminator.parameters())


def test_bf16_autocast_forward_and_backward():
    torch.manual_seed(0)
    model = CTViT(tiny())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(chest(), step=10)
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_vq_ema_moves_codes_toward_their_inputs():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=8, codebook_size=4, decay=0.5, dead_code_threshold=0.0)
    eye = torch.eye(8)
    vq.embed.copy_(eye[:4])  # codes e0..e3
    vq.embed_sum.copy_(eye[:4])
    centres = torch.nn.functional.normalize(eye[:4] + 0.5 * eye[4:], dim=-1)  # (4, 8): e_i tilted toward e_i+4
    x = centres.repeat(16, 1) + 0.01 * torch.randn(64, 8)  # (64, 8), 16 around each centre
    before = (vq.embed * centres).sum(-1)  # cosine of each code to its cluster centre (0.894)
    out = vq(x)
    assert torch.equal(out.indices, torch.arange(4).repeat(16))
    after = (vq.embed * centres).sum(-1)
    assert (after > before + 0.05).all() and (after > 0.99).all()  # decay 0.5, sums dominated by the batch
    torch.testing.assert_close(vq.embed.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(vq.cluster_size, torch.full((4,), 8.0))  # 0.5 * 0 + 0.5 * 16


def test_vq_restarts_dead_codes_from_batch_inputs():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=8, codebook_size=16, dead_code_threshold=0.5)  # 0.5 x 32 inputs / 16 codes = 1.0
    x = torch.randn(32, 8)
    xn = torch.nn.functional.normalize(x, dim=-1)
    vq(x)  # first batch: every code has EMA size 0 < threshold, so all restart from the data
    sim = vq.embed @ xn.t()  # (16, 32)
    assert (sim.max(dim=1).values > 1 - 1e-5).all()  # each code is one of the batch inputs
    torch.testing.assert_close(vq.cluster_size, torch.ones(16))
    vq.cluster_size[3] = 0.1  # code 3 has gone dead; the others are alive for this step
    vq.cluster_size[torch.arange(16) != 3] = 100.0
    old = vq.embed.clone()
    y = torch.randn(32, 8)
    vq(y)
    assert ((vq.embed[3] @ torch.nn.functional.normalize(y, dim=-1).t()).max() > 1 - 1e-5)
    assert vq.cluster_size[3] == 1.0 and (vq.cluster_size[torch.arange(16) != 3] > 50).all()
    assert not torch.allclose(vq.embed[3], old[3])


def test_vq_restarts_seed_distinct_codes():
    """Dead codes are seeded from distinct inputs while the batch has enough, then as evenly as possible: a
    draw with replacement gave ~37% copies at the first step, codes that never win the argmax."""
    torch.manual_seed(0)
    for n, k in ((64, 64), (40, 64), (300, 64)):
        vq = VectorQuantizer(dim=8, codebook_size=k, dead_code_threshold=0.5)
        x = torch.randn(n, 8)
        xn = torch.nn.functional.normalize(x, dim=-1)
        assert int(vq(x).restarted) == k  # the first batch restarts every code
        source = (vq.embed @ xn.t()).argmax(dim=1)  # (k,) the input each code was seeded from
        assert (vq.embed @ xn.t()).max(dim=1).values.min() > 1 - 1e-5
        uses = torch.bincount(source, minlength=n)
        assert int(uses.max()) == -(-k // n)  # 1 while n >= k; 2 for 64 codes from 40 inputs
        assert int(uses.min()) == (1 if n <= k else 0) and int((uses > 0).sum()) == min(n, k)


def test_vq_dead_code_threshold_scales_with_the_batch():
    """GenerateCT's absolute 2.0 with 8,192 codes and ~6.5k tokens a step declared every code dead every step;
    the relative threshold restarts only codes that stopped being used, at any batch size."""
    torch.manual_seed(0)
    k, n = 64, 48  # fewer inputs per step than codes, as at the paper geometry
    centres = torch.nn.functional.normalize(torch.randn(k, 8), dim=-1)
    vq = VectorQuantizer(dim=8, codebook_size=k, decay=0.9, dead_code_threshold=0.05)
    vq(centres.repeat(2, 1))  # the first batch seeds every code
    absolute = VectorQuantizer(dim=8, codebook_size=k, decay=0.9, dead_code_threshold=2.0 * k / n)  # = 2.0 a step
    absolute(centres.repeat(2, 1))
    g = torch.Generator().manual_seed(1)
    restarts, old = [], []
    for _ in range(60):
        x = centres[torch.randint(0, k, (n,), generator=g)] + 0.01 * torch.randn(n, 8, generator=g)
        restarts.append(int(vq(x).restarted))
        old.append(int(absolute(x).restarted))
    # a code used ~0.75 times a step stays alive; what restarts are duplicates of the seeding draw, which never win
    assert sum(restarts[20:]) / 40 < 0.1 * k
    assert sum(old[20:]) / 40 > k / 2  # the absolute threshold re-seeds most of the codebook every step
    assert vq.threshold(n) == pytest.approx(0.05 * n / k)
    assert int(vq.eval()(x).restarted) == 0  # no restarts outside training


def test_vq_perplexity_usage_eval_is_pure_and_straight_through():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=8, codebook_size=32, codebook_dim=8).eval()
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    x = vq.embed[torch.arange(8).repeat(4)].clone().requires_grad_(True)  # 8 codes, 4 times each
    out = vq(x)
    assert torch.equal(out.indices, torch.arange(8).repeat(4))
    assert out.perplexity.item() == pytest.approx(8.0, rel=1e-4)
    assert out.usage.item() == pytest.approx(8 / 32)
    assert out.commit_loss.item() == pytest.approx(0.0, abs=1e-10)
    assert all(torch.equal(v, state[k]) for k, v in vq.state_dict().items())  # eval: codebook untouched
    out.quantized.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradient reaches the input (straight-through)
    torch.testing.assert_close(vq.codes_to_vectors(out.indices), out.quantized.detach())


def test_attention_masks():
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, context_dim=12)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    mask = torch.tensor([[True] * 4 + [False] * 3, [False] * 7])
    out = attn(x, context=ctx, mask=mask)
    ctx2 = ctx.clone()
    ctx2[:, 4:] = torch.randn(2, 3, 12)  # padded keys do not matter
    torch.testing.assert_close(attn(x, context=ctx2, mask=mask), out)
    assert torch.equal(out[1], torch.zeros(5, 16))  # no valid key at all: zeros, not NaN


def test_overfits_one_volume():
    """The whole tokenizer (VQ bottleneck included) memorises one smooth chest-like volume."""
    torch.manual_seed(0)
    cfg = tiny(dim=64, heads=4, spatial_depth=2, temporal_depth=2, codebook_size=256, codebook_dim=32,
               adversarial_start=10**9, disc_slices=1)
    model = CTViT(cfg)
    video = chest()  # variance 0.137
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    with torch.no_grad():
        initial = torch.mean((model.eval().decode(model.encode(video), 9) - video) ** 2).item()
    model.train()
    for _ in range(250):
        out = model(video)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        final = torch.mean((model.decode(model.encode(video), 9) - video) ** 2).item()
    assert final < 0.01 and final < initial / 20, (initial, final)


DDP_SCRIPT = '''
import sys, torch, torch.distributed as dist, torch.multiprocessing as mp
from ctgen.models.vq import VectorQuantizer

def batch(rank, step):
    return torch.randn(40, 8, generator=torch.Generator().manual_seed(100 * step + rank)) + rank

def work(rank, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    torch.manual_seed(0)
    plain = VectorQuantizer(8, 16, dead_code_threshold=0.0)  # EMA only
    torch.manual_seed(0)
    restarting = VectorQuantizer(8, 16, dead_code_threshold=3.0)  # EMA + restarts
    torch.manual_seed(rank)  # each rank draws its own restart candidates: only rank 0's may be used
    for step in range(3):
        plain(batch(rank, step))
        restarting(batch(rank, step))
    torch.save({"plain": plain.embed, "restarting": restarting.embed}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(work, args=(sys.argv[1],), nprocs=2)
'''


def test_vq_codebooks_stay_identical_across_ddp_ranks(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "ddp_vq.py"
    script.write_text(DDP_SCRIPT)
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, timeout=120)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["plain"], r1["plain"]) and torch.equal(r0["restarting"], r1["restarting"])
    # the all-reduced EMA equals one process seeing both ranks' batches
    torch.manual_seed(0)
    single = VectorQuantizer(8, 16, dead_code_threshold=0.0)
    for step in range(3):
        single(torch.cat([torch.randn(40, 8, generator=torch.Generator().manual_seed(100 * step + r)) + r
                          for r in (0, 1)]))
    torch.testing.assert_close(r0["plain"], single.embed, rtol=0, atol=1e-5)


def test_from_pretrained_puts_the_model_on_the_device_asked_for(tmp_path, monkeypatch):
    """load_state_dict copies into the parameters where they were built (the CPU): the loaded module must be moved
    to ``map_location`` itself. Checked with the meta device (a GPU is not needed to see where a module lands)."""
    import ctgen.models.base as base
    from ctgen.pipelines.spec import load_network
    from tests.ctgen.tiny import TOKENIZER

    CTViT(CTViT.config_from_dict(TOKENIZER)).save_pretrained(tmp_path / "tok")
    read = base.load_file
    monkeypatch.setattr(base, "load_file", lambda path, device="cpu": read(path, device="cpu"))  # meta holds no data
    model = load_network(tmp_path / "tok", CTViT, torch.device("meta"))
    assert {t.device.type for t in (*model.parameters(), *model.buffers())} == {"meta"}
    assert not model.training
