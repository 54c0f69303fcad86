"""Report2CT-style latent rectified flow: MONAI's MAISI diffusion U-Net with report cross-attention.

The network is MONAI's ``DiffusionModelUNetMaisi`` (3D, latent channels in and out, attention
with cross-attention to the report at the deepest levels, optional spacing input), built from
:class:`LatentFlowConfig`. It predicts the rectified-flow velocity; the report context comes from
:class:`~ctgen.models.report_context.ReportContext` (findings and impression as two token
sequences with segment embeddings, learned null segments, condition dropout).

With ``backbone: dit`` the velocity network is instead :class:`~ctgen.models.latent_dit.LatentDiT`
(PixArt-alpha's transformer blocks over 3D patches of the latent, the same report context, the same
training and sampling). It is an option, not the demo's network: on the demo's 150 training reports it
memorises the patients instead of learning the findings (docs/experiments.md, "Latent flow family").

Training (one step, ``forward``). The batch carries the cached posterior ``latent_mu`` and
``latent_sigma`` (B, C, D, H, W) (the cache stores both, never a sample) and the report text. The
draws, in this order from torch's global RNG (the loop seeds it; the tests replay it):

1. condition dropout per sample ``rand(B) < cond_drop_prob`` and per segment ``rand(B, S) < segment_drop_prob``;
2. ``eps`` for ``z = (mu + sigma eps) scale_factor`` (a fresh sample every step);
3. the noise ``n``;
4. timesteps from MONAI's ``RFlowScheduler.sample_timesteps`` (uniform or logit-normal, then its
   resolution-dependent shift towards noise when ``use_timestep_transform``);
5. where ``token_drop_prob`` > 0, word dropout: ``rand`` of each report mask (B, L) >= p keeps a token.

MONAI's convention (``monai/networks/schedulers/rectified_flow.py``): ``t`` in [0, T] with T =
``num_train_timesteps``, ``add_noise`` gives ``x_t = (1 - t/T) z + (t/T) n`` (t = T is pure noise),
and the network predicts the velocity ``v = z - n``: its ``step`` moves
``x <- x + v (t - t_next) / T`` towards data, and its docstring trains on ``inputs - noise``.
The loss is MSE (or L1, as MAISI's training script) between predicted and true ``v``.

Sampling is the pipeline's (``ctgen/pipelines/latent_flow.py``): it owns the Euler loop and calls
:meth:`guided_velocity` (classifier-free guidance batched with the conditional pass).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import types

import torch
import torch.nn.functional as F
from einops import rearrange
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi
from monai.networks.blocks.crossattention import CrossAttentionBlock
from monai.networks.blocks.selfattention import SABlock
from monai.networks.schedulers import RFlowScheduler
from torch import nn
from torch.utils.checkpoint import checkpoint

from ctgen.models.base import ModelOutput, PretrainedMixin
from ctgen.models.latent_dit import LatentDiT
from ctgen.models.report_context import POOLINGS, ReportContext

log = logging.getLogger(__name__)

# U-Net and scheduler defaults: NVIDIA's MAISI rflow release (MONAI model zoo,
# models/maisi_ct_generative/configs/inference.json: "diffusion_unet_def", "noise_scheduler"),
# which are also Report2CT's U-Net sizes (64/128/256/512, attention at the two deepest levels).


@dataclasses.dataclass(frozen=True)
class LatentFlowConfig:
    """Latent flow network, report conditioning, rectified-flow training and sampling defaults."""

    latent_channels: int = 4  # channels of the autoencoder's latent (MAISI: 4)
    latent_shape: tuple[int, int, int] = (64, 120, 120)  # (D, H, W) latent sampled by default: 480x480x256 / 4
    channels: tuple[int, ...] = (64, 128, 256, 512)  # U-Net channels per level (MAISI rflow, Report2CT)
    attention_levels: tuple[bool, ...] = (False, False, True, True)  # self + cross-attention at the two deepest levels
    num_head_channels: tuple[int, ...] = (0, 0, 32, 32)  # channels per attention head per level (MAISI; 0 = no attention)
    num_res_blocks: int = 2  # residual blocks per level (MAISI)
    norm_num_groups: int = 32  # GroupNorm groups (MONAI's default, MAISI's)
    resblock_updown: bool = True  # residual blocks for up/downsampling (MAISI)
    include_fc: bool = True  # output projection in the attention blocks (MAISI)
    transformer_num_layers: int = 1  # transformer layers per attention block (MONAI's default, MAISI's)
    cross_attention_dim: int = 512  # width of the report context the U-Net attends to
    use_flash_attention: bool = True  # SDPA attention (memory linear in tokens; flash on GPU, fused on CPU);
    #                                   False: MONAI's einsum path, which holds (heads, N, N) scores
    gradient_checkpointing: bool = False  # recompute each res/attention block in backward (~1.5x time, far less memory)
    include_spacing_input: bool = False  # MAISI's spacing embedding; True where the prep preset keeps variable spacing
    pooled_text_embedding: bool = False  # also add an MLP of the mean context row to the timestep embedding
    #                                      (every residual block then sees the report, as Imagen/SDXL add pooled text)
    spacing_scale: float = 100.0  # the network sees spacing in mm x this (MAISI feeds spacing x 1e2)
    # --- the alternative network: a 3D diffusion transformer (ctgen/models/latent_dit.py) ---
    backbone: str = "unet"  # "unet": MAISI's U-Net (the fields above); "dit": LatentDiT (the dit_* fields)
    dit_patch_size: tuple[int, int, int] = (2, 2, 2)  # (D, H, W) latent voxels per token
    dit_width: int = 128  # token width (a multiple of 16 and of dit_heads)
    dit_depth: int = 4  # PixArt-alpha blocks (self-attention, report cross-attention, feed-forward)
    dit_heads: int = 4  # attention heads
    dit_mlp_ratio: float = 4.0  # feed-forward width / token width
    # --- report conditioning ---
    segments: tuple[str, ...] = ("findings", "impression")  # one token sequence each; ("structured",) for that prompt
    text_dims: tuple[int, ...] = (768,)  # widths of the frozen encoders' states, one per encoder (CXR-BERT: 768)
    text_pooling: str = "tokens"  # "tokens" (sequences) or "mean" (Report2CT: pooled, encoders concatenated)
    max_text_tokens: int = 128  # context rows per segment ("tokens"); set in a preset, also the tokens its encoders read
    null_tokens: int = 1  # learned tokens standing for an empty or dropped segment
    text_encoder: dict | None = None  # SmallTextEncoderConfig fields: trained jointly; None: frozen states in the batch
    cond_drop_prob: float = 0.15  # whole report replaced by the null segments (Report2CT: 0.15), trains guidance
    segment_drop_prob: float = 0.0  # each segment alone replaced by its null (0: only empty sections are)
    token_drop_prob: float = 0.0  # training only: each report token masked out with this probability (word dropout)
    # --- rectified flow (MONAI's RFlowScheduler) ---
    num_train_timesteps: int = 1000  # T (MAISI)
    use_discrete_timesteps: bool = False  # continuous t (MAISI rflow)
    sample_method: str = "logit-normal"  # training t ~ "uniform" or "logit-normal" (MAISI rflow release: logit-normal)
    logit_normal_loc: float = 0.0  # logit-normal location (MONAI's default)
    logit_normal_scale: float = 1.2  # logit-normal scale (MAISI rflow release: 1.2)
    use_timestep_transform: bool = True  # MONAI's resolution shift of t towards noise for larger latents (MAISI)
    base_img_size_numel: int = 32**3  # latent voxels at which the shift is 1 (MONAI's default)
    loss: str = "mse"  # "mse" on the velocity (rectified flow) or "l1" (MAISI's training script)
    scale_factor: float = 1.0  # latents are multiplied by this: 1/std of the training latents (the latent cache's stats)
    sample_steps: int = 30  # Euler steps when sampling (Report2CT/MAISI: 30)

    def __post_init__(self) -> None:
        n = len(self.channels)
        unet = self.backbone == "unet"
        checks = {
            "backbone 'unet' or 'dit'": self.backbone in ("unet", "dit"),
            "one attention level and head width per channel level":
                len(self.attention_levels) == n == len(self.num_head_channels),
            "channels divisible by norm_num_groups": all(c % self.norm_num_groups == 0 for c in self.channels),
            "attention levels with num_head_channels dividing their channels":
                all(h > 0 and c % h == 0 for c, h, a in zip(self.channels, self.num_head_channels,
                                                             self.attention_levels) if a),
            "an attention level for the report cross-attention": any(self.attention_levels) or not unet,
            f"text_pooling in {POOLINGS}": self.text_pooling in POOLINGS,
            "sample_method 'uniform' or 'logit-normal'": self.sample_method in ("uniform", "logit-normal"),
            "loss 'mse' or 'l1'": self.loss in ("mse", "l1"),
            "0 <= cond_drop_prob, segment_drop_prob, token_drop_prob < 1":
                all(0 <= p < 1 for p in (self.cond_drop_prob, self.segment_drop_prob, self.token_drop_prob)),
            "a positive finite scale_factor": math.isfinite(self.scale_factor) and self.scale_factor > 0,
            f"latent_shape divisible by {2 ** (n - 1)}":
                not unet or all(s % 2 ** (n - 1) == 0 for s in self.latent_shape),
            f"latent_shape divisible by dit_patch_size {tuple(self.dit_patch_size)}":
                unet or all(s % p == 0 for s, p in zip(self.latent_shape, self.dit_patch_size)),
            "dit_width divisible by 16 and by dit_heads": unet or (self.dit_width % 16 == 0
                                                                   and self.dit_width % self.dit_heads == 0),
            "sample_steps in 1..num_train_timesteps": 1 <= self.sample_steps <= self.num_train_timesteps,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"LatentFlowConfig: need {'; '.join(bad)}")

    def make_scheduler(self) -> RFlowScheduler:
        """A fresh MONAI ``RFlowScheduler`` (sampling mutates its timesteps: one per pipeline)."""
        return RFlowScheduler(num_train_timesteps=self.num_train_timesteps,
                              use_discrete_timesteps=self.use_discrete_timesteps, sample_method=self.sample_method,
                              loc=self.logit_normal_loc, scale=self.logit_normal_scale,
                              use_timestep_transform=self.use_timestep_transform,
                              base_img_size_numel=self.base_img_size_numel, spatial_dim=3)


@dataclasses.dataclass
class LatentFlowOutput(ModelOutput):
    """Training terms: ``loss`` (velocity MSE/L1) plus what the logs track."""

    x0_mse: torch.Tensor  # MSE of the implied clean latent x_t + v t/T against z (scaled latent units)
    t_mean: torch.Tensor  # mean t / T of the batch
    cond_dropped: torch.Tensor  # fraction of samples whose whole report was replaced by the null segments


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    """A module's own forward under activation checkpointing while gradients are being recorded."""
    forward = type(self).forward
    if torch.is_grad_enabled():
        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    return forward(self, *args, **kwargs)


