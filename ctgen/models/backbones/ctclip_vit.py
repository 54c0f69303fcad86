"""CT-CLIP's image encoder: the CT-ViT of ``transformer_maskgit`` as CT-CLIP v2 runs it, to the quantised tokens.

Source: the CT-CLIP code the VLM3D evaluation installs (forithmus/VLM3D-Dockers,
``CT-CLIP/transformer_maskgit/transformer_maskgit/ctvit.py`` and ``attention.py``; same as
ibrahimethemhamamci/CT-CLIP), with the configuration of ``ctgen_evaluation/evaluate_clip.py``:
``CTViT(dim=512, codebook_size=8192, image_size=480, patch_size=20, temporal_patch_size=10,
spatial_depth=4, temporal_depth=4, dim_head=32, heads=8)``, called with ``return_encoded_tokens=True``.

What that path computes, kept here because it decides the features (and the state-dict keys):

* ``to_patch_emb`` patchifies the whole (B, 1, 240, 480, 480) volume into 10 x 20 x 20 patches
  (the separate first-frame embedding exists in the checkpoint but is not used);
* a spatial transformer over each slab's 24 x 24 tokens with a continuous position bias, then a
  temporal one over each token's 24 slabs; every layer starts with a causal depthwise-conv position
  generator (PEG). The temporal PEG reshapes its ((b h w), t, d) input straight to (b, t, h, w, d), which
  mixes positions; that is what the trained weights saw, so it is kept;
* attention: keys and values come from the *un-normalised* input (only queries see the LayerNorm),
  q and k are L2-normalised and scaled per dimension, logits are multiplied by 8;
* the tokens are quantised (vector-quantize-pytorch 1.1.2, cosine codebook): each token is replaced
  by the stored codebook vector with the highest cosine similarity.

Nothing of the decoder path is needed; its keys (``to_pixels*``, the first-frame embedding) are ignored
when the checkpoint is loaded (:mod:`ctgen.models.backbones.ctclip`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import nn


@dataclasses.dataclass(frozen=True)
class CTViTConfig:
    """CT-CLIP v2's image encoder; the defaults are the VLM3D evaluation's ``CTViT(...)`` arguments."""

    dim: int = 512  # token width
    image_size: int = 480  # in-plane side the encoder takes
    patch_size: int = 20  # in-plane patch side
    temporal_patch_size: int = 10  # slices per patch
    spatial_depth: int = 4  # layers of the spatial transformer
    temporal_depth: int = 4  # layers of the temporal transformer
    dim_head: int = 32  # attention head width
    heads: int = 8  # attention heads
    codebook_size: int = 8192  # VQ codebook entries
    channels: int = 1  # image channels (CT: 1)
    vq_chunk: int = 4096  # tokens compared with the codebook at once (memory: vq_chunk x codebook_size floats)


class LayerNorm(nn.Module):
    """transformer_maskgit's LayerNorm: a learned gain, a zero bias kept as a buffer (both in the state dict)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


class GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.gelu(gate) * x


def feed_forward(dim: int, mult: float = 4.0) -> nn.Sequential:
    inner = int(mult * (2 / 3) * dim)  # 1365 at dim 512
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner * 2, bias=False), GEGLU(), nn.Dropout(0.0),
                         nn.Linear(inner, dim, bias=False))


class PEG(nn.Module):
    """Causal depthwise 3x3x3 conv position generator over (t, h, w); ``shape`` = (b, t, h, w)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dsconv = nn.Conv3d(dim, dim, 3, groups=dim)

    def forward(self, x: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
        orig = x.shape
        x = x.reshape(*shape, -1)  # a plain reshape, as the original (see the module doc for the temporal case)
        x = rearrange(x, "b t h w d -> b d t h w")
        x = F.pad(x, (1, 1, 1, 1, 2, 0))  # causal in t: two frames of zeros before, none after
        x = rearrange(self.dsconv(x), "b d t h w -> b t h w d")
        return x.reshape(orig)


class Attention(nn.Module):
    """transformer_maskgit's self-attention (no null key/values, not causal)."""

    def __init__(self, dim: int, dim_head: int, heads: int, scale: float = 8.0):
        super().__init__()
        self.heads, self.scale = heads, scale
        inner = dim_head * heads
        self.norm = LayerNorm(dim)
        self.context_norm = LayerNorm(dim)  # for cross-attention; in the checkpoint, unused here
        self.null_kv = nn.Parameter(torch.zeros(heads, 0, dim_head))  # num_null_kv = 0: an empty parameter
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.q_scale = nn.Parameter(torch.ones(dim_head))
        self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        k, v = self.to_kv(x).chunk(2, dim=-1)  # keys/values from the input before the norm, as the original
        q = self.to_q(self.norm(x))
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        q = F.normalize(q, dim=-1) * self.q_scale
        k = F.normalize(k, dim=-1) * self.k_scale
        sim = torch.einsum("bhid,bhjd->bhij", q, k) * self.scale  # (B, heads, n, n): O(n^2) memory
        if attn_bias is not None:
            sim = sim + attn_bias
        out = torch.einsum("bhij,bhjd->bhid", sim.softmax(dim=-1), v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class Transformer(nn.Module):
    """Layers of (PEG, self-attention, [no cross-attention], feed-forward), then a LayerNorm."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([PEG(dim), Attention(dim, dim_head, heads), None, feed_forward(dim)]) for _ in range(depth))
        self.norm_out = LayerNorm(dim)

    def forward(self, x: torch.Tensor, video_shape: tuple[int, int, int, int],
                attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        for peg, attn, _, ff in self.layers:
            x = peg(x, video_shape) + x
            x = attn(x, attn_bias) + x
            x = ff(x) + x
        return self.norm_out(x)


class ContinuousPositionBias(nn.Module):
    """Per-head bias from an MLP of the signed log distance between two (h, w) grid positions."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.net = nn.ModuleList([nn.Sequential(nn.Linear(2, dim), nn.LeakyReLU(0.1)),
                                  nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(0.1)), nn.Linear(dim, heads)])

    def forward(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        grid = torch.stack(torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                                          indexing="ij"))
        grid = rearrange(grid, "c h w -> (h w) c")
        rel = rearrange(grid, "i c -> i 1 c") - rearrange(grid, "j c -> 1 j c")  # (hw, hw, 2)
        rel = torch.sign(rel) * torch.log(rel.abs() + 1)
        x = rel.float()
        for layer in self.net:
            x = layer(x)
        return rearrange(x, "i j h -> h i j")  # (heads, hw, hw)


