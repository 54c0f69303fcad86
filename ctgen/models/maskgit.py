"""MaskGIT: a bidirectional transformer over CT-ViT token grids, conditioned on report text.

Training masks a cosine-scheduled fraction of each grid's tokens and predicts them (cross-entropy
on the masked positions only); the text condition is replaced by a learned null embedding for a
``cond_drop_prob`` fraction of the samples, so the unconditional branch that classifier-free
guidance needs is really trained. Sampling decodes the whole grid in N parallel steps with
confidence re-masking (``ctgen.schedulers.masking``) and guidance ``u + s * (c - u)``.

Unlike GenerateCT's MaskGIT, there is no MLP over all N x N token pairs: positions are the sum of
three learned per-axis tables (t, h, w), O((t + h + w) * dim) parameters and O(N * dim) memory,
and the number of slices t is chosen at sampling time (up to ``max_t``). Attention goes through
``F.scaled_dot_product_attention``, whose flash/memory-efficient kernels never materialise the
N x N score matrix. ``attention="divided"`` (the demo preset) splits each block's self-attention into
attention within each slice group and attention along the slices (TimeSformer's divided space-time
attention): O(N (h w + t)) instead of O(N^2), which at the demo's 17 x 8 x 8 grid halves a CPU training step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint

from ctgen.models.attention import Attention
from ctgen.models.base import ModelOutput, PretrainedMixin
from ctgen.schedulers.masking import MaskingScheduler, cosine_schedule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaskGITConfig:
    """MaskGIT hyper-parameters; the defaults are GenerateCT's (the presets live in config.yaml: ``model_presets``)."""

    codebook_size: int = 8192  # K tokenizer codes; id K is [MASK]
    dim: int = 512  # transformer width
    depth: int = 6  # transformer blocks (self-attention + cross-attention + MLP each)
    heads: int = 8  # attention heads
    dim_head: int = 64  # width of each head
    ff_mult: int = 4  # MLP hidden width = ff_mult * dim
    text_dim: int = 768  # width of the text encoder's hidden states (BERT-base / CXR-BERT)
    max_t: int = 101  # longest token grid along slices (GenerateCT: 1 + 200 / 2 for 201 slices)
    max_h: int = 8  # token grid height (128 px / patch 16)
    max_w: int = 8  # token grid width
    cond_drop_prob: float = 0.1  # fraction of training samples whose text is replaced by the null embedding
    dropout: float = 0.0  # dropout on attention weights and MLP hidden units (training only)
    checkpoint_blocks: bool = False  # recompute each block in backward: less activation memory, ~30% slower
    attention: str = "full"  # full: over all t*h*w tokens (GenerateCT) | divided: within each slice group, then along t at each (h, w) (TimeSformer): O(N (hw + t))

    def __post_init__(self):
        if self.attention not in ("full", "divided"):
            raise ValueError(f"MaskGIT attention must be 'full' or 'divided', got {self.attention!r}")


@dataclass
class MaskGITOutput(ModelOutput):
    """``loss``: cross-entropy on masked tokens; the rest is logged."""

    accuracy_masked: torch.Tensor  # top-1 accuracy on the masked tokens
    mask_ratio: torch.Tensor  # mean fraction of tokens masked in the batch
    cond_dropped: torch.Tensor  # fraction of samples whose text condition was dropped


class FactorisedPositionEmbedding(nn.Module):
    """3D positions as the sum of learned per-axis tables: O((t + h + w) * dim) parameters."""

    def __init__(self, dim: int, max_t: int, max_h: int, max_w: int):
        super().__init__()
        self.t = nn.Parameter(torch.randn(max_t, dim) * 0.02)
        self.h = nn.Parameter(torch.randn(max_h, dim) * 0.02)
        self.w = nn.Parameter(torch.randn(max_w, dim) * 0.02)

    def no_weight_decay(self) -> list[str]:
        return ["t", "h", "w"]  # embedding tables (ctgen.training.optim): decay shrinks rarely-seen positions

    def forward(self, t: int, h: int, w: int) -> torch.Tensor:
        """Position embeddings of a (t, h, w) grid, flattened t-major: (t * h * w, dim)."""
        if t > self.t.shape[0] or h > self.h.shape[0] or w > self.w.shape[0]:
            raise ValueError(f"grid {(t, h, w)} exceeds the position tables {(self.t.shape[0], self.h.shape[0], self.w.shape[0])}")
        pos = (rearrange(self.t[:t], "t d -> t 1 1 d") + rearrange(self.h[:h], "h d -> 1 h 1 d")
               + rearrange(self.w[:w], "w d -> 1 1 w d"))  # (t, h, w, D): O(N * D)
        return rearrange(pos, "t h w d -> (t h w) d")


