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


def param_groups(model: nn.Module, weight_decay: float, nested: bool = True) -> list[dict]:
    """Trainable parameters split into a decayed group (matrices, conv kernels) and the rest, each group with its
    parameters' names (``param_names``, kept in the optimizer's state dict: a checkpoint's moments are matched by
    name on resume, :func:`resumable_state`).

    No decay for: tensors with dim < 2 (biases, norm gains, scalars), the weights of embedding and
    norm modules, and any name that the model or one of its submodules lists in ``no_weight_decay()``
    (timm's convention, e.g. positional tables or a learned null condition), relative to that module:
    a module owning such a raw parameter declares it once, wherever it is nested. ``nested=False``: the
    model's own list only, the split of checkpoints written before 2026-12-07, which stored no names.
    """
    extra = {f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
             if hasattr(module, "no_weight_decay") and (nested or not prefix) for name in module.no_weight_decay()}
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, NO_DECAY_MODULES):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or id(p) in no_decay_ids or name in extra:
            no_decay.append((name, p))
        else:
            decay.append((name, p))
    return [{"params": [p for _, p in group], "param_names": [n for n, _ in group], "weight_decay": wd}
            for group, wd in ((decay, weight_decay), (no_decay, 0.0))]


def resumable_state(saved: dict, model: nn.Module, weight_decay: float) -> dict:
    """An optimizer state dict from a checkpoint, re-keyed for today's :func:`param_groups` of ``model``.

    The state is keyed by position over the groups, so a checkpoint written under another split into decayed and
    not-decayed parameters (a model that declares a table in ``no_weight_decay()`` since) would give its moments to
    the wrong tensors, or fail on the groups' sizes. They are matched by parameter name: the names the checkpoint
    stored, or for one that stored none, the split of its time (``nested=False``). Group settings are taken by
    position; the training loop sets learning rate, weight decay and betas from the current config after loading.
    """
    groups = saved["param_groups"]
    now = [g["param_names"] for g in param_groups(model, weight_decay)]
    then = [g.get("param_names") for g in groups]
    if None in then:
        then = [g["param_names"] for g in param_groups(model, weight_decay, nested=False)]
    if [len(g["params"]) for g in groups] != [len(n) for n in then] or len(groups) != len(now):
        raise ValueError(f"the checkpoint's optimizer holds {[len(g['params']) for g in groups]} parameters per group, "
                         f"this model {[len(n) for n in now]}: it was written by another model or code version")
    if then == now:
        return saved
    index = {name: i for names, g in zip(then, groups) for name, i in zip(names, g["params"])}
    missing = sorted({n for names in now for n in names} - set(index))
    if missing:
        raise ValueError(f"the checkpoint's optimizer has no state for {', '.join(missing[:3])}: it was written by "
                         "another model or code version")
    state, out, k = {}, [], 0
    for group, names in zip(groups, now):
        ids = list(range(k, k + len(names)))
        state.update({i: saved["state"][index[n]] for i, n in zip(ids, names) if index[n] in saved["state"]})
        out.append({**group, "params": ids, "param_names": names})
        k += len(names)
    log.info("optimizer state matched to today's parameter groups by name (the checkpoint split them otherwise)")
    return {"state": state, "param_groups": out}


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused CUDA kernel on GPU (as nanoGPT does)."""
    fused = device.type == "cuda"
    groups = param_groups(model, weight_decay)
    log.info("AdamW: %d decayed tensors (%d params), %d not decayed (%d params)",
             *(x for g in groups for x in (len(g["params"]), sum(p.numel() for p in g["params"]))))
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused)


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
