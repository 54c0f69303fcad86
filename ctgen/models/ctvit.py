"""CT-ViT: the VQ tokenizer that turns a CT volume into a causal grid of discrete tokens.

GenerateCT's CT-ViT (after lucidrains' phenaki): the first slice is patched on its own and the
remaining slices in tubelets of ``temporal_patch_size`` (switchable: ``first_slice_separate``); a
spatial transformer mixes the (h, w) tokens of each time step, a causal transformer mixes the t
time steps of each spatial position, a cosine-similarity EMA codebook quantises, and a mirrored
decoder (causal temporal, then spatial, then a linear map back to pixels) reconstructs.

Layout: ``video (B, 1, D, H, W)`` in [-1, 1], D axial slices (inferior -> superior). Any D >= 1 is
accepted: the last slice is replicated up to a whole tubelet and the output is cropped back to D.
Tokens: ``(B, t, h, w)`` with t = 1 + ceil((D - 1) / pt) (first slice separate) or ceil(D / pt).

Training (one optimiser): ``loss`` = reconstruction + commitment (+ perceptual) + the generator's
adversarial term (discriminator parameters detached, adaptive weight as in VQGAN) + the hinge
discriminator loss on detached reconstructions. Before ``adversarial_start`` both adversarial
terms are computed but multiplied by 0, so DDP sees every parameter used.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.func import functional_call

from ctgen.models.attention import Transformer, sincos_1d, sincos_2d
from ctgen.models.base import ModelOutput, PretrainedMixin
from ctgen.models.discriminator import SliceDiscriminator, hinge_discriminator_loss, hinge_generator_loss
from ctgen.models.grids import slices_for, token_grid
from ctgen.models.perceptual import PerceptualLoss
from ctgen.models.vq import VectorQuantizer


@dataclasses.dataclass(frozen=True)
class CTViTConfig:
    """CT-ViT hyper-parameters; defaults are GenerateCT's (the presets live in config.yaml: ``model_presets``)."""

    image_size: int = 128  # in-plane size H = W trained at (any multiple of patch_size is accepted)
    num_slices: int = 201  # slice count D trained at (any D >= 1 is accepted)
    channels: int = 1  # image channels (CT: 1)
    patch_size: int = 16  # in-plane patch side, pixels
    temporal_patch_size: int = 2  # slices per tubelet along depth
    first_slice_separate: bool = True  # patch slice 0 alone, as in the paper (else tubelets from slice 0)
    dim: int = 512  # token width
    spatial_depth: int = 4  # spatial transformer blocks (encoder; the decoder mirrors)
    temporal_depth: int = 4  # causal temporal transformer blocks (encoder; the decoder mirrors)
    heads: int = 8  # attention heads
    dim_head: int = 64  # width per head
    ff_mult: float = 4.0  # feed-forward width multiple
    codebook_size: int = 8192  # number of codes
    codebook_dim: int | None = None  # code width (None = dim; smaller uses a projection, as ViT-VQGAN)
    commitment_weight: float = 0.25  # weight of the commitment loss (VQ-VAE's beta)
    ema_decay: float = 0.99  # EMA decay of codebook cluster sizes and sums
    dead_code_threshold: float = 0.05  # restart codes whose EMA cluster size falls below this share of tokens/step / codes
    recon_loss: str = "l2"  # reconstruction loss: "l2" (GenerateCT's MSE) or "l1"
    perceptual_weight: float = 0.0  # weight of the perceptual loss (0 = off; >0 needs a perceptual network)
    adversarial_start: int = 10_000  # global step from which the adversarial terms count
    disc_weight: float = 0.8  # scale of the generator's adversarial term (times the adaptive weight)
    disc_dim: int = 64  # discriminator base width
    disc_layers: int = 3  # discriminator stride-2 layers
    disc_slices: int = 4  # random axial slices per volume shown to the discriminator (and perceptual net)
    adaptive_weight_max: float = 1e4  # clamp of the VQGAN adaptive weight

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.recon_loss not in ("l1", "l2"):
            raise ValueError(f"recon_loss must be 'l1' or 'l2', got {self.recon_loss!r}")
        if self.dim % 4:
            raise ValueError(f"dim must be divisible by 4 (2D sin-cos positions), got {self.dim}")