class FeedForward(nn.Module):
    """Pre-norm GELU MLP."""

    def __init__(self, dim: int, mult: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mult * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    """Self-attention over the grid, cross-attention to the text, MLP; all residual, pre-norm.

    With ``attention="divided"`` the self-attention is split in two residual steps, as in TimeSformer:
    ``self_attn`` among the h*w tokens of each slice group, then ``time_attn`` among the t tokens
    at each in-plane position. Every token still reaches every other in one block (through two hops),
    at O(N (h w + t)) instead of O(N^2): at the demo's 17 x 8 x 8 grid the score matrices are 13x
    smaller, which makes a CPU training step 1.8x faster (0.20 -> 0.11 s; attention was 65% of it).
    """

    def __init__(self, config: MaskGITConfig):
        super().__init__()
        c = config
        self.divided = c.attention == "divided"
        self.self_attn = Attention(c.dim, c.heads, c.dim_head, fused_qkv=True, dropout=c.dropout)
        if self.divided:
            self.time_attn = Attention(c.dim, c.heads, c.dim_head, fused_qkv=True, dropout=c.dropout)
        # the context is already projected and normalised to dim by MaskGIT.text_proj
        self.cross_attn = Attention(c.dim, c.heads, c.dim_head, context_dim=c.dim, context_norm=False, dropout=c.dropout)
        self.ff = FeedForward(c.dim, c.ff_mult, c.dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor,
                grid: tuple[int, int, int]) -> torch.Tensor:
        """x (B, t*h*w, D) flattened t-major over ``grid``; context (B, M, D) and its mask (B, M)."""
        if self.divided:
            t, h, w = grid
            space = rearrange(x, "b (t n) d -> (b t) n d", t=t)  # each slice group's h*w tokens
            x = x + rearrange(self.self_attn(space), "(b t) n d -> b (t n) d", t=t)
            time = rearrange(x, "b (t n) d -> (b n) t d", t=t)  # each in-plane position's t tokens
            x = x + rearrange(self.time_attn(time), "(b n) t d -> b (t n) d", n=h * w)
        else:
            x = x + self.self_attn(x)
        x = x + self.cross_attn(x, context, context_mask)
        return x + self.ff(x)


class MaskGIT(nn.Module, PretrainedMixin):
    """Text-conditioned masked token transformer over (t, h, w) grids of CT-ViT codes."""

    config_class = MaskGITConfig

    def __init__(self, config: MaskGITConfig):
        super().__init__()
        self.config = c = config
        self.mask_id = c.codebook_size
        self.token_emb = nn.Embedding(c.codebook_size + 1, c.dim)  # + [MASK]
        self.pos_emb = FactorisedPositionEmbedding(c.dim, c.max_t, c.max_h, c.max_w)
        self.text_proj = nn.Sequential(nn.LayerNorm(c.text_dim), nn.Linear(c.text_dim, c.dim))
        # always-visible context token; alone when the condition is dropped (the "null text")
        self.null_text = nn.Parameter(torch.randn(1, c.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)
        self.to_logits = nn.Linear(c.dim, c.codebook_size)
        self.scheduler = MaskingScheduler(self.mask_id)

    # ------------------------------------------------------------------ building blocks
    def no_weight_decay(self) -> list[str]:
        return ["null_text"]  # the learned null condition of classifier-free guidance (ctgen.training.optim)

    def context(self, text: torch.Tensor, text_mask: torch.Tensor,
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys: [null, proj(text)] (B, 1 + L, D) and their mask (B, 1 + L) bool.

        ``keep (B,)`` bool: False drops the sample's text (only the null token stays visible), which
        is exactly the unconditional input that guidance uses at sampling time.
        """
        b = text.shape[0]
        ctx = self.text_proj(text)  # (B, L, D)
        null = repeat(self.null_text.to(ctx.dtype), "1 d -> b 1 d", b=b)
        mask = text_mask.bool()
        if keep is not None:
            mask = mask & rearrange(keep.bool(), "b -> b 1")
        visible = torch.ones(b, 1, dtype=torch.bool, device=mask.device)
        return torch.cat([null, ctx], dim=1), torch.cat([visible, mask], dim=1)

    def prepare(self, grid: tuple[int, int, int], text: torch.Tensor, text_mask: torch.Tensor,
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positions (N, D), context, context mask): what every decoding step of one prompt shares."""
        return (self.pos_emb(*grid), *self.context(text, text_mask, keep))

    def hidden(self, tokens: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
               keep: torch.Tensor | None = None, prepared: tuple | None = None) -> torch.Tensor:
        """Final normalised hidden states (B, t*h*w, D) for ``tokens (B, t, h, w)`` (may hold [MASK]).

        ``prepared``: :meth:`prepare`'s output, computed once per prompt at sampling time.
        """
        _, t, h, w = tokens.shape
        pos, ctx, ctx_mask = prepared if prepared is not None else self.prepare((t, h, w), text, text_mask, keep)
        x = self.token_emb(rearrange(tokens, "b t h w -> b (t h w)"))  # (B, N, D)
        x = x + pos.to(x.dtype)
        for block in self.blocks:
            if self.config.checkpoint_blocks and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, ctx, ctx_mask, (t, h, w), use_reentrant=False)
            else:
                x = block(x, ctx, ctx_mask, (t, h, w))
        return self.norm(x)

    def logits(self, tokens: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
               keep: torch.Tensor | None = None, prepared: tuple | None = None) -> torch.Tensor:
        """Codebook logits (B, t, h, w, K) for ``tokens (B, t, h, w)`` with [MASK] ids."""
        _, t, h, w = tokens.shape
        out = self.to_logits(self.hidden(tokens, text, text_mask, keep, prepared))  # (B, N, K)
        return rearrange(out, "b (t h w) k -> b t h w k", t=t, h=h, w=w)

    # ------------------------------------------------------------------ training
    def forward(self, tokens: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                step: int = 0) -> MaskGITOutput:
        """Mask a cosine-scheduled fraction of each grid and predict it (torch's global RNG)."""
        b = tokens.shape[0]
        ratio = cosine_schedule(torch.rand(b))  # (B,) mask ratio per sample, r ~ U(0, 1)
        masked, mask = self.scheduler.add_noise(tokens, ratio)  # (B, t, h, w) each
        if self.training and self.config.cond_drop_prob > 0:
            keep = torch.rand(b, device=tokens.device) >= self.config.cond_drop_prob  # (B,)
        else:
            keep = torch.ones(b, dtype=torch.bool, device=tokens.device)
        x = self.hidden(masked, text, text_mask, keep)  # (B, N, D)
        flat_mask = rearrange(mask, "b t h w -> b (t h w)")
        # the head only on masked positions: their logits (M, K) are all the loss needs
        logits = self.to_logits(x[flat_mask]).float()  # (M, K)
        target = rearrange(tokens, "b t h w -> b (t h w)")[flat_mask]  # (M,)
        loss = F.cross_entropy(logits, target)
        with torch.no_grad():
            accuracy = (logits.argmax(dim=-1) == target).float().mean()
        return MaskGITOutput(loss=loss, accuracy_masked=accuracy, mask_ratio=mask.float().mean(),
                             cond_dropped=(~keep).float().mean())

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, text: torch.Tensor, text_mask: torch.Tensor, grid: tuple[int, int, int],
                 steps: int = 18, guidance_scale: float = 5.0, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Token grids (B, t, h, w) for ``text (B, L, C)`` in ``steps`` parallel decoding steps.

        Guidance: logits = u + s * (c - u), with the conditional and null-text passes batched
        together (2B); s = 1 disables it (one pass of B). The temperature is annealed linearly
        from ``temperature`` to 0. Deterministic given ``generator``.
        """
        t, h, w = grid
        b = text.shape[0]
        device = text.device
        guided = guidance_scale != 1.0
        log.debug("generate: %d grids of %s, %d steps, guidance %.2f, temperature %.2f", b, grid, steps,
                  guidance_scale, temperature)
        self.scheduler.set_timesteps(steps, temperature=(temperature, 0.0), device=device)
        sample = torch.full((b, t, h, w), self.mask_id, dtype=torch.long, device=device)
        if guided:  # cond + null in one batch: guidance doubles the token pass, nothing else
            text2, mask2 = torch.cat([text, text]), torch.cat([text_mask, text_mask])
            keep2 = torch.cat([torch.ones(b, dtype=torch.bool, device=device),
                               torch.zeros(b, dtype=torch.bool, device=device)])
            prepared = self.prepare(grid, text2, mask2, keep2)  # positions and text context: once per prompt
        else:
            prepared = self.prepare(grid, text, text_mask)
        for timestep in self.scheduler.timesteps:
            if guided:
                cond, uncond = self.logits(torch.cat([sample, sample]), text2, mask2, keep2, prepared).float().chunk(2)
                logits = uncond + guidance_scale * (cond - uncond)  # (B, t, h, w, K)
            else:
                logits = self.logits(sample, text, text_mask, prepared=prepared).float()
            sample = self.scheduler.step(logits, int(timestep), sample, generator=generator)
        return sample
