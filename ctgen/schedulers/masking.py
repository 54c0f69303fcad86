"""The MaskGIT masking schedule: cosine mask ratios, annealed temperature and confidence re-masking.

Shaped like diffusers' ``scheduling_amused.py`` (``set_timesteps`` / ``add_noise`` / ``step``) but
for token grids of any shape ``(B, ...)``: training masks a cosine-scheduled fraction of the
tokens (``add_noise``); sampling starts from an all-[MASK] grid and, at each of N steps, fills
every masked position, then re-masks the least confident of the new tokens so that a
``cos(pi/2 * r)`` fraction stays masked (Chang et al. 2022, MaskGIT, Sec. 3.2).

Randomness comes only from the ``generator`` passed in, so sampling is reproducible; noise is
drawn on the generator's device and moved, as diffusers does, so a CPU generator drives a
CUDA model.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange


def cosine_schedule(r: torch.Tensor | float) -> torch.Tensor:
    """Mask ratio at progress ``r`` in [0, 1]: ``cos(pi/2 * r)`` (1 = all masked, 0 = none)."""
    r = torch.as_tensor(r, dtype=torch.float32)
    return torch.cos(math.pi / 2 * r)


def _uniform(shape: torch.Size | tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """U(0, 1) noise of ``shape`` drawn on the generator's device, returned on ``like``'s device (float32)."""
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, device=device, generator=generator, dtype=torch.float32).to(like.device)


def gumbel_noise(shape: torch.Size | tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log(u))`` (float32, on ``like``'s device)."""
    u = _uniform(shape, like, generator)
    return -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))


class MaskingScheduler:
    """Cosine mask schedule and confidence-based re-masking for masked-token generation.

    Args:
        mask_token_id: the id that marks a masked token (MaskGIT: ``codebook_size``).
    """

    def __init__(self, mask_token_id: int):
        self.mask_token_id = int(mask_token_id)
        self.timesteps: torch.Tensor | None = None  # (N,) N-1 ... 0, as in diffusers
        self.temperatures: torch.Tensor | None = None  # (N,) annealed sampling temperature per step

    # ------------------------------------------------------------------ sampling set-up
    def set_timesteps(self, num_steps: int, temperature: float | tuple[float, float] = (2.0, 0.0),
                      device: str | torch.device | None = None) -> None:
        """Prepare ``num_steps`` decoding steps; ``temperature`` is annealed linearly from start to end.

        A single number anneals from it to 0 (the last step then decodes greedily).
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        start, end = temperature if isinstance(temperature, (tuple, list)) else (float(temperature), 0.0)
        self.timesteps = torch.arange(num_steps, device=device).flip(0)
        self.temperatures = torch.linspace(float(start), float(end), num_steps, device=device)
        self.temperatures[-1] = float(end)  # the last step decodes at ``end``, a single step too (linspace gives start)

    def _step_index(self, timestep: int | torch.Tensor) -> int:
        if self.timesteps is None:
            raise RuntimeError("call set_timesteps(num_steps) before step()")
        idx = len(self.timesteps) - 1 - int(timestep)
        if not 0 <= idx < len(self.timesteps):
            raise ValueError(f"timestep {int(timestep)} outside 0..{len(self.timesteps) - 1}")
        return idx

    # ------------------------------------------------------------------ training
    def add_noise(self, tokens: torch.Tensor, timestep_or_ratio: int | float | torch.Tensor,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask ``tokens (B, ...)``; returns ``(masked tokens, mask (B, ...) bool)``.

        ``timestep_or_ratio``: an ``int`` is a sampling timestep (after ``set_timesteps``; the mask
        ratio the sampler leaves after that step); a ``float`` or a ``(B,)`` float tensor is the
        mask ratio itself, per sample. Exactly ``round(ratio * n)`` tokens of each sample are masked
        (at least 1), chosen uniformly at random, as MaskGIT does (not a Bernoulli draw per token).
        """
        b = tokens.shape[0]
        flat = rearrange(tokens, "b ... -> b (...)")  # (B, n)
        n = flat.shape[1]
        if isinstance(timestep_or_ratio, int) and not isinstance(timestep_or_ratio, bool):
            idx = self._step_index(timestep_or_ratio)
            ratio = cosine_schedule((idx + 1) / len(self.timesteps)).expand(b)
        else:
            ratio = torch.as_tensor(timestep_or_ratio, dtype=torch.float32).flatten().cpu().expand(b)
        num_masked = (ratio * n).round().long().clamp(1, n).to(tokens.device)  # (B,)
        # rank of a uniform score = a uniformly random permutation position; mask the first k
        rank = _uniform((b, n), flat, generator).argsort(dim=-1).argsort(dim=-1)  # (B, n)
        mask = rank < num_masked[:, None]  # (B, n)
        masked = torch.where(mask, torch.full_like(flat, self.mask_token_id), flat)
        return masked.view_as(tokens), mask.view(tokens.shape)

    # ------------------------------------------------------------------ sampling
    def step(self, logits: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One decoding step: ``logits (B, ..., K)`` for ``sample (B, ...)`` -> next sample (B, ...).

        Every masked position gets a token drawn from ``softmax(logits / T)`` (Gumbel-max; argmax at
        T = 0), with T the step's annealed temperature. Of the newly filled positions, the
        ``floor(n * cos(pi/2 * (i+1)/N))`` least confident (log-probability plus T-scaled Gumbel
        noise, as MaskGIT/muse) are masked again; known tokens are never re-masked, at least one
        new token is kept per step, and the last step (timestep 0) leaves nothing masked.
        """
        idx = self._step_index(timestep)
        temp = float(self.temperatures[idx])
        flat = rearrange(sample, "b ... -> b (...)")  # (B, n)
        logits = rearrange(logits, "b ... k -> b (...) k").float()  # (B, n, K)
        b, n = flat.shape
        unknown = flat == self.mask_token_id  # (B, n)

        log_probs = logits.log_softmax(dim=-1)  # (B, n, K)
        if temp > 0:
            pred = (log_probs / temp + gumbel_noise(log_probs.shape, log_probs, generator)).argmax(dim=-1)
        else:
            pred = log_probs.argmax(dim=-1)  # (B, n)
        pred = torch.where(unknown, pred, flat)
        if idx == len(self.timesteps) - 1:
            return pred.view_as(sample)

        ratio = cosine_schedule((idx + 1) / len(self.timesteps))
        mask_len = torch.full((b,), math.floor(n * float(ratio)), device=flat.device)  # (B,)
        # keep >= 1 new token per step: re-mask fewer than were masked before the step
        mask_len = torch.minimum(mask_len, unknown.sum(dim=-1) - 1).clamp_min(0)  # (B,)

        confidence = log_probs.gather(-1, pred[..., None])[..., 0]  # (B, n)
        if temp > 0:
            confidence = confidence + temp * gumbel_noise(confidence.shape, confidence, generator)
        confidence = torch.where(unknown, confidence, torch.full_like(confidence, math.inf))
        # mask the mask_len lowest confidences of each sample (ties broken by position)
        rank = confidence.argsort(dim=-1, stable=True).argsort(dim=-1, stable=True)  # (B, n)
        remask = rank < mask_len[:, None]
        out = torch.where(remask, torch.full_like(pred, self.mask_token_id), pred)
        return out.view_as(sample)