@dataclasses.dataclass
class CTViTOutput(ModelOutput):
    """``loss`` plus its terms; raw adversarial terms are reported even while inactive (factor 0)."""

    recon_loss: torch.Tensor  # L1 or MSE between reconstruction and input
    commit_loss: torch.Tensor  # VQ commitment (unweighted)
    perceptual_loss: torch.Tensor  # perceptual distance on the sampled slices (0 when off)
    gen_adv_loss: torch.Tensor  # generator hinge term -D(recon) (unweighted)
    disc_loss: torch.Tensor  # discriminator hinge loss
    adaptive_weight: torch.Tensor  # VQGAN grad-norm ratio (0 while adversarial training is off)
    adversarial_active: float  # 1.0 once step >= adversarial_start, else 0.0
    perplexity: torch.Tensor  # exp(entropy) of the batch's code histogram
    codebook_usage: torch.Tensor  # fraction of codes used in the batch
    codes_restarted: torch.Tensor  # dead codes re-seeded from the batch in this step
    recon: torch.Tensor  # (B, C, D, H, W) reconstruction (not logged)
    indices: torch.Tensor  # (B, t, h, w) token indices (not logged)


class CTViT(nn.Module, PretrainedMixin):
    """``CTViT(config, perceptual=None)``: encode / decode / tokens_shape / forward(video, step)."""

    config_class = CTViTConfig

    def __init__(self, config: CTViTConfig, perceptual: PerceptualLoss | None = None) -> None:
        super().__init__()
        self.config = c = config
        if c.perceptual_weight > 0 and perceptual is None:
            raise ValueError("perceptual_weight > 0 needs a network: "
                             "CTViT(config, perceptual=PerceptualLoss.from_path(...))")
        # frozen, passed in: deliberately not a submodule (not in state_dict; .to() does not move it)
        self.__dict__["perceptual"] = perceptual
        p, pt, ch = c.patch_size, c.temporal_patch_size, c.channels
        self.first_to_tokens = _embed(ch * p * p, c.dim)
        self.tubelet_to_tokens = _embed(ch * pt * p * p, c.dim)
        block = dict(dim=c.dim, heads=c.heads, dim_head=c.dim_head, ff_mult=c.ff_mult)
        self.enc_spatial = Transformer(depth=c.spatial_depth, **block)
        self.enc_temporal = Transformer(depth=c.temporal_depth, causal=True, **block)
        self.vq = VectorQuantizer(c.dim, c.codebook_size, c.codebook_dim, decay=c.ema_decay,
                                  dead_code_threshold=c.dead_code_threshold)
        self.dec_temporal = Transformer(depth=c.temporal_depth, causal=True, **block)
        self.dec_spatial = Transformer(depth=c.spatial_depth, **block)
        self.tokens_to_first = nn.Linear(c.dim, ch * p * p)
        self.tokens_to_tubelet = nn.Linear(c.dim, ch * pt * p * p)
        self.discriminator = SliceDiscriminator(ch, c.disc_dim, c.disc_layers)

    # -- geometry ----------------------------------------------------------------------------------

    def tokens_shape(self, num_slices: int, height: int, width: int) -> tuple[int, int, int]:
        """Token grid (t, h, w) for a volume of ``num_slices`` x ``height`` x ``width``."""
        c = self.config
        return token_grid(num_slices, height, width, c.patch_size, c.temporal_patch_size, c.first_slice_separate)

    def _slices_for(self, t: int) -> int:
        """Slices a grid of t time steps decodes to (before cropping)."""
        return slices_for(t, self.config.temporal_patch_size, self.config.first_slice_separate)

    # -- encoder -----------------------------------------------------------------------------------

    def _encode_continuous(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, C, D, H, W) -> pre-quantisation tokens (B, t, h, w, dim)."""
        c = self.config
        if video.ndim != 5 or video.shape[1] != c.channels:
            raise ValueError(f"expected video (B, {c.channels}, D, H, W), got {tuple(video.shape)}")
        b, _, d, hh, ww = video.shape
        t, h, w = self.tokens_shape(d, hh, ww)
        p, pt = c.patch_size, c.temporal_patch_size
        video = _pad_slices(video, self._slices_for(t))  # replicate the last slice up to whole tubelets
        parts = []
        if c.first_slice_separate:
            first = rearrange(video[:, :, :1], "b c 1 (h p1) (w p2) -> b 1 h w (c p1 p2)", p1=p, p2=p)
            parts.append(self.first_to_tokens(first))  # (B, 1, h, w, dim)
            video = video[:, :, 1:]
        if video.shape[2] > 0:
            tubes = rearrange(video, "b c (t pt) (h p1) (w p2) -> b t h w (c pt p1 p2)", pt=pt, p1=p, p2=p)
            parts.append(self.tubelet_to_tokens(tubes))  # (B, t', h, w, dim)
        x = torch.cat(parts, dim=1)  # (B, t, h, w, dim)
        x = x + sincos_2d(h, w, c.dim, x.device, x.dtype)
        x = rearrange(x, "b t h w d -> (b t) (h w) d")
        x = self.enc_spatial(x)  # attention over h*w tokens of one time step: O((hw)^2)
        x = rearrange(x, "(b t) (h w) d -> (b h w) t d", b=b, h=h)
        x = x + sincos_1d(t, c.dim, x.device, x.dtype)
        x = self.enc_temporal(x)  # causal attention over t: O(t^2)
        return rearrange(x, "(b h w) t d -> b t h w d", b=b, h=h)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, C, D, H, W) in [-1, 1] -> token indices (B, t, h, w) long. Never updates the codebook."""
        return self.vq.quantize_indices(self._encode_continuous(video))

    # -- decoder -----------------------------------------------------------------------------------

    def _decode_tokens(self, x: torch.Tensor, num_slices: int | None) -> torch.Tensor:
        """Quantised tokens (B, t, h, w, dim) -> video (B, C, num_slices, H, W)."""
        c = self.config
        b, t, h, w, _ = x.shape
        p, pt = c.patch_size, c.temporal_patch_size
        full = self._slices_for(t)
        num_slices = full if num_slices is None else num_slices
        if not 1 <= num_slices <= full:
            raise ValueError(f"{t} time steps decode to 1..{full} slices; {num_slices} asked")
        x = rearrange(x, "b t h w d -> (b h w) t d")
        x = x + sincos_1d(t, c.dim, x.device, x.dtype)
        x = self.dec_temporal(x)  # causal, O(t^2)
        x = rearrange(x, "(b h w) t d -> (b t) (h w) d", b=b, h=h)
        x = x + rearrange(sincos_2d(h, w, c.dim, x.device, x.dtype), "h w d -> (h w) d")
        x = self.dec_spatial(x)  # O((hw)^2)
        x = rearrange(x, "(b t) (h w) d -> b t h w d", b=b, h=h)
        parts = []
        if c.first_slice_separate:
            first = self.tokens_to_first(x[:, :1])  # (B, 1, h, w, C p p)
            parts.append(rearrange(first, "b 1 h w (c p1 p2) -> b c 1 (h p1) (w p2)", p1=p, p2=p))
            x = x[:, 1:]
        if x.shape[1] > 0:
            tubes = self.tokens_to_tubelet(x)  # (B, t', h, w, C pt p p)
            parts.append(rearrange(tubes, "b t h w (c pt p1 p2) -> b c (t pt) (h p1) (w p2)", pt=pt, p1=p, p2=p))
        return torch.cat(parts, dim=2)[:, :, :num_slices]  # (B, C, D, H, W)

    def decode(self, indices: torch.Tensor, num_slices: int | None = None) -> torch.Tensor:
        """Token indices (B, t, h, w) -> video (B, C, num_slices, H, W); None = every slice the grid holds."""
        if indices.ndim != 4:
            raise ValueError(f"expected indices (B, t, h, w), got {tuple(indices.shape)}")
        return self._decode_tokens(self.vq.codes_to_vectors(indices), num_slices)

    def _last_layer(self, t: int) -> torch.Tensor:
        """The decoder's output weight that the adaptive GAN weight is measured at."""
        only_first = self.config.first_slice_separate and t == 1
        return (self.tokens_to_first if only_first else self.tokens_to_tubelet).weight

    # -- training ----------------------------------------------------------------------------------

    def forward(self, video: torch.Tensor, step: int = 0) -> CTViTOutput:
        c = self.config
        z = self._encode_continuous(video)  # (B, t, h, w, dim)
        q = self.vq(z)  # updates the codebook in training mode
        recon = self._decode_tokens(q.quantized, video.shape[2])  # (B, C, D, H, W)
        rec = F.l1_loss if c.recon_loss == "l1" else F.mse_loss
        recon_loss = rec(recon.float(), video.float())

        real, fake = _sample_slices(video, recon, c.disc_slices)  # (B k, C, H, W) each
        zero = recon_loss.new_zeros(())
        perceptual_loss = self.perceptual.loss(fake, real) if c.perceptual_weight > 0 else zero
        nll = recon_loss + c.perceptual_weight * perceptual_loss

        # generator side: through the discriminator with detached parameters, so it trains only the tokenizer
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        frozen.update(dict(self.discriminator.named_buffers()))
        gen_adv_loss = hinge_generator_loss(functional_call(self.discriminator, frozen, (fake,)).float())
        # discriminator side: on detached reconstructions, so it trains only the discriminator
        disc_loss = hinge_discriminator_loss(self.discriminator(real).float(),
                                             self.discriminator(fake.detach()).float())

        active = step >= c.adversarial_start
        adaptive = self._adaptive_weight(nll, gen_adv_loss, self._last_layer(z.shape[1])) if active else zero
        factor = 1.0 if active else 0.0  # still multiplied in while off, so DDP sees every parameter used
        loss = (nll + c.commitment_weight * q.commit_loss
                + factor * (c.disc_weight * adaptive * gen_adv_loss + disc_loss))
        return CTViTOutput(loss=loss, recon_loss=recon_loss, commit_loss=q.commit_loss, perceptual_loss=perceptual_loss,
                           gen_adv_loss=gen_adv_loss, disc_loss=disc_loss, adaptive_weight=adaptive,
                           adversarial_active=factor, perplexity=q.perplexity, codebook_usage=q.usage,
                           codes_restarted=q.restarted,
                           recon=recon, indices=q.indices)

    def _adaptive_weight(self, nll: torch.Tensor, gen_adv: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """VQGAN's ||grad nll|| / ||grad adv|| at the decoder's last layer, clamped and detached."""
        if not (torch.is_grad_enabled() and nll.requires_grad and gen_adv.requires_grad):
            return nll.new_zeros(())  # evaluation: no graph to differentiate
        g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_adv = torch.autograd.grad(gen_adv, last, retain_graph=True)[0]
        weight = g_nll.float().norm() / (g_adv.float().norm() + 1e-4)
        return weight.clamp(0.0, self.config.adaptive_weight_max).detach()


def _embed(patch_dim: int, dim: int) -> nn.Sequential:
    """Flattened patch -> token, with LayerNorms on both sides (as phenaki)."""
    return nn.Sequential(nn.LayerNorm(patch_dim), nn.Linear(patch_dim, dim), nn.LayerNorm(dim))


def _pad_slices(video: torch.Tensor, slices: int) -> torch.Tensor:
    """Replicate the last slice until the volume has ``slices`` slices: (B, C, slices, H, W)."""
    missing = slices - video.shape[2]
    if missing <= 0:
        return video
    return torch.cat([video, video[:, :, -1:].expand(-1, -1, missing, -1, -1)], dim=2)


def _sample_slices(real: torch.Tensor, fake: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same k random axial slices of each volume from both: (B k, C, H, W) each (global torch RNG)."""
    b, _, d, _, _ = real.shape
    idx = torch.randint(0, d, (b, k), device=real.device)  # (B, k)
    batch = torch.arange(b, device=real.device)[:, None].expand(b, k)  # (B, k)
    pick = lambda v: rearrange(v.transpose(1, 2)[batch, idx], "b k c h w -> (b k) c h w")  # noqa: E731
    return pick(real), pick(fake)