class CosineCodebook(nn.Module):
    """vector-quantize-pytorch 1.1.2's ``CosineSimCodebook`` buffers (one codebook)."""

    def __init__(self, dim: int, codebook_size: int):
        super().__init__()
        self.register_buffer("initted", torch.ones(1))
        self.register_buffer("cluster_size", torch.zeros(1, codebook_size))
        self.register_buffer("embed", F.normalize(torch.randn(1, codebook_size, dim), dim=-1))


class VectorQuantizer(nn.Module):
    """Nearest codebook vector by cosine similarity; returns the stored vector (as 1.1.2 does)."""

    def __init__(self, dim: int, codebook_size: int, chunk: int):
        super().__init__()
        self._codebook = CosineCodebook(dim, codebook_size)  # the attribute name is the checkpoint's key
        self.chunk = chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = rearrange(x, "b n d -> (b n) d").float()
        embed = self._codebook.embed[0].float()  # (C, d)
        normed = F.normalize(embed, dim=-1)
        idx = torch.cat([(F.normalize(part, dim=-1) @ normed.t()).argmax(dim=-1)  # (chunk, C) at a time
                         for part in flat.split(self.chunk)])
        return embed[idx].reshape(x.shape)


class CTViTEncoder(nn.Module):
    """(B, 1, T, H, W) in CT-CLIP units (HU / 1000) -> quantised tokens (B, T/10, H/20, W/20, dim)."""

    def __init__(self, config: CTViTConfig = CTViTConfig()):
        super().__init__()
        c = config
        self.config = c
        p, pt = c.patch_size, c.temporal_patch_size
        if c.image_size % p:
            raise ValueError(f"image_size {c.image_size} must be a multiple of patch_size {p}")
        self.spatial_rel_pos_bias = ContinuousPositionBias(c.dim, c.heads)
        patch = c.channels * p * p * pt
        self.to_patch_emb = nn.Sequential(
            Rearrange("b c (t pt) (h p1) (w p2) -> b t h w (c pt p1 p2)", p1=p, p2=p, pt=pt),
            nn.LayerNorm(patch), nn.Linear(patch, c.dim), nn.LayerNorm(c.dim))
        self.enc_spatial_transformer = Transformer(c.dim, c.spatial_depth, c.dim_head, c.heads)
        self.enc_temporal_transformer = Transformer(c.dim, c.temporal_depth, c.dim_head, c.heads)
        self.vq = VectorQuantizer(c.dim, c.codebook_size, c.vq_chunk)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        c = self.config
        if video.ndim != 5 or tuple(video.shape[-2:]) != (c.image_size, c.image_size) or \
                video.shape[2] % c.temporal_patch_size:
            raise ValueError(f"CT-ViT takes (B, {c.channels}, T (multiple of {c.temporal_patch_size}), "
                             f"{c.image_size}, {c.image_size}), got {tuple(video.shape)}")
        tokens = self.to_patch_emb(video.float())  # (B, t, h, w, d)
        b, t, h, w, _ = tokens.shape
        shape = (b, t, h, w)
        bias = self.spatial_rel_pos_bias(h, w, tokens.device)  # (heads, hw, hw)
        x = rearrange(tokens, "b t h w d -> (b t) (h w) d")
        x = self.enc_spatial_transformer(x, shape, bias)
        x = rearrange(x, "(b t) (h w) d -> (b h w) t d", b=b, h=h, w=w)
        x = self.enc_temporal_transformer(x, shape)
        x = rearrange(x, "(b h w) t d -> b (t h w) d", b=b, h=h, w=w)
        x = self.vq(x)
        return rearrange(x, "b (t h w) d -> b t h w d", t=t, h=h, w=w)
