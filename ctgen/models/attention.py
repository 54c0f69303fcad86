"""Small pre-norm transformer blocks shared by the ctgen models.

``Attention`` (self- or cross-attention, optional causal mask and key padding mask, through
``torch.nn.functional.scaled_dot_product_attention``), ``FeedForward`` (GEGLU) and ``Transformer``
(a stack of them with a final LayerNorm), in the style of lucidrains' phenaki / muse-maskgit.
Sequences are ``(B, N, dim)``; masks are boolean with ``True`` = attend to this key.

Also the fixed sin-cos position embeddings (1D and 2D) used by the tokenizer: they are computed for
any length, so a model accepts any slice count and any in-plane size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class Attention(nn.Module):
    """Multi-head attention with its own pre-norm.

    Self-attention when ``context_dim`` is None, else cross-attention to a ``context`` of that
    width. Memory is O(N x M) per head for N queries and M keys (the attention matrix; the fused
    SDPA kernels avoid materialising it on GPU).
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, causal: bool = False,
                 context_dim: int | None = None) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.causal = causal
        self.norm = nn.LayerNorm(dim)
        self.context_norm = nn.LayerNorm(context_dim) if context_dim is not None else None
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim if context_dim is not None else dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, dim); context (B, M, context_dim) for cross-attention; mask (B, M) bool over keys.

        A query row whose keys are all masked out returns zeros (instead of SDPA's NaN).
        """
        if (context is None) != (self.context_norm is None):
            raise ValueError("pass a context exactly when the block was built with context_dim")
        x = self.norm(x)
        kv_in = self.context_norm(context) if context is not None else x
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)  # (B, heads, N, dh)
        k, v = rearrange(self.to_kv(kv_in), "b m (two h d) -> two b h m d", two=2, h=self.heads)  # (B, heads, M, dh)
        n, m = q.shape[-2], k.shape[-2]
        attn_mask, empty = None, None
        if mask is not None:
            attn_mask = rearrange(mask.bool(), "b m -> b 1 1 m")  # (B, 1, 1, M)
        if self.causal:
            causal = torch.ones(n, m, dtype=torch.bool, device=x.device).tril(m - n)  # (N, M)
            attn_mask = causal if attn_mask is None else attn_mask & causal
        if attn_mask is not None:
            attn_mask = attn_mask.expand(q.shape[0], 1, n, m)  # (B, 1, N, M)
            empty = ~attn_mask.any(-1, keepdim=True)  # (B, 1, N, 1) rows with no key to attend to
            attn_mask = attn_mask | empty  # let them attend to everything, then zero them below
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, N, dh)
        if empty is not None:
            out = out.masked_fill(empty, 0.0)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class FeedForward(nn.Module):
    """Pre-norm GEGLU feed-forward; hidden width ``dim * mult * 2/3`` keeps the parameter count of a GELU MLP."""

    def __init__(self, dim: int, mult: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mult * 2 / 3)
        self.norm = nn.LayerNorm(dim)
        self.proj_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.proj_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj_in(self.norm(x)).chunk(2, dim=-1)  # (B, N, hidden) each
        return self.proj_out(h * F.gelu(gate))


class Transformer(nn.Module):
    """``depth`` residual blocks of self-attention, optional cross-attention, and feed-forward.

    ``Transformer(dim, depth, heads, dim_head, ff_mult, causal=False, cross_attend=False, context_dim=None)``;
    call as ``t(x, mask=None, context=None, context_mask=None)`` with x (B, N, dim), mask (B, N) over
    x's own keys, context (B, M, context_dim or dim) and context_mask (B, M). Returns (B, N, dim).
    """

    def __init__(self, dim: int, depth: int, heads: int = 8, dim_head: int = 64, ff_mult: float = 4.0,
                 causal: bool = False, cross_attend: bool = False, context_dim: int | None = None) -> None:
        super().__init__()
        self.cross_attend = cross_attend
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleList([
                Attention(dim, heads, dim_head, causal=causal),
                Attention(dim, heads, dim_head, context_dim=context_dim or dim) if cross_attend else nn.Identity(),
                FeedForward(dim, ff_mult),
            ]))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.cross_attend and context is None:
            raise ValueError("this Transformer cross-attends: pass a context")
        for self_attn, cross_attn, ff in self.layers:
            x = x + self_attn(x, mask=mask)
            if self.cross_attend:
                x = x + cross_attn(x, context=context, mask=context_mask)
            x = x + ff(x)
        return self.norm(x)


def sincos_1d(length: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed sin-cos embedding of positions 0..length-1: (length, dim), ``dim`` even."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dim, got {dim}")
    pos = torch.arange(length, device=device, dtype=torch.float32)  # (L,)
    freqs = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = pos[:, None] * freqs[None, :]  # (L, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)  # (L, dim)


def sincos_2d(height: int, width: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed 2D sin-cos embedding (half the channels for rows, half for columns): (height, width, dim)."""
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding needs dim divisible by 4, got {dim}")
    rows = sincos_1d(height, dim // 2, device, dtype)  # (H, dim/2)
    cols = sincos_1d(width, dim // 2, device, dtype)  # (W, dim/2)
    return torch.cat([rows[:, None, :].expand(-1, width, -1), cols[None, :, :].expand(height, -1, -1)], dim=-1)