class LatentFlow(nn.Module, PretrainedMixin):
    """Rectified-flow velocity model on MAISI latents, conditioned on the report's sections."""

    config_class = LatentFlowConfig

    def __init__(self, config: LatentFlowConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        # use_flash_attention=False at construction: MONAI refuses True without CUDA, although the
        # flag only selects torch's scaled_dot_product_attention in forward, which runs on CPU too
        if c.backbone == "dit":
            self.dit = LatentDiT(c.latent_channels, c.dit_patch_size, c.dit_width, c.dit_depth, c.dit_heads,
                                 c.cross_attention_dim, c.dit_mlp_ratio, pooled=c.pooled_text_embedding,
                                 spacing_input=c.include_spacing_input)
        else:
            self._build_unet(c)
        if c.gradient_checkpointing:
            self._enable_checkpointing()
        self.context = ReportContext(c.segments, c.cross_attention_dim, c.text_dims, c.text_pooling,
                                     c.max_text_tokens, c.null_tokens, c.text_encoder)

    def _build_unet(self, c: LatentFlowConfig) -> None:
        self.unet = DiffusionModelUNetMaisi(
            spatial_dims=3, in_channels=c.latent_channels, out_channels=c.latent_channels,
            num_res_blocks=c.num_res_blocks, num_channels=c.channels, attention_levels=c.attention_levels,
            norm_num_groups=c.norm_num_groups, resblock_updown=c.resblock_updown,
            num_head_channels=c.num_head_channels, with_conditioning=True,
            transformer_num_layers=c.transformer_num_layers, cross_attention_dim=c.cross_attention_dim,
            include_fc=c.include_fc, use_flash_attention=False, dropout_cattn=0.0,
            include_spacing_input=c.include_spacing_input, num_class_embeds=1 if c.pooled_text_embedding else None)
        if c.pooled_text_embedding:
            # MONAI's class-embedding slot adds its output to the timestep embedding (width 4 x the first
            # level's channels); a continuous report vector takes the place of the class label, through an
            # MLP shaped like MONAI's time embedding
            width = c.channels[0] * 4
            self.unet.class_embedding = nn.Sequential(nn.Linear(c.cross_attention_dim, width), nn.SiLU(),
                                                      nn.Linear(width, width))
        if c.use_flash_attention:  # safe only with dropout 0: MONAI's SDPA call applies dropout even in eval
            for m in self.unet.modules():
                if isinstance(m, (SABlock, CrossAttentionBlock)):
                    m.use_flash_attention = True

    @functools.cached_property
    def scheduler(self) -> RFlowScheduler:
        """The training scheduler (``sample_timesteps``/``add_noise`` hold no state). Kept out of the
        module tree: MONAI's schedulers subclass ``nn.Module`` without initialising it."""
        return self.config.make_scheduler()

    def _enable_checkpointing(self) -> None:
        """Checkpoint every residual, attention and resampling block and the middle block.

        MONAI's MAISI U-Net has no checkpointing switch; each module's ``forward`` is wrapped on the
        instance (a bound method, so ``copy.deepcopy`` rebinds it), leaving weight names unchanged.
        At the paper geometry (latent 4x64x120x120) a whole training step (AdamW, EMA) then peaks at
        9.8 GiB RSS on CPU; without it the activations alone are ~35 GiB (scaled from a 16x32x32 run).
        """
        if self.config.backbone == "dit":
            for m in self.dit.blocks:
                m.forward = types.MethodType(_checkpointed_forward, m)
            return
        modules: list[nn.Module] = [self.unet.middle_block]
        for block in [*self.unet.down_blocks, *self.unet.up_blocks]:
            modules += list(block.resnets) + list(getattr(block, "attentions", []))
            modules += [m for m in (getattr(block, "downsampler", None), getattr(block, "upsampler", None)) if m is not None]
        for m in modules:
            m.forward = types.MethodType(_checkpointed_forward, m)

    # --- prediction -----------------------------------------------------------------------------
    def encode_text(self, use_null: torch.Tensor | None = None, **text: torch.Tensor) -> torch.Tensor:
        """Context (B, L, cross_attention_dim) of a batch of reports; ``use_null`` (B, S) drops segments."""
        missing = self.context.input_keys() - set(text)
        if missing:
            raise ValueError(f"missing report inputs {sorted(missing)} (this model reads {sorted(self.context.input_keys())})")
        b = next(iter(text.values())).shape[0]
        if use_null is None:
            use_null = torch.zeros(b, len(self.config.segments), dtype=torch.bool)
        return self.context({k: text[k] for k in self.context.input_keys()}, use_null)

    def null_context(self, batch: int) -> torch.Tensor:
        """The unconditional context (every segment null), (B, L, cross_attention_dim)."""
        return self.context.null_context(batch)

    def _spacing(self, spacing: torch.Tensor | None, b: int, like: torch.Tensor) -> torch.Tensor | None:
        if not self.config.include_spacing_input:
            return None  # a batch may carry spacing for every model; this one does not use it
        if spacing is None:
            raise ValueError("this model takes the voxel spacing as input: pass spacing (B, 3) in mm (x, y, z)")
        spacing = torch.as_tensor(spacing, dtype=like.dtype, device=like.device).reshape(-1, 3).expand(b, 3)
        return spacing * self.config.spacing_scale

    def velocity(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 spacing: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted velocity (B, C, D, H, W) of ``x`` at timesteps ``t`` (B,) in [0, T]."""
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(b)
        context = context.to(x.dtype)
        if self.config.backbone == "dit":
            return self.dit(x, t, context, self._spacing(spacing, b, x))
        # (B, cross_attention_dim): the mean over all L rows; padded rows are zero, so it is the real rows' sum / L
        pooled = context.mean(dim=1) if self.config.pooled_text_embedding else None
        return self.unet(x, t, context, class_labels=pooled, spacing_tensor=self._spacing(spacing, b, x))

    def guided_velocity(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, null_context: torch.Tensor,
                        guidance_scale: float, spacing: torch.Tensor | None = None) -> torch.Tensor:
        """Classifier-free guidance ``v_u + s (v_c - v_u)``, conditional and unconditional in one 2B batch.

        ``guidance_scale`` 1 is the conditional velocity alone (one pass of B).
        """
        if guidance_scale == 1.0:
            return self.velocity(x, t, context, spacing).float()
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(b)
        spacing2 = None if spacing is None else torch.as_tensor(spacing).reshape(-1, 3).expand(b, 3).repeat(2, 1)
        v = self.velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, null_context.to(context)]), spacing2)
        v_c, v_u = v.float().chunk(2)
        return v_u + guidance_scale * (v_c - v_u)

    # --- training -------------------------------------------------------------------------------
    def forward(self, latent_mu: torch.Tensor, latent_sigma: torch.Tensor, step: int = 0,
                spacing: torch.Tensor | None = None, **text: torch.Tensor) -> LatentFlowOutput:
        """Rectified-flow loss of one batch (see the module docstring for the draws); ``step`` is unused."""
        c = self.config
        unknown = set(text) - self.context.input_keys()
        if unknown:
            raise ValueError(f"unknown batch keys {sorted(unknown)} (report inputs: {sorted(self.context.input_keys())})")
        if latent_mu.ndim != 5 or latent_mu.shape != latent_sigma.shape or latent_mu.shape[1] != c.latent_channels:
            raise ValueError(f"latent_mu/latent_sigma must both be (B, {c.latent_channels}, D, H, W), got "
                             f"{tuple(latent_mu.shape)} and {tuple(latent_sigma.shape)}")
        b, dev = latent_mu.shape[0], latent_mu.device
        drop = torch.rand(b, device=dev) < c.cond_drop_prob  # (B,)
        seg_drop = torch.rand(b, len(c.segments), device=dev) < c.segment_drop_prob  # (B, S)
        mu, sigma = latent_mu.float(), latent_sigma.float()
        z = (mu + sigma * torch.randn_like(sigma)) * c.scale_factor  # (B, C, D, H, W) a fresh posterior sample
        noise = torch.randn_like(z)
        t = self.scheduler.sample_timesteps(z)  # (B,) in [0, T]
        x_t = self.scheduler.add_noise(z, noise, t)  # (1 - t/T) z + (t/T) noise
        if c.token_drop_prob > 0:  # 5. word dropout: each token's mask entry kept with probability 1 - p
            text = {k: v.bool() & (torch.rand(v.shape, device=v.device) >= c.token_drop_prob) if "_mask" in k else v
                    for k, v in text.items()}
        context = self.encode_text(use_null=rearrange(drop, "b -> b 1") | seg_drop, **text)
        v = self.velocity(x_t, t, context, spacing).float()
        target = z - noise
        loss = F.mse_loss(v, target) if c.loss == "mse" else F.l1_loss(v, target)
        with torch.no_grad():
            tt = rearrange(t.float() / c.num_train_timesteps, "b -> b 1 1 1 1")
            x0_mse = F.mse_loss(x_t + v * tt, z)
        return LatentFlowOutput(loss=loss, x0_mse=x0_mse, t_mean=t.float().mean() / c.num_train_timesteps,
                                cond_dropped=drop.float().mean())
