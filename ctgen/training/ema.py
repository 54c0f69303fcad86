"""Exponential moving average of a model's parameters, kept as plain tensors.

Own code rather than ``torch.optim.swa_utils.AveragedModel`` (the approach of diffusers'
``EMAModel``): AveragedModel deep-copies the module, which would also copy any frozen network a
model holds a reference to and the module's Python state, and its checkpoint carries a module
prefix and ``n_averaged``. Here the shadow is a name -> tensor dict (weights_only-friendly), and the
EMA weights are saved by swapping them into the live model for the duration of a
``save_pretrained`` call. Buffers are not averaged: the live buffers (e.g. a VQ codebook that is
itself an EMA, running statistics) are saved with the EMA parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` after each optimiser step >= ``start``.

    Before ``start`` the shadow simply follows the weights (a copy), so early random weights do
    not linger in the average. Memory: one fp32-or-param-dtype copy of the trainable weights.
    """

    def __init__(self, model: nn.Module, decay: float, start: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.start = decay, start
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold in the weights after optimiser step number ``step`` (1-based)."""
        names = list(self.shadow)
        params = dict(model.named_parameters())
        shadow = [self.shadow[n] for n in names]
        live = [params[n].detach() for n in names]
        if step <= self.start:
            torch._foreach_copy_(shadow, live)
        else:
            torch._foreach_lerp_(shadow, live, 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily put the EMA weights into ``model`` (e.g. to save or evaluate it)."""
        params = dict(model.named_parameters())
        backup = {n: params[n].detach().clone() for n in self.shadow}
        with torch.no_grad():
            for n, t in self.shadow.items():
                params[n].copy_(t)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, t in backup.items():
                    params[n].copy_(t)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "start": self.start, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the model's parameters: {sorted(missing)}")
        with torch.no_grad():
            for n, t in state["shadow"].items():
                self.shadow[n].copy_(t)
