"""A 3D diffusion transformer (PixArt-alpha's block, DiT's patches) for the latent flow family.

The alternative to MAISI's U-Net that the latent flow model builds with ``backbone: dit``: the
latent (B, C, D, H, W) is cut into non-overlapping patches (a strided Conv3d, as DiT's patch
embedding), given a fixed 3D sin-cos position (diffusers' ``get_3d_sincos_pos_embed``: a quarter of
the channels for depth, the rest for the plane), and run through diffusers' ``BasicTransformerBlock``
with ``norm_type="ada_norm_single"``: PixArt-alpha's block (self-attention and a feed-forward
modulated by one shared timestep embedding, cross-attention to the report between them). The
timestep embedding is diffusers' ``AdaLayerNormSingle``; PixArt's final layer (a modulated layer
norm and a linear map back to the patch) is the only part written here, with the unpatching.

Why it exists: a U-Net step on a small latent costs mostly 3D convolutions at full latent resolution,
and the flow network needs many samples before it reads the report; a transformer over 2x2x2 patches
sees the demo's latent in 256 tokens for a fraction of the compute (2.7-7x the samples a second on one
thread), and every token attends to the report at every block. On the demo's 150 training reports that
makes it memorise the patients rather than learn the findings (the held-out text-reliance probe shows
it; docs/experiments.md, "Latent flow family"), so the U-Net stays the default there.

Two differences from PixArt, both for the report context of :class:`~ctgen.models.report_context.ReportContext`:
the cross-attention masks the all-zero padding rows of each segment slot (MONAI's U-Net cannot, so
they only dilute its softmax), and the mean of the real context rows can be added to the timestep
embedding (``pooled``), as the U-Net's ``pooled_text_embedding`` does.

Initialisation follows DiT/PixArt: Xavier-uniform linear layers, the cross-attention's output
projection and the final layer at zero (the untrained network predicts zero velocity and every
block starts near the identity).
"""

from __future__ import annotations

import math

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import Timesteps, get_3d_sincos_pos_embed
from diffusers.models.normalization import AdaLayerNormSingle
from einops import rearrange
from torch import nn


class LatentDiT(nn.Module):
    """Velocity (B, C, D, H, W) of a latent at timesteps t (B,), attending to a context (B, L, cross_dim)."""

    def __init__(self, in_channels: int, patch_size: tuple[int, int, int], width: int, depth: int, heads: int,
                 cross_attention_dim: int, mlp_ratio: float = 4.0, pooled: bool = False,
                 spacing_input: bool = False) -> None:
        super().__init__()  # width: a multiple of 16 (3D sin-cos positions) and of heads, checked by LatentFlowConfig
        self.in_channels, self.patch_size, self.width = in_channels, tuple(patch_size), width
        self.patch = nn.Conv3d(in_channels, width, kernel_size=self.patch_size, stride=self.patch_size)
        self.time = AdaLayerNormSingle(width)  # t -> (B, width) embedding and (B, 6 width) block modulation
        self.pooled = nn.Sequential(nn.Linear(cross_attention_dim, width), nn.SiLU(), nn.Linear(width, width)) \
            if pooled else None
        if spacing_input:  # each of the three spacings as a sinusoid (diffusers' Timesteps), then an MLP
            self.spacing_proj = Timesteps(64, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.spacing = nn.Sequential(nn.Linear(3 * 64, width), nn.SiLU(), nn.Linear(width, width))
        else:
            self.spacing = None
        self.blocks = nn.ModuleList(
            BasicTransformerBlock(width, heads, width // heads, cross_attention_dim=cross_attention_dim,
                                  activation_fn="gelu-approximate", norm_type="ada_norm_single",
                                  norm_elementwise_affine=False, norm_eps=1e-6, ff_inner_dim=int(width * mlp_ratio))
            for _ in range(depth))
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, width) / width**0.5)  # PixArt's final modulation
        self.proj_out = nn.Linear(width, math.prod(self.patch_size) * in_channels)
        self._init_weights()

    def no_weight_decay(self) -> list[str]:
        # learned shifts and scales, biases in all but shape (ctgen.training.optim); diffusers' blocks have their own
        return ["scale_shift_table", *(f"blocks.{i}.scale_shift_table" for i in range(len(self.blocks)))]

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for m in self.time.emb.timestep_embedder.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.attn2.to_out[0].weight)
            nn.init.zeros_(block.attn2.to_out[0].bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                spacing: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, C, D, H, W) with D, H, W multiples of the patch; ``t`` (B,) in [0, T]; ``context``
        (B, L, cross_dim) with zero rows at padding; ``spacing`` (B, 3) when built with ``spacing_input``."""
        b, _, d, h, w = x.shape
        pd, ph, pw = self.patch_size
        if d % pd or h % ph or w % pw:
            raise ValueError(f"latent {tuple(x.shape[2:])} is not a multiple of the dit patch {self.patch_size}")
        gd, gh, gw = d // pd, h // ph, w // pw
        tokens = rearrange(self.patch(x), "b c d h w -> b (d h w) c")
        pos = get_3d_sincos_pos_embed(self.width, (gw, gh), gd, device=x.device)  # (gd, gh gw, width)
        tokens = tokens + rearrange(pos, "d n c -> 1 (d n) c").to(tokens.dtype)
        # the timestep embedding, plus the report's and the spacing's, then PixArt's shared modulation
        emb = self.time.emb(t, resolution=None, aspect_ratio=None, batch_size=b, hidden_dtype=tokens.dtype)
        keep = context.abs().amax(dim=-1) > 0  # (B, L): False at the zero padding rows
        if self.pooled is not None:
            k = keep.unsqueeze(-1).to(context.dtype)
            emb = emb + self.pooled((context * k).sum(1) / k.sum(1).clamp(min=1.0))
        if self.spacing is not None:
            if spacing is None:
                raise ValueError("this network takes the voxel spacing as input: pass spacing (B, 3)")
            s = self.spacing_proj(spacing.reshape(-1).float()).reshape(b, -1).to(emb.dtype)  # (B, 3 x 64)
            emb = emb + self.spacing(s)
        modulation = self.time.linear(self.time.silu(emb))  # (B, 6 width)
        # diffusers' attention adds this bias to the cross-attention logits: 0 where kept, -10000 at padding
        bias = ((1.0 - keep.to(tokens.dtype)) * -10000.0).unsqueeze(1)  # (B, 1, L)
        for block in self.blocks:
            tokens = block(tokens, encoder_hidden_states=context.to(tokens.dtype), encoder_attention_mask=bias,
                           timestep=modulation)
        shift, scale = (self.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)  # (B, 1, width) each
        tokens = self.proj_out(self.norm_out(tokens) * (1 + scale) + shift)
        return rearrange(tokens, "b (d h w) (pd ph pw c) -> b c (d pd) (h ph) (w pw)",
                         d=gd, h=gh, w=gw, pd=pd, ph=ph, pw=pw)
