"""Text-conditional 2D super-resolution diffusion (GenerateCT's third stage), slice by slice.

The low-res slice is upsampled (bicubic) to the output size, noise-augmented (Imagen's noise
conditioning augmentation: the level is drawn per sample in training, fixed when sampling, and
given to the UNet as a second timestep), and concatenated with the noisy high-res slice. The UNet
predicts v on the cosine schedule (``ctgen/schedulers/diffusion.py``) and attends to the text.

The UNet is diffusers' ``UNet2DConditionModel``, wrapped: it already has what is needed (masked
cross-attention with a text projection, ``class_embed_type="timestep"`` for the augmentation
level as in DeepFloyd IF's upscalers, scale-shift norm), is tested upstream, and runs under bf16
autocast and SDPA. The wrapper builds it from our frozen config, so ``save_pretrained`` writes our
config JSON + safetensors (keys ``unet.*``), never diffusers' own format. The price: the weight
names follow diffusers' module names, so a diffusers upgrade that renames them needs a key map.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from einops import rearrange, repeat
from torch import nn

from ctgen.models.base import ModelOutput, PretrainedMixin
from ctgen.schedulers.diffusion import SOLVERS, VDiffusionScheduler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SuperResConfig:
    """Architecture, schedule and sampling of the super-resolution stage."""

    in_size: int = 128  # low-res slice side (the tokenizer's output in-plane size)
    out_size: int = 512  # high-res slice side (the released volume's in-plane size)
    patch_size: int = 1  # space-to-depth factor before the UNet (2: the UNet runs at half res on 4x channels, ~4x cheaper)
    channels: int = 128  # UNet channels at its first level
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # channels per level (x channels); one 2x downsample between levels
    layers_per_block: int = 2  # ResNet blocks per level (down path; up path has one more, as in diffusers)
    attention_levels: tuple[int, ...] = (3, 4)  # levels (0 = full res) with self+cross attention; 512 / 2^3 = 64 px
    attention_head_dim: int = 64  # channels per attention head
    norm_groups: int = 32  # GroupNorm groups; must divide every level's channels
    text_dim: int = 768  # width of the text encoder's token features (CXR-BERT / BiomedVLP: 768)
    cross_attention_dim: int = 512  # width the text is projected to for cross-attention
    num_train_timesteps: int = 1000  # discrete diffusion steps of the cosine schedule
    noise_aug_max: float = 0.25  # training: augmentation level ~ U[0, this] x T per sample (0, with noise_aug_sample 0: none)
    noise_aug_sample: float = 0.1  # sampling: the fixed augmentation level (fraction of T; <= noise_aug_max)
    residual: bool = False  # diffuse (hr - bicubic(lr)) / residual_scale (SRDiff) instead of hr itself
    residual_scale: float = 0.25  # residual mode: the residual's divisor, ~2x its std, so the diffused data is ~unit scale
    cond_drop_prob: float = 0.1  # training: probability of replacing the text by a learned null token (for CFG)
    sample_steps: int = 25  # sampler steps (model calls per slice, x2 with guidance)
    sampler: str = "dpmsolver"  # "ddim" (eta 0) or "dpmsolver" (DPM-Solver++ 2M)

    def __post_init__(self) -> None:
        if self.out_size % self.in_size:
            raise ValueError(f"out_size {self.out_size} must be a multiple of in_size {self.in_size}")
        if self.out_size % (self.patch_size * 2 ** (len(self.channel_mult) - 1)):
            raise ValueError(f"out_size {self.out_size} not divisible by the UNet's {len(self.channel_mult) - 1} downsamples")
        if self.sampler not in SOLVERS:
            raise ValueError(f"sampler must be one of {SOLVERS}, got {self.sampler!r}")
        if not 0.0 <= self.noise_aug_sample <= self.noise_aug_max < 1.0:
            raise ValueError(f"noise augmentation: noise_aug_sample {self.noise_aug_sample} must lie in [0, "
                             f"noise_aug_max {self.noise_aug_max}] (a level the training saw), below 1; set both to 0 "
                             "for none")
        for m in self.channel_mult:
            if (self.channels * m) % self.norm_groups or (self.channels * m) % self.attention_head_dim:
                raise ValueError(f"channels {self.channels * m} must be divisible by norm_groups and attention_head_dim")


@dataclass
class SuperResOutput(ModelOutput):
    """Training terms: ``loss`` (MSE on v) plus what the logs track."""

    x0_mse: torch.Tensor  # MSE of the implied x0 (alpha x_t - sigma v_pred) vs hr: interpretable in [-1,1] units
    aug_level: torch.Tensor  # mean augmentation timestep / T of the batch
    text_dropped: torch.Tensor  # fraction of samples whose text was replaced by the null token


class SuperResDiffusion(nn.Module, PretrainedMixin):
    """Low-res slice + text -> high-res slice, by v-prediction diffusion with a 2D UNet."""

    config_class = SuperResConfig

    def __init__(self, config: SuperResConfig) -> None:
        super().__init__()
        self.config = config
        chans = tuple(config.channels * m for m in config.channel_mult)
        attn = [i in config.attention_levels for i in range(len(chans))]
        self.unet = UNet2DConditionModel(
            sample_size=config.out_size,
            in_channels=2 * config.patch_size**2,  # noisy hr + augmented upsampled lr, per pixel of a patch
            out_channels=config.patch_size**2,  # v, per pixel of a patch
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            mid_block_type="UNetMidBlock2DCrossAttn",
            block_out_channels=chans,
            layers_per_block=config.layers_per_block,
            # diffusers reads this argument as the number of heads per level (a known misnomer)
            attention_head_dim=tuple(c // config.attention_head_dim for c in chans),
            norm_num_groups=config.norm_groups,
            cross_attention_dim=config.cross_attention_dim,
            encoder_hid_dim=config.text_dim,  # learned Linear(text_dim -> cross_attention_dim)
            encoder_hid_dim_type="text_proj",
            class_embed_type="timestep",  # the augmentation level, embedded like a timestep
            resnet_time_scale_shift="scale_shift",
        )
        # stands in for the text when it is dropped (CFG training) and for the unconditional pass
        self.null_text = nn.Parameter(torch.zeros(1, 1, config.text_dim))  # (1, 1, C)
        self.scheduler = VDiffusionScheduler(config.num_train_timesteps, config.sampler)

    # --- conditioning ---------------------------------------------------------------------------
    def no_weight_decay(self) -> list[str]:
        return ["null_text"]  # the learned null condition of classifier-free guidance (ctgen.training.optim)

    def upsample(self, lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Bicubic upsampling of the low-res slice (B, 1, h, w) -> (B, 1, H, W), clamped to [-1, 1]."""
        return F.interpolate(lr.float(), size=size, mode="bicubic", align_corners=False).clamp(-1.0, 1.0)

    def augment(self, lr_up: torch.Tensor, aug_t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise the upsampled slice to level ``aug_t`` (B,) of the schedule (level 0 is ~clean)."""
        noise = torch.randn(lr_up.shape, generator=generator, device=lr_up.device, dtype=lr_up.dtype)
        return self.scheduler.add_noise(lr_up, noise, aug_t)

    def to_target(self, hr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        """The diffused variable: ``hr`` itself, or ``(hr - bicubic(lr)) / residual_scale`` in residual mode."""
        if not self.config.residual:
            return hr
        return (hr - self.upsample(lr, hr.shape[-2:])) / self.config.residual_scale

    def from_target(self, x0: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_target`: a high-res slice (B, 1, H, W) from the diffused variable."""
        if not self.config.residual:
            return x0
        return self.upsample(lr, x0.shape[-2:]) + self.config.residual_scale * x0

    def _null_text(self, b: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        text = repeat(self.null_text, "1 1 c -> b l c", b=b, l=length)  # (B, L, C)
        mask = torch.zeros(b, length, dtype=torch.bool, device=text.device)
        mask[:, 0] = True  # attend to the one null token
        return text, mask

    def unet_v(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, aug_t: torch.Tensor,
               text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """v prediction (B, 1, H, W) for noisy ``x_t`` at ``t`` (B,), given the augmented low-res ``cond``."""
        p = self.config.patch_size
        x = torch.cat([x_t, cond.to(x_t.dtype)], dim=1)  # (B, 2, H, W)
        x = rearrange(x, "b c (h p1) (w p2) -> b (c p1 p2) h w", p1=p, p2=p)  # (B, 2 p^2, H/p, W/p)
        # attention cost: self-attention at an attention level of side S holds B*heads*S^4 scores
        # (S = 64 at 512 px: 16.8M per head and slice; SDPA/flash avoids materialising them on GPU)
        v = self.unet(x, t, encoder_hidden_states=text.to(x.dtype), class_labels=aug_t,
                      encoder_attention_mask=text_mask, return_dict=False)[0]  # (B, p^2, H/p, W/p)
        return rearrange(v, "b (c p1 p2) h w -> b c (h p1) (w p2)", p1=p, p2=p)  # (B, 1, H, W)

    # --- training -------------------------------------------------------------------------------
    def forward(self, hr: torch.Tensor, lr: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                step: int = 0) -> SuperResOutput:
        """MSE between predicted and true v at ``t ~ U{0..T-1}``, with noise-augmented ``lr``; ``step`` is unused."""
        cfg, sched = self.config, self.scheduler
        b, dev = hr.shape[0], hr.device
        hr = hr.float()  # (B, 1, H, W)
        T = cfg.num_train_timesteps
        t = torch.randint(0, T, (b,), device=dev)  # (B,)
        aug_t = (torch.rand(b, device=dev) * cfg.noise_aug_max * T).long()  # (B,) in [0, max*T)
        cond = self.augment(self.upsample(lr, hr.shape[-2:]), aug_t)
        text_mask = text_mask.bool()
        drop = torch.rand(b, device=dev) < cfg.cond_drop_prob  # (B,)
        # always through the where, also when no sample drops: the null text is then in the graph with a zero
        # gradient, which DDP (find_unused_parameters=False) needs on every rank and step
        null, null_mask = self._null_text(b, text.shape[1])
        text = torch.where(rearrange(drop, "b -> b 1 1"), null, text.to(null.dtype))
        text_mask = torch.where(rearrange(drop, "b -> b 1"), null_mask, text_mask)
        x0 = self.to_target(hr, lr)  # (B, 1, H, W) what is diffused: hr, or the scaled residual
        noise = torch.randn_like(x0)
        x_t = sched.add_noise(x0, noise, t)
        v = self.unet_v(x_t, t, cond, aug_t, text, text_mask).float()
        loss = F.mse_loss(v, sched.v_target(x0, noise, t))
        with torch.no_grad():
            x0_mse = F.mse_loss(self.from_target(sched.x0_from_v(x_t, v, t), lr), hr)
        return SuperResOutput(loss=loss, x0_mse=x0_mse, aug_level=aug_t.float().mean() / T,
                              text_dropped=drop.float().mean())

    # --- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, lr: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
               out_size: int | tuple[int, int] | None = None, steps: int | None = None,
               generator: torch.Generator | None = None, guidance_scale: float = 1.0,
               batch_size: int | None = None) -> torch.Tensor:
        """High-res slices (B, 1, H, W) in [-1, 1] from low-res ``lr`` (B, 1, h, w) and their text.

        Deterministic sampler (config ``sampler``) with ``steps`` model calls per slice; the start
        noise and the augmentation noise come from ``generator`` (on the model's device), drawn
        slice by slice in order, so the result does not depend on ``batch_size`` (slices per chunk) beyond float rounding.
        ``guidance_scale`` > 1 adds classifier-free guidance (a second, text-free pass).
        """
        cfg = self.config
        size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size or (cfg.out_size, cfg.out_size))
        steps = steps or cfg.sample_steps
        dev = next(self.parameters()).device
        lr, text, text_mask = lr.to(dev), text.to(dev), text_mask.to(dev).bool()
        n = lr.shape[0]
        # all randomness first, per slice in order: independent of batch_size
        x_T = torch.randn((n, 1, *size), generator=generator, device=dev)  # (B, 1, H, W)
        aug_noise = torch.randn((n, 1, *size), generator=generator, device=dev)  # (B, 1, H, W)
        aug_t = torch.full((n,), round(cfg.noise_aug_sample * cfg.num_train_timesteps), dtype=torch.long, device=dev)
        cond = self.scheduler.add_noise(self.upsample(lr, size), aug_noise, aug_t)
        out = []
        chunk = batch_size or n
        for i in range(0, n, chunk):
            sl = slice(i, i + chunk)
            model = self._guided(cond[sl], aug_t[sl], text[sl], text_mask[sl], guidance_scale)
            out.append(self.from_target(self.scheduler.sample(model, x_T[sl], steps), lr[sl]))
        logger.debug("sampled %d slices at %s with %d %s steps", n, size, steps, cfg.sampler)
        return torch.cat(out).clamp(-1.0, 1.0)

    def _guided(self, cond, aug_t, text, text_mask, scale: float):
        """The v-model the sampler calls: conditional, or CFG ``v_u + s (v_c - v_u)`` in one doubled batch."""
        if scale == 1.0:
            return lambda x, t: self.unet_v(x, t, cond, aug_t, text, text_mask)
        null, null_mask = self._null_text(text.shape[0], text.shape[1])

        def model(x, t):
            v = self.unet_v(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, cond]), torch.cat([aug_t, aug_t]),
                            torch.cat([text.to(null.dtype), null]), torch.cat([text_mask, null_mask]))
            v_c, v_u = v.float().chunk(2)
            return v_u + scale * (v_c - v_u)

        return model

