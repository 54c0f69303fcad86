"""Small pre-norm transformer blocks shared by the ctgen models.

``Attention`` (the one attention block: self- or cross-attention, optional causal mask and key
padding mask, through ``torch.nn.functional.scaled_dot_product_attention``; used by CT-ViT, MaskGIT
and the small text encoder), ``FeedForward`` (GEGLU) and ``Transformer`` (a stack of them with a
final LayerNorm), in the style of lucidrains' phenaki / muse-maskgit.
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
    """The one multi-head attention block of ctgen, with its own pre-norm, through SDPA.

    Self-attention when ``context_dim`` is None, else cross-attention to a ``context`` of that width
    (``context_norm``: LayerNorm the context first). ``fused_qkv`` computes q, k, v of
    self-attention in one GEMM (``to_qkv``) instead of ``to_q`` + ``to_kv``; ``bias`` adds biases to
    the projections; ``dropout`` drops attention weights while training; ``causal`` lets query i
    see keys <= i (aligned at the end when N != M). ``mask`` (B, M) bool: True = attend to this key.

    Memory: O(N x M) per head for N queries and M keys (the score matrix: 6,464^2 x 8 heads x 4 B =
    1.3 GB at the paper MaskGIT geometry); SDPA's flash / memory-efficient kernels compute it block by
    block without storing it. A query row whose keys are all masked out returns zeros (not SDPA's NaN).
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, *, causal: bool = False,
                 context_dim: int | None = None, context_norm: bool = True, fused_qkv: bool = False,
                 bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.causal, self.dropout = heads, causal, dropout
        self.cross = context_dim is not None
        if self.cross and fused_qkv:
            raise ValueError("fused_qkv is for self-attention: cross-attention takes q and k, v from different inputs")
        self.norm = nn.LayerNorm(dim)
        self.context_norm = nn.LayerNorm(context_dim) if self.cross and context_norm else None
        if fused_qkv:
            self.to_qkv = nn.Linear(dim, 3 * inner, bias=bias)  # one GEMM
        else:
            self.to_q = nn.Linear(dim, inner, bias=bias)
            self.to_kv = nn.Linear(context_dim if self.cross else dim, 2 * inner, bias=bias)
        self.to_out = nn.Linear(inner, dim, bias=bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, dim); context (B, M, context_dim) for cross-attention; mask (B, M) bool over keys -> (B, N, dim)."""
        if (context is None) == self.cross:
            raise ValueError("pass a context exactly when the block was built with context_dim")
        h = self.norm(x)
        if hasattr(self, "to_qkv"):
            qkv = rearrange(self.to_qkv(h), "b n (three h d) -> three b h n d", three=3, h=self.heads)
            if not (self.training and self.dropout > 0):
                # one contiguous copy (3 x N x inner): SDPA's CPU flash kernel runs ~10% faster than on strided
                # views. Skipped under attention dropout, which keeps the dropout stream (and so the trained
                # weights) of the text encoder as it was before the attention blocks were unified.
                qkv = qkv.contiguous()
            q, k, v = qkv.unbind(0)  # each (B, heads, N, dh)
        else:
            kv_in = h if context is None else (self.context_norm(context) if self.context_norm is not None else context)
            q = rearrange(self.to_q(h), "b n (h d) -> b h n d", h=self.heads)  # (B, heads, N, dh)
            k, v = rearrange(self.to_kv(kv_in), "b m (two h d) -> two b h m d", two=2, h=self.heads)  # (B, heads, M, dh)
        n, m = q.shape[-2], k.shape[-2]
        attn_mask = empty = None
        if mask is not None:
            attn_mask = rearrange(mask.bool(), "b m -> b 1 1 m")  # (B, 1, 1, M): broadcast, O(M)
        if self.causal:
            causal = torch.ones(n, m, dtype=torch.bool, device=x.device).tril(m - n)  # (N, M)
            attn_mask = (causal if attn_mask is None else attn_mask & causal).expand(q.shape[0], 1, n, m)
        if attn_mask is not None:
            empty = ~attn_mask.any(-1, keepdim=True)  # rows with no key to attend to
            attn_mask = attn_mask | empty  # let them attend to everything, then zero them below
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)  # (B, heads, N, dh)
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
