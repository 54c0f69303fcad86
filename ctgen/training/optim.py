"""AdamW with decay / no-decay parameter groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

log = logging.getLogger(__name__)

# Modules whose weights are never decayed, whatever their shape (decaying an embedding table
# shrinks rarely-seen rows towards zero; norms are scale parameters).
NO_DECAY_MODULES = (nn.Embedding, nn.EmbeddingBag, nn.LayerNorm, nn.GroupNorm,
                    nn.modules.batchnorm._NormBase, nn.RMSNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into a decayed group (matrices, conv kernels) and the rest.

    No decay for: tensors with dim < 2 (biases, norm gains, scalars), the weights of embedding and
    norm modules, and any name that the model or one of its submodules lists in ``no_weight_decay()``
    (timm's convention, e.g. positional tables or a learned null condition), relative to that module:
    a module owning such a raw parameter declares it once, wherever it is nested.
    """
    extra = {f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
             if hasattr(module, "no_weight_decay") for name in module.no_weight_decay()}
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, NO_DECAY_MODULES):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or id(p) in no_decay_ids or name in extra:
            no_decay.append(p)
        else:
            decay.append(p)
    log.info("AdamW: %d decayed tensors (%d params), %d not decayed (%d params)", len(decay),
             sum(p.numel() for p in decay), len(no_decay), sum(p.numel() for p in no_decay))
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused CUDA kernel on GPU (as nanoGPT does)."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), fused=fused)


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """Learning rate for optimiser step ``step`` (0-based), nanoGPT's recipe.

    Linear warmup ``lr * (step + 1) / (warmup + 1)`` for ``step < warmup``; then ``"constant"``
    keeps ``lr`` and ``"cosine"`` decays from ``lr`` to ``min_lr`` at ``max_steps``.
    """
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return lr
    if step >= max_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def build_scheduler(optimizer: torch.optim.Optimizer, lr: float, min_lr: float, warmup_steps: int,
                    max_steps: int, schedule: str) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose factor is ``lr_at(step) / lr``; its state is just the step counter.

    The factor is a plain function (closure), so the scheduler's ``state_dict`` holds no callable
    and the schedule itself always comes from the current config.
    """
    def factor(step: int) -> float:
        return lr_at(step, lr, min_lr, warmup_steps, max_steps, schedule) / lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
