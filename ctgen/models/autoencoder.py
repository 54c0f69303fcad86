"""MONAI's MAISI autoencoder (``AutoencoderKlMaisi``) behind our config, save_pretrained and loss.

The network is MONAI's, built from :class:`MaisiAutoencoderConfig`; its defaults are the
architecture of NVIDIA's published MAISI CT autoencoder, so the released weights load through
:meth:`MaisiAutoencoder.load_maisi_checkpoint` (NVIDIA Open Model License: the weights are never
bundled, a local path is given in config). Or the same network is trained here with the one loop:
``loss`` = L1 reconstruction + ``kl_weight`` x KL (+ a least-squares PatchGAN term after
``adversarial_start``; no perceptual network), as MAISI's VAE training does.

Layout. Our tensors are in the model layout ``(B, C, D, H, W)`` (D = k, H = j, W = i of a RAS
volume, see ``ctgen.data.layout``). MAISI was trained on RAS arrays in affine order
``(B, C, I, J, K)``; the wrapper permutes on the way in and out, so NVIDIA's 3D kernels see the
orientation they were trained on, and latents come back in the model layout
``(B, latent_channels, D/4, H/4, W/4)``. Intensities: the project's ``[-1, 1]`` (HU window, see
``ctgen.data.layout.hu_to_unit``) is mapped linearly to ``value_range`` (NVIDIA: HU [-1000, 1000] ->
[0, 1]) and back.

Latent cache. :meth:`encode` returns ``(mu, sigma)``, never a sample: caching ``mu + sigma * eps``
would freeze one noise draw into every target (a known MAISI pitfall). The flow model samples
``z`` afresh each step. The scale factor (1 / std of training latents, :class:`LatentStats`) that the
workflow computes is stored with the flow network (``latent_flow/config.json``: ``scale_factor``), which
multiplies latents by it and the pipeline divides by it before decoding; this model's own ``scale_factor``
buffer stays 1 there (:meth:`set_scale_factor` is for using the autoencoder on its own).

Memory. :meth:`decode` of a whole 480x480x256 volume holds full-resolution 64-channel
activations (15 GiB each in float32). MAISI's tensor splitting (``num_splits``/``dim_split``) only
bounds each convolution's workspace, so large latents are decoded with MONAI's
``SlidingWindowInferer`` over latent windows (``decode_window``), Gaussian-blended as in MAISI's
inference scripts; peak memory is then set by the window, not the volume
(``benchmarks/latent_flow.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.inferers import SlidingWindowInferer
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator
from torch import nn
from torch.func import functional_call

from ctgen.models.base import ModelOutput, PretrainedMixin
from ctprep.errors import first_line

log = logging.getLogger(__name__)

# Architecture defaults: NVIDIA's MAISI CT autoencoder as published in MONAI's model zoo
# (models/maisi_ct_generative/configs/inference.json, "autoencoder_def") and MONAI tutorials
# (generation/maisi/configs/config_maisi3d-rflow.json, "autoencoder_def"); loss defaults from
# generation/maisi/configs/config_maisi_vae_train.json and the discriminator of its training script.


#: MONAI's MaisiConvolution overlaps its chunks by this many rows: a shorter chunk fails inside a convolution
SPLIT_MIN_ROWS = 3


def splits_evenly(latent_rows: int, num_splits: int) -> bool:
    """True if MAISI's tensor splitting cuts ``latent_rows`` (the split axis at the latent level, the smallest the
    network sees) into ``num_splits`` equal chunks of at least :data:`SPLIT_MIN_ROWS`: elsewhere MONAI drops the
    rows past the last whole chunk without a word, or fails in a convolution."""
    return num_splits == 1 or (latent_rows % num_splits == 0 and latent_rows // num_splits >= SPLIT_MIN_ROWS)


@dataclasses.dataclass(frozen=True)
class MaisiAutoencoderConfig:
    """MAISI autoencoder: architecture (NVIDIA's), memory settings and training loss."""

    in_channels: int = 1  # image channels (CT: 1; NVIDIA: image_channels 1)
    latent_channels: int = 4  # latent channels (NVIDIA: 4)
    num_channels: tuple[int, ...] = (64, 128, 256)  # channels per level; 2 downsamples -> 4x smaller latent (NVIDIA)
    num_res_blocks: tuple[int, ...] = (2, 2, 2)  # residual blocks per level (NVIDIA)
    norm_num_groups: int = 32  # GroupNorm groups (NVIDIA)
    norm_eps: float = 1e-6  # GroupNorm epsilon (NVIDIA)
    attention_levels: tuple[bool, ...] = (False, False, False)  # no attention at any level (NVIDIA)
    with_encoder_nonlocal_attn: bool = False  # no non-local attention in the encoder (NVIDIA)
    with_decoder_nonlocal_attn: bool = False  # nor in the decoder (NVIDIA)
    use_convtranspose: bool = False  # decoder upsamples by interpolation + conv (NVIDIA)
    use_checkpointing: bool = False  # MONAI's activation checkpointing of encoder/decoder (NVIDIA: off)
    norm_float16: bool = False  # GroupNorm outputs in fp16 (NVIDIA's GPU inference: True, under CUDA autocast);
    #                            False here: CPU convolutions do not take fp16 inputs with fp32 weights
    num_splits: int = 1  # MAISI tensor splitting: each conv runs on this many overlapping chunks (NVIDIA
    #                      inference: 2-4); 1 = off. Bounds conv workspace only, not the activations
    dim_split: int = 1  # spatial axis of the network input (0 = I, 1 = J, 2 = K) that is split (NVIDIA: 1)
    save_mem: bool = True  # on CUDA, MONAI's blocks empty the allocator's cache after most layers (MONAI's default):
    #                        less GPU memory held, some time lost each step; no effect on the CPU
    value_range: tuple[float, float] = (0.0, 1.0)  # what the network sees for the HU window: NVIDIA trained on
    #                                               HU [-1000, 1000] -> [0, 1]; our [-1, 1] is mapped onto it
    decode_window: tuple[int, int, int] | None = (16, 40, 40)  # latent window (D, H, W) of the sliding-window
    #                decode of larger latents (~4 GiB peak on CPU in fp32); None = decode whole
    decode_overlap: float = 0.4  # overlap of neighbouring decode windows (NVIDIA's inference config: 0.4)
    encode_window: tuple[int, int, int] | None = None  # image window (D, H, W) of a sliding-window encode of larger
    #                volumes (~960 bytes a voxel in fp32 on the CPU: 53 GiB whole at 480x480x256, 3 GiB for a
    #                128x160x160 window); None = encode whole, as NVIDIA's latent preparation does
    encode_overlap: float = 0.25  # overlap of neighbouring encode windows; each step must be a multiple of the
    #                downsample factor, so that every window's latent lands on whole latent voxels
    recon_loss: str = "l1"  # reconstruction loss: "l1" (NVIDIA's recon_loss) or "l2"
    kl_weight: float = 1e-7  # weight of the KL term, summed over latent elements as MAISI does (NVIDIA: 1e-7)
    adv_weight: float = 0.1  # weight of the generator's least-squares adversarial term (NVIDIA: 0.1); 0 = no GAN
    adversarial_start: int = 10_000  # global step from which the adversarial terms count (before: multiplied by 0)
    disc_channels: int = 32  # PatchDiscriminator base width (NVIDIA's training script: 32)
    disc_layers: int = 3  # PatchDiscriminator layers (NVIDIA's training script: num_layers_d 3)

    def __post_init__(self) -> None:
        n = len(self.num_channels)
        if len(self.num_res_blocks) != n or len(self.attention_levels) != n:
            raise ValueError("num_channels, num_res_blocks and attention_levels need one entry per level")
        if any(c % self.norm_num_groups for c in self.num_channels):
            raise ValueError(f"every level's channels {self.num_channels} must divide by norm_num_groups")
        if self.recon_loss not in ("l1", "l2"):
            raise ValueError(f"recon_loss must be 'l1' or 'l2', got {self.recon_loss!r}")
        if self.num_splits < 1 or self.dim_split not in (0, 1, 2):
            raise ValueError("num_splits must be >= 1 and dim_split one of 0, 1, 2")
        if not 0.0 <= self.decode_overlap < 1.0:
            raise ValueError("decode_overlap must be in [0, 1)")
        if self.decode_window is not None and (len(self.decode_window) != 3 or min(self.decode_window) < 1):
            raise ValueError(f"decode_window must be three positive sizes (D, H, W), got {self.decode_window}")
        if not 0.0 <= self.encode_overlap < 1.0:
            raise ValueError("encode_overlap must be in [0, 1)")
        if self.encode_window is not None:
            f = self.downsample
            if len(self.encode_window) != 3 or min(self.encode_window) < 1 or any(w % f for w in self.encode_window):
                raise ValueError(f"encode_window must be three positive sizes (D, H, W) divisible by {f}, got "
                                 f"{self.encode_window}")
            # MONAI's step between windows: int(size * (1 - overlap)); off the latent grid, windows would blend
            # latents half a voxel apart
            if any(max(int(w * (1 - self.encode_overlap)), 1) % f for w in self.encode_window):
                raise ValueError(f"encode_window {self.encode_window} with encode_overlap {self.encode_overlap} "
                                 f"steps by {[int(w * (1 - self.encode_overlap)) for w in self.encode_window]} "
                                 f"voxels: each step must be a multiple of {f} (try overlap 0.25 or 0.5)")
        lo, hi = self.value_range
        if not hi > lo:
            raise ValueError(f"value_range must be increasing, got {self.value_range}")

    @property
    def downsample(self) -> int:
        """Spatial factor between image and latent (2 per level transition: 4 for NVIDIA's)."""
        return 2 ** (len(self.num_channels) - 1)

    def network_kwargs(self) -> dict[str, Any]:
        """Arguments of MONAI's ``AutoencoderKlMaisi`` (3D, one output channel per input channel)."""
        return dict(spatial_dims=3, in_channels=self.in_channels, out_channels=self.in_channels,
                    latent_channels=self.latent_channels, num_channels=self.num_channels,
                    num_res_blocks=self.num_res_blocks, norm_num_groups=self.norm_num_groups, norm_eps=self.norm_eps,
                    attention_levels=self.attention_levels, with_encoder_nonlocal_attn=self.with_encoder_nonlocal_attn,
                    with_decoder_nonlocal_attn=self.with_decoder_nonlocal_attn, use_checkpointing=self.use_checkpointing,
                    use_convtranspose=self.use_convtranspose, norm_float16=self.norm_float16,
                    num_splits=self.num_splits, dim_split=self.dim_split,
                    save_mem=self.save_mem and torch.cuda.is_available())


@dataclasses.dataclass
class AutoencoderOutput(ModelOutput):
    """Training terms; the adversarial ones are reported (unweighted) even while inactive."""

    recon_loss: torch.Tensor  # L1 (or L2) between reconstruction and input, in [-1, 1] units
    kl_loss: torch.Tensor  # KL(q(z|x) || N(0, I)) summed over latent elements, mean over the batch
    gen_adv_loss: torch.Tensor  # generator's least-squares term (0 without a discriminator)
    disc_loss: torch.Tensor  # discriminator's least-squares loss (0 without a discriminator)
    adversarial_active: float  # 1.0 once step >= adversarial_start, else 0.0
    latent_sigma: torch.Tensor  # mean posterior sigma: collapses to ~0 if the KL weight is too small to matter


class MaisiAutoencoder(nn.Module, PretrainedMixin):
    """MONAI's ``AutoencoderKlMaisi`` (as ``self.net``) with our layout, intensity map, loss and I/O."""

    config_class = MaisiAutoencoderConfig

    def __init__(self, config: MaisiAutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        self.net = AutoencoderKlMaisi(**config.network_kwargs())
        self.discriminator = None
        if config.adv_weight > 0:
            # instance norm (as NVIDIA's VAE training): no running statistics, so calling it on real,
            # fake and detached-fake batches in one step changes no buffer
            self.discriminator = PatchDiscriminator(spatial_dims=3, channels=config.disc_channels,
                                                    in_channels=config.in_channels, out_channels=1,
                                                    num_layers_d=config.disc_layers, norm="INSTANCE")
            self.adv_loss = PatchAdversarialLoss(criterion="least_squares")
        # 1 / std of the training latents for use on its own (set_scale_factor); the workflow keeps it in the flow config
        self.register_buffer("scale_factor", torch.ones(()))

    # --- layout and intensity ---------------------------------------------------------------
    def _to_net(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) in [-1, 1] -> MAISI's (B, C, I, J, K) in ``value_range``."""
        lo, hi = self.config.value_range
        return rearrange((x + 1.0) * (0.5 * (hi - lo)) + lo, "b c d h w -> b c w h d")

    def _from_net(self, y: torch.Tensor) -> torch.Tensor:
        """MAISI's (B, C, I, J, K) in ``value_range`` -> (B, C, D, H, W) in [-1, 1] (not clamped)."""
        lo, hi = self.config.value_range
        return rearrange((y - lo) * (2.0 / (hi - lo)) - 1.0, "b c w h d -> b c d h w")

    def _check_image(self, video: torch.Tensor) -> None:
        f = self.config.downsample
        if video.ndim != 5 or video.shape[1] != self.config.in_channels:
            raise ValueError(f"expected video (B, {self.config.in_channels}, D, H, W), got {tuple(video.shape)}")
        if any(s % f for s in video.shape[2:]):
            raise ValueError(f"volume shape {tuple(video.shape[2:])} must be divisible by {f} on every axis "
                             "(crop or pad the prep grid)")

    def _check_split(self, net_shape, what: str, latent: bool = False) -> None:
        """MONAI's tensor splitting (``num_splits`` > 1) cuts the split axis into equal chunks of at least 3 rows
        at every level: an axis it does not divide loses the rows past the last whole chunk without a word (a
        30-voxel latent axis decoded to 28), and shorter chunks fail inside a convolution. One line instead."""
        n = self.config.num_splits
        if n == 1:
            return
        size = int(net_shape[self.config.dim_split])
        rows = size if latent else size // self.config.downsample  # the smallest level's rows along the axis
        if not splits_evenly(rows, n):
            step = n * (1 if latent else self.config.downsample)
            raise ValueError(f"{what}: {size} voxels along the split axis (dim_split {self.config.dim_split}) do not "
                             f"divide into num_splits {n} chunks of at least {SPLIT_MIN_ROWS} latent rows: use a "
                             f"multiple of {step} (at least {SPLIT_MIN_ROWS * step}), or num_splits 1")

    # --- encoding and decoding ----------------------------------------------------------------
    def encode(self, video: torch.Tensor, window: tuple[int, int, int] | None | str = "config"
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std ``(mu, sigma)``, each (B, latent_channels, D/f, H/f, W/f); no sampling.

        ``window``: image window (D, H, W) of a sliding-window encode, Gaussian-blended like the decode's
        ("config": ``encode_window``; None: whole). A volume no larger than the window is encoded whole. Each
        window has its own GroupNorm statistics and zero-padded edges, as the training crops had; the latents
        differ from a whole encode's, so a cache and the samples decoded from it should come from one setting.
        """
        self._check_image(video)
        window = self.config.encode_window if window == "config" else window
        x = self._to_net(video.float())  # (B, C, I, J, K)
        if window is None or all(s <= w for s, w in zip(video.shape[2:], window)):
            self._check_split(x.shape[2:], "the volume")
            mu, sigma = self.net.encode(x)  # (B, Cz, I/f, J/f, K/f) each
        else:
            d, h, w = (min(s, n) for s, n in zip(video.shape[2:], window))  # no window larger than the volume
            self._check_split((w, h, d), "the encode window")
            inferer = SlidingWindowInferer(roi_size=(w, h, d), sw_batch_size=1, overlap=self.config.encode_overlap,
                                           mode="gaussian")
            # one output for MONAI to stitch (f times smaller than the windows: its zoom-scale support)
            both = inferer(x, lambda win: torch.cat(self.net.encode(win), dim=1))  # (B, 2 Cz, I/f, J/f, K/f)
            mu, sigma = both.chunk(2, dim=1)
        to_model = "b c w h d -> b c d h w"
        return rearrange(mu, to_model), rearrange(sigma, to_model)

    def decode(self, z: torch.Tensor, window: tuple[int, int, int] | None | str = "config",
               output_device: torch.device | str | None = None) -> torch.Tensor:
        """Latent ``z`` (B, Cz, d, h, w) (unscaled) -> volume (B, C, d f, h f, w f) in about [-1, 1].

        ``window``: latent window (D, H, W) for sliding-window decoding; "config" uses
        ``decode_window``, None decodes the whole latent at once. A latent no larger than the window
        is decoded whole. ``output_device``: where the stitched output lives (default: z's device;
        "cpu" keeps a GPU decode's full-size buffer in host memory, as MAISI's inference does).
        """
        if z.ndim != 5 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"expected a latent (B, {self.config.latent_channels}, d, h, w), got {tuple(z.shape)}")
        window = self.config.decode_window if window == "config" else window
        z_net = rearrange(z.float(), "b c d h w -> b c w h d")  # MAISI's (I, J, K) order
        if window is None or all(s <= w for s, w in zip(z.shape[2:], window)):
            self._check_split(z_net.shape[2:], "the latent", latent=True)
            y = self.net.decode(z_net)
        else:
            d, h, w = (min(s, n) for s, n in zip(z.shape[2:], window))  # no window larger than the latent
            self._check_split((w, h, d), "the decode window", latent=True)
            inferer = SlidingWindowInferer(roi_size=(w, h, d), sw_batch_size=1, overlap=self.config.decode_overlap,
                                           mode="gaussian", sw_device=z.device,
                                           device=torch.device(output_device) if output_device else z.device)
            # MONAI stitches outputs f times larger than the windows (its zoom-scale support)
            y = inferer(z_net, self.net.decode)  # (B, C, I, J, K)
        return self._from_net(y)

    def set_scale_factor(self, value: float) -> None:
        """Store the latent scale factor (1 / std of training latents, see :class:`LatentStats`)."""
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"scale factor must be a positive finite number, got {value}")
        self.scale_factor.fill_(float(value))

    # --- training -----------------------------------------------------------------------------
    def forward(self, video: torch.Tensor, step: int = 0) -> AutoencoderOutput:
        """Reconstruct a sample of the posterior; ``video`` (B, C, D, H, W) in [-1, 1] (training crops)."""
        c = self.config
        self._check_image(video)
        x = self._to_net(video.float())  # (B, C, I, J, K)
        self._check_split(x.shape[2:], "the training crop")
        mu, sigma = self.net.encode(x)
        z = mu + sigma * torch.randn_like(sigma)
        recon = self.net.decode(z)  # (B, C, I, J, K)
        rec = F.l1_loss if c.recon_loss == "l1" else F.mse_loss
        # in [-1, 1] units whatever value_range is, so losses compare across configs
        scale = 2.0 / (c.value_range[1] - c.value_range[0])
        recon_loss = rec(recon.float() * scale, x * scale)
        # MAISI's KL: summed over latent elements, averaged over the batch (hence its 1e-7 weight)
        kl = 0.5 * (mu.float() ** 2 + sigma.float() ** 2 - 2.0 * torch.log(sigma.float()) - 1.0)
        kl_loss = kl.flatten(1).sum(1).mean()
        zero = recon_loss.new_zeros(())
        gen_adv, disc_loss = zero, zero
        active = step >= c.adversarial_start
        if self.discriminator is not None:
            # generator side: through the discriminator with detached parameters (trains only the autoencoder)
            frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
            frozen.update(dict(self.discriminator.named_buffers()))
            fake_logits = functional_call(self.discriminator, frozen, (recon.float(),))[-1]
            gen_adv = self.adv_loss(fake_logits, target_is_real=True, for_discriminator=False)
            # discriminator side: on the detached reconstruction (trains only the discriminator)
            d_fake = self.adv_loss(self.discriminator(recon.detach().float())[-1], target_is_real=False,
                                   for_discriminator=True)
            d_real = self.adv_loss(self.discriminator(x)[-1], target_is_real=True, for_discriminator=True)
            disc_loss = 0.5 * (d_fake + d_real)
        factor = 1.0 if active and self.discriminator is not None else 0.0  # multiplied in while off: DDP sees every parameter
        loss = recon_loss + c.kl_weight * kl_loss + factor * (c.adv_weight * gen_adv + disc_loss)
        return AutoencoderOutput(loss=loss, recon_loss=recon_loss, kl_loss=kl_loss, gen_adv_loss=gen_adv,
                                 disc_loss=disc_loss, adversarial_active=factor, latent_sigma=sigma.detach().mean())

    # --- NVIDIA checkpoints -------------------------------------------------------------------
    def load_maisi_checkpoint(self, path: str | os.PathLike) -> MaisiAutoencoder:
        """Load NVIDIA's MAISI autoencoder weights (``autoencoder_epoch273.pt``-style) into ``self.net``.

        Accepted: a plain state dict (MONAI model zoo), a dict holding it under ``unet_state_dict``
        (MONAI tutorials' training scripts), either in MONAI's key layout or in MONAI Generative's
        older one (one ``.conv`` level fewer inside encoder/decoder convolutions; remapped), with
        or without a DataParallel ``module.`` prefix; ``.pt`` is read with ``weights_only=True``
        (no code is unpickled), ``.safetensors`` as is. Anything else is refused with the first
        mismatching keys named. The discriminator and scale factor are left as they are.
        """
        state = read_maisi_state(path)
        expected = {k: tuple(v.shape) for k, v in self.net.state_dict().items()}
        candidates = [state, _generative_to_monai(state)]
        reports = [_compare(c, expected) for c in candidates]
        for cand, report in zip(candidates, reports):
            if report is None:
                self.net.load_state_dict(cand, strict=True)
                log.info("loaded MAISI autoencoder weights from %s (%d tensors)", path, len(cand))
                return self
        best = min(reports, key=lambda r: r[0])  # fewest mismatches: the layout the file most likely has
        raise ValueError(f"{path}: does not match the configured MAISI autoencoder: {best[1]}")

    @classmethod
    def from_maisi_checkpoint(cls, path: str | os.PathLike, config: MaisiAutoencoderConfig | None = None,
                              **overrides: Any) -> MaisiAutoencoder:
        """A model with NVIDIA's architecture (or ``config``; ``overrides`` for memory settings) and their weights."""
        config = dataclasses.replace(config or MaisiAutoencoderConfig(), **overrides)
        return cls(config).load_maisi_checkpoint(path)


def read_maisi_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensor dict of a MAISI checkpoint (see :meth:`MaisiAutoencoder.load_maisi_checkpoint`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MAISI checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(path)
        except Exception as err:  # safetensors' own error type (a truncated copy, an HTML page saved under the name)
            raise ValueError(f"{path}: not a readable safetensors file ({type(err).__name__}: "
                             f"{first_line(err)[:200]})") from err
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors differ by torch version; the cause is the same
            raise ValueError(f"{path}: not a weights-only torch checkpoint ({type(err).__name__}: "
                             f"{first_line(err)[:200]})") from err
    if isinstance(obj, dict) and isinstance(obj.get("unet_state_dict"), dict):
        obj = obj["unet_state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (or one under 'unet_state_dict')")
    if all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def _generative_to_monai(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MONAI Generative's encoder/decoder key layout -> MONAI's: ``...conv.weight`` -> ``...conv.conv.weight``.

    In MONAI core each MAISI convolution wraps a ``Convolution`` block, one ``.conv`` level more than
    in older (MONAI Generative) checkpoints; NVIDIA's tutorials remap such files with this rule
    (``load_autoencoder_ckpt``). Only tried when the file does not match as it is.
    """
    out = {}
    for k, v in state.items():
        head, _, leaf = k.rpartition(".")
        if k.startswith(("encoder.", "decoder.")) and leaf in ("weight", "bias") and head.endswith("conv"):
            k = f"{head}.conv.{leaf}"
        out[k] = v
    return out


def _compare(state: dict[str, torch.Tensor], expected: dict[str, tuple]) -> tuple[int, str] | None:
    """None if ``state`` has exactly the expected keys and shapes, else (mismatch count, a one-line report)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {expected[k]}" for k in expected
              if k in state and tuple(state[k].shape) != expected[k]]
    if not (missing or unexpected or shapes):
        return None

    def first(items: list[str], what: str) -> str:
        return f"{len(items)} {what} (first: {', '.join(items[:3])})" if items else ""

    parts = [first(missing, "missing keys"), first(unexpected, "unexpected keys"),
             first(shapes, "shape mismatches, checkpoint vs model")]
    return len(missing) + len(unexpected) + len(shapes), "; ".join(p for p in parts if p)


class LatentStats:
    """Streaming std of ``z = mu + sigma * eps`` over training latents, without drawing eps.

    Over elements and noise, ``Var[z] = E[sigma^2] + Var[mu] = E[sigma^2 + mu^2] - E[mu]^2``;
    float64 sums, so memory is constant however many volumes pass. ``scale_factor`` = 1 / std
    (MAISI computes it from one batch of sampled latents; this is the exact value over all).
    """

    def __init__(self) -> None:
        self.n, self.sum_mu, self.sum_sq = 0, 0.0, 0.0

    def update(self, mu: torch.Tensor, sigma: torch.Tensor) -> None:
        if mu.shape != sigma.shape:
            raise ValueError(f"mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} differ in shape")
        self.n += mu.numel()
        self.sum_mu += float(mu.double().sum())
        self.sum_sq += float((mu.double() ** 2 + sigma.double() ** 2).sum())

    @property
    def std(self) -> float:
        if self.n == 0:
            raise ValueError("no latents seen")
        mean = self.sum_mu / self.n
        return math.sqrt(max(self.sum_sq / self.n - mean * mean, 0.0))

    @property
    def scale_factor(self) -> float:
        return 1.0 / self.std

    def sums(self) -> dict[str, float]:
        """The additive sums (one chunk's), to be combined with other chunks' by :meth:`from_sums`."""
        return {"n": self.n, "sum_mu": self.sum_mu, "sum_sq": self.sum_sq}

    @classmethod
    def from_sums(cls, sums: dict[str, float]) -> LatentStats:
        stats = cls()
        stats.n, stats.sum_mu, stats.sum_sq = int(sums["n"]), float(sums["sum_mu"]), float(sums["sum_sq"])
        return stats
