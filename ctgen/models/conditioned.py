"""A text-conditioned model: a core (MaskGIT or super-resolution) plus, optionally, its own text encoder.

With a frozen encoder (MiniLM, T5, CXR-BERT) the text states are computed once and cached, and the
batch carries them (``text``, ``text_mask``); ``text_encoder`` is then None and nothing of the frozen
network enters the state_dict. With the small trainable encoder of the offline demo, the batch
carries token ids (``text_ids``, ``text_mask``) and the encoder is trained with the core.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import torch
from torch import nn

from ctgen.models.base import PretrainedMixin


@dataclasses.dataclass(frozen=True)
class ConditionedConfig:
    core_class: str = "ctgen.models.maskgit.MaskGIT"  # the wrapped model's class (only ctgen.* is importable)
    core: dict = dataclasses.field(default_factory=dict)  # its config fields
    text_encoder: dict | None = None  # SmallTextEncoderConfig fields; None: text states come in the batch


def _core_class(path: str):
    module, _, name = path.rpartition(".")
    if not module.startswith("ctgen.models."):
        raise ValueError(f"refusing to import {path!r}: only ctgen.models classes can be wrapped")
    return getattr(importlib.import_module(module), name)


class TextConditioned(nn.Module, PretrainedMixin):
    config_class = ConditionedConfig

    def __init__(self, config: ConditionedConfig):
        super().__init__()
        self.config = config
        cls = _core_class(config.core_class)
        self.core = cls(cls.config_from_dict(dict(config.core)))
        self.text_encoder = None
        if config.text_encoder is not None:
            from ctgen.models.text_encoders import SmallTextEncoder

            self.text_encoder = SmallTextEncoder(SmallTextEncoder.config_from_dict(dict(config.text_encoder)))

    def encode_text(self, text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                    text_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{"text": (B, L, C), "text_mask": (B, L)} from cached states or from token ids."""
        if text_ids is not None:
            if self.text_encoder is None:
                raise ValueError("got text_ids but this model has no trainable text encoder; pass text states")
            text = self.text_encoder(text_ids, text_mask)
        elif text is None:
            raise ValueError("pass text states (text, text_mask) or token ids (text_ids, text_mask)")
        return {"text": text, "text_mask": text_mask}

    def forward(self, step: int = 0, text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                text_ids: torch.Tensor | None = None, **batch: Any):
        return self.core(step=step, **self.encode_text(text, text_mask, text_ids), **batch)

    @torch.no_grad()
    def generate(self, text=None, text_mask=None, text_ids=None, **kwargs):
        """The core's ``generate`` (MaskGIT) with the text encoded first."""
        return self.core.generate(**self.encode_text(text, text_mask, text_ids), **kwargs)

    @torch.no_grad()
    def sample(self, text=None, text_mask=None, text_ids=None, **kwargs):
        """The core's ``sample`` (super-resolution) with the text encoded first."""
        return self.core.sample(**self.encode_text(text, text_mask, text_ids), **kwargs)
