"""CLIP3D: a CT-CLIP-style contrastive model of volumes and reports, the evaluation's text-volume space.

A 3D volume encoder (``ctgen.models.volume_encoder``) and a text side are projected to one
L2-normalised embedding space and trained with CLIP's symmetric InfoNCE loss and learned
temperature. It gives the CLIP score (100 * max(cos, 0) between a generated volume and its prompt)
and, through :meth:`CLIP3D.volume_features`, a 3D feature space for an FVD-style Frechet distance.

The text side takes the generator's two routes: token ids (``text_ids``, ``text_mask``) for a
jointly trained :class:`~ctgen.models.text_encoders.SmallTextEncoder`, or cached frozen-encoder
states (``text``, ``text_mask``) from ``ctgen.data.text_cache``; either way the token states are
mean-pooled over the mask and projected.

Identical texts in one batch (common: templated prompts such as "no acute findings") are all
positives of each other, so the loss never pushes apart a volume and a correct duplicate report;
with distinct texts the loss is exactly CLIP's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import nn

from ctgen.models.base import ModelOutput, PretrainedMixin
from ctgen.models.volume_encoder import VolumeEncoder, VolumeEncoderConfig, encoder_fields


@dataclasses.dataclass(frozen=True)
class CLIP3DConfig(VolumeEncoderConfig):
    """Encoder fields (inherited) plus the projection, text side and temperature; CT-CLIP-like defaults (presets: config.yaml)."""

    embed_dim: int = 512  # joint embedding width (CT-CLIP: 512)
    text_dim: int = 768  # width of the text token states (CXR-BERT 768, MiniLM 384, small encoder's dim)
    text_encoder: dict | None = None  # SmallTextEncoderConfig fields to train one jointly; None: cached states
    init_temperature: float = 0.07  # CLIP's initial softmax temperature (logit scale 1 / 0.07)
    max_logit_scale: float = 100.0  # CLIP clamps the learned logit scale to at most 100

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_temperature <= 0 or self.max_logit_scale <= 1:
            raise ValueError("init_temperature must be > 0 and max_logit_scale > 1")
        if self.text_encoder is not None and self.text_encoder.get("dim", self.text_dim) != self.text_dim:
            raise ValueError(f"text_dim {self.text_dim} != the small text encoder's dim {self.text_encoder.get('dim')}")


@dataclass
class CLIPOutput(ModelOutput):
    """``loss`` (symmetric InfoNCE) and the batch's retrieval accuracies and temperature."""

    accuracy_i2t: torch.Tensor  # fraction of volumes whose best-scoring text is (a copy of) their own
    accuracy_t2i: torch.Tensor  # fraction of texts whose best-scoring volume is their own (or a duplicate text's)
    logit_scale: torch.Tensor  # exp of the learned log-scale after clamping (1 / temperature)


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, L, C) token states over the True positions of ``mask`` (B, L) -> (B, C)."""
    weight = rearrange(mask, "b l -> b l 1").to(states.dtype)
    return reduce(states * weight, "b l c -> b c", "sum") / weight.sum(dim=1).clamp(min=1.0)


def same_text(text_mask: torch.Tensor, text_ids: torch.Tensor | None = None,
              text: torch.Tensor | None = None) -> torch.Tensor:
    """(B, B) bool, True where two rows of the batch carry the same text (ids or cached states)."""
    mask = text_mask.float()  # (B, L)
    if text_ids is not None:
        rows = text_ids.float() * mask  # (B, L); ids < 2^24 are exact in float32
    else:
        rows = rearrange(text.float() * rearrange(mask, "b l -> b l 1"), "b l c -> b (l c)")
    _, group = torch.unique(torch.cat([rows, mask], dim=1), dim=0, return_inverse=True)  # (B,) exact equality
    return rearrange(group, "b -> b 1") == rearrange(group, "b -> 1 b")  # (B, B)


def info_nce(logits: torch.Tensor, positives: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """CLIP's symmetric cross-entropy over a (B, B) volume-by-text logit matrix.

    ``positives`` (B, B) bool marks every matching pair (default: the diagonal); each row's target is
    uniform over its positives. Returns (loss, accuracy_i2t, accuracy_t2i).
    """
    if positives is None:
        positives = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    target = positives.float()
    loss_i2t = F.cross_entropy(logits, target / target.sum(dim=1, keepdim=True))
    loss_t2i = F.cross_entropy(logits.t(), target.t() / target.t().sum(dim=1, keepdim=True))
    rows = torch.arange(logits.shape[0], device=logits.device)
    acc_i2t = positives[rows, logits.argmax(dim=1)].float().mean()
    acc_t2i = positives.t()[rows, logits.argmax(dim=0)].float().mean()
    return (loss_i2t + loss_t2i) / 2, acc_i2t, acc_t2i


class CLIP3D(nn.Module, PretrainedMixin):
    """Volume encoder + text side in one space; ``forward`` is the contrastive training step."""

    config_class = CLIP3DConfig

    def __init__(self, config: CLIP3DConfig):
        super().__init__()
        self.config = config
        self.encoder = VolumeEncoder(encoder_fields(config))
        self.volume_proj = nn.Linear(self.encoder.feature_dim, config.embed_dim, bias=False)
        self.text_encoder = None
        if config.text_encoder is not None:
            from ctgen.models.text_encoders import SmallTextEncoder

            self.text_encoder = SmallTextEncoder(SmallTextEncoder.config_from_dict(dict(config.text_encoder)))
        self.text_norm = nn.LayerNorm(config.text_dim)
        self.text_proj = nn.Linear(config.text_dim, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))

    def no_weight_decay(self) -> list[str]:
        return ["logit_scale"]

    def volume_features(self, video: torch.Tensor) -> torch.Tensor:
        """``video (B, 1, D, H, W)`` -> pooled pre-projection features (B, F), for Frechet distances."""
        return self.encoder(video)

    def encode_volume(self, video: torch.Tensor) -> torch.Tensor:
        """``video (B, 1, D, H, W)`` -> L2-normalised embeddings (B, E)."""
        return F.normalize(self.volume_proj(self.encoder(video)).float(), dim=-1)

    def encode_text(self, text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                    text_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, L) or cached states (B, L, C), with ``text_mask`` (B, L) -> L2-normalised (B, E)."""
        if text_mask is None:
            raise ValueError("text_mask is required with text or text_ids")
        if text_ids is not None:
            if self.text_encoder is None:
                raise ValueError("got text_ids but this model has no trainable text encoder; pass text states")
            text = self.text_encoder(text_ids, text_mask)  # (B, L, C)
        elif text is None:
            raise ValueError("pass text states (text, text_mask) or token ids (text_ids, text_mask)")
        pooled = masked_mean(text, text_mask)  # (B, C)
        return F.normalize(self.text_proj(self.text_norm(pooled)).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        """The logit scale exp(s), clamped to ``max_logit_scale`` as CLIP does."""
        return self.logit_scale.float().clamp(max=math.log(self.config.max_logit_scale)).exp()

    def forward(self, video: torch.Tensor, text_mask: torch.Tensor, text: torch.Tensor | None = None,
                text_ids: torch.Tensor | None = None, step: int = 0) -> CLIPOutput:
        """Symmetric InfoNCE over the batch's (volume, text) pairs; a batch of B needs B >= 2."""
        if video.shape[0] < 2:
            raise ValueError("contrastive training needs at least 2 pairs per batch")
        v = self.encode_volume(video)  # (B, E) float32
        t = self.encode_text(text, text_mask, text_ids)  # (B, E) float32
        with torch.autocast(video.device.type, enabled=False):  # fp32 logits: bf16 would err by ~0.4 at scale 100
            scale = self.scale()
            logits = scale * v @ t.t()  # (B, B) volumes x texts: O(B^2)
        loss, acc_i2t, acc_t2i = info_nce(logits, same_text(text_mask, text_ids, text))
        return CLIPOutput(loss=loss, accuracy_i2t=acc_i2t, accuracy_t2i=acc_t2i, logit_scale=scale.detach())


def clip_score(volume_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """CLIP score per pair: 100 * max(cos, 0) of matching rows of two (N, E) embedding sets -> (N,)."""
    cos = (F.normalize(volume_emb.float(), dim=-1) * F.normalize(text_emb.float(), dim=-1)).sum(dim=-1)
    return 100.0 * cos.clamp(min=0.0)
