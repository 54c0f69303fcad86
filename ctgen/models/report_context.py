"""Report conditioning of the latent flow model: report sections -> one cross-attention context.

Each section ("segment": findings and impression by default, or one ``structured`` prompt) comes
as its own token sequence, from the small trainable encoder (token ids, encoded here) or from
frozen encoders (token states computed once and cached). Each segment is layer-normed, projected
to the context width, given a learned segment embedding, and placed in a fixed-length slot;
the slots are concatenated: ``(B, segments x max_tokens, dim)``.

Why fixed length and zeros at padding: MONAI's cross-attention (``CrossAttentionBlock``) takes no
key mask. Its key/value projections have no bias, so an all-zero context row is a key of logit 0
with a zero value: it adds exactly 1 to the softmax denominator and nothing to the output. With
every context padded to the same length, a sample's output depends on its own text only, never on
what it is batched with (a test checks this). The cost is ``segments x max_tokens`` keys per query.

A segment that is empty (no valid token: an empty findings or impression section) or dropped
(condition dropout, for classifier-free guidance) is replaced by that segment's learned null
tokens. The replacement is a ``torch.where`` over both branches, so every parameter (null tokens,
projection, segment embeddings, encoder) is in the graph of every step: DDP with
``find_unused_parameters=False`` never meets an unused parameter (a dropped branch just gets a
zero gradient).

Pooled option (``pooling="mean"``, Report2CT's): each encoder's states are mean-pooled over the
valid tokens and the encoders are concatenated on the channel axis (MedEmbed + ClinicalBERT +
CXR-BERT = 2560 channels), one token per segment. An audit found such pooled vectors barely tell
"no effusion" from "effusion" (cosine 0.90), hence token sequences by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

POOLINGS = ("tokens", "mean")


def text_keys(segment: str, encoder: int = 0) -> tuple[str, str]:
    """Batch keys of one segment's frozen-encoder states and mask: ``findings``/``findings_mask`` for
    the first encoder, ``findings_enc1``/``findings_mask_enc1`` for the second, and so on."""
    suffix = f"_enc{encoder}" if encoder else ""
    return f"{segment}{suffix}", f"{segment}_mask{suffix}"


def blank_empty(texts: list[str], mask: torch.Tensor) -> torch.Tensor:
    """``mask`` (B, L) with the rows of blank texts set all False, so they condition on the null segment.

    Tokenizers turn "" into ``[CLS] [SEP]``; the model must instead see "no section".
    """
    if len(texts) != mask.shape[0]:
        raise ValueError(f"{len(texts)} texts for a mask of {mask.shape[0]} rows")
    blank = torch.tensor([not (t or "").strip() for t in texts], dtype=torch.bool, device=mask.device)
    return mask.bool() & ~rearrange(blank, "b -> b 1")


class ReportContext(nn.Module):
    """Segments of a report -> context (B, len(segments) x slot, dim) with zeros at padding."""

    def __init__(self, segments: tuple[str, ...], dim: int, text_dims: tuple[int, ...] = (768,),
                 pooling: str = "tokens", max_tokens: int = 128, null_tokens: int = 1,
                 text_encoder: dict | None = None) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if not segments or len(set(segments)) != len(segments):
            raise ValueError(f"segments must be distinct names, got {segments}")
        if pooling == "tokens" and text_encoder is None and len(text_dims) != 1:
            raise ValueError("several frozen encoders are concatenated on the channel axis, which needs "
                             "pooling='mean' (their token sequences do not align)")
        if pooling == "mean" and text_encoder is not None:
            raise ValueError("the small trainable text encoder gives token states: it needs pooling='tokens' "
                             "(mean pooling is for frozen encoders' cached states)")
        self.segments, self.pooling = tuple(segments), pooling
        self.slot = max_tokens if pooling == "tokens" else 1  # context rows per segment
        if not 1 <= null_tokens <= self.slot:
            raise ValueError(f"null_tokens must be in 1..{self.slot}")
        self.encoder = None
        if text_encoder is not None:
            from ctgen.models.text_encoders import SmallTextEncoder

            self.encoder = SmallTextEncoder(SmallTextEncoder.config_from_dict(dict(text_encoder)))
            in_dim = self.encoder.dim
            self.num_encoders = 1
        else:
            in_dim = sum(text_dims) if pooling == "mean" else text_dims[0]
            self.num_encoders = len(text_dims)
        self.text_dims = tuple(text_dims)
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, dim)
        self.segment = nn.Parameter(torch.randn(len(segments), dim) * 0.02)  # (S, D)
        self.null = nn.Parameter(torch.randn(len(segments), null_tokens, dim) * 0.02)  # (S, N0, D)

    def no_weight_decay(self) -> list[str]:
        return ["segment", "null"]  # embedding tables and the learned null condition (ctgen.training.optim)

    @property
    def length(self) -> int:
        """Rows of every context: segments x slot."""
        return len(self.segments) * self.slot

    def input_keys(self) -> set[str]:
        """The batch keys this module reads."""
        if self.encoder is not None:
            return {k for s in self.segments for k in (f"{s}_ids", f"{s}_mask")}
        return {k for s in self.segments for e in range(self.num_encoders) for k in text_keys(s, e)}

    def _states(self, text: dict[str, torch.Tensor], seg: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One segment's (B, L, C) states and (B, L) mask (L = 1 when pooled)."""
        if self.encoder is not None:
            mask = text[f"{seg}_mask"].bool()
            return self.encoder(text[f"{seg}_ids"], mask), mask
        pooled, masks = [], []
        for e in range(self.num_encoders):
            key, mask_key = text_keys(seg, e)
            h, mask = text[key].float(), text[mask_key].bool()  # (B, L_e, C_e), (B, L_e)
            if h.shape[-1] != self.text_dims[e]:
                raise ValueError(f"{key}: states of width {h.shape[-1]}, expected {self.text_dims[e]}")
            if self.pooling == "tokens":
                return h, mask
            w = rearrange(mask, "b l -> b l 1").float()
            pooled.append((h * w).sum(1) / w.sum(1).clamp(min=1.0))  # (B, C_e): masked mean
            masks.append(mask.any(1))
        # a section is empty only if every encoder saw no token of it
        return rearrange(torch.cat(pooled, -1), "b c -> b 1 c"), rearrange(torch.stack(masks).any(0), "b -> b 1")

    def forward(self, text: dict[str, torch.Tensor], use_null: torch.Tensor) -> torch.Tensor:
        """Context (B, length, dim); ``use_null`` (B, S) bool picks the null tokens per segment."""
        slots = []
        for s, seg in enumerate(self.segments):
            h, mask = self._states(text, seg)
            if h.shape[1] > self.slot:
                raise ValueError(f"{seg}: {h.shape[1]} tokens > max_tokens {self.slot}; truncate when encoding")
            x = (self.proj(self.norm(h)) + self.segment[s]) * rearrange(mask, "b l -> b l 1").to(h.dtype)  # (B, L, D)
            x = F.pad(x, (0, 0, 0, self.slot - x.shape[1]))  # (B, slot, D), zero rows at padding
            null = F.pad(self.null[s], (0, 0, 0, self.slot - self.null.shape[1]))  # (slot, D)
            use = use_null[:, s].to(x.device) | ~mask.any(1)  # (B,) dropped or empty
            slots.append(torch.where(rearrange(use, "b -> b 1 1"), null.to(x.dtype), x))
        return torch.cat(slots, dim=1)  # (B, S slot, D)

    def null_context(self, batch: int) -> torch.Tensor:
        """The unconditional context (every segment null): (B, length, dim)."""
        null = F.pad(self.null, (0, 0, 0, self.slot - self.null.shape[1]))  # (S, slot, D)
        return repeat(null, "s l d -> b (s l) d", b=batch)
