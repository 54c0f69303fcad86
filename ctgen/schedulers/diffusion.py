"""Cosine-schedule v-prediction diffusion: noising, targets and a deterministic sampler.

The super-resolution model (``ctgen/models/superres_unet.py``) is trained and sampled with this.

Written here rather than wrapping diffusers' ``DDIMScheduler``/``DPMSolverMultistepScheduler``:
the maths is a few lines, and owning it lets the sampler be a pure function of its inputs (no
scheduler state between calls, so several slices or pipelines can share one instance), lets the
timestep spacing be stated once ("trailing", ending on clean data), and keeps the update in
float32 whatever the model's autocast dtype. The tests check the schedule against diffusers'
``squaredcos_cap_v2`` and the samplers against the exact probability-flow ODE of a Gaussian.

Notation (Salimans & Ho 2022): ``x_t = alpha_t x0 + sigma_t eps`` with ``alpha_t^2 + sigma_t^2 = 1``,
``v = alpha_t eps - sigma_t x0``; hence ``x0 = alpha_t x_t - sigma_t v`` and
``eps = sigma_t x_t + alpha_t v``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

SOLVERS = ("ddim", "dpmsolver")


def cosine_alphas_cumprod(num_train_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """``alpha_bar`` of Nichol & Dhariwal's cosine schedule (diffusers' ``squaredcos_cap_v2``), float64 (T,).

    ``beta_t = min(1 - f(t+1)/f(t), max_beta)`` with ``f(t) = cos^2(((t/T + s)/(1 + s)) pi/2)``; the
    cap keeps the last steps from being pure noise with ``alpha = 0`` exactly.
    """
    T = num_train_timesteps

    def f(t: float) -> float:
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - f(i + 1) / f(i), max_beta) for i in range(T)], dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


class VDiffusionScheduler:
    """Forward process, v-targets and DDIM / DPM-Solver++(2M) sampling on the cosine schedule.

    Timesteps are integer indices ``0 .. T-1`` into ``alphas_cumprod`` (``t = 0`` is nearly clean).
    """

    def __init__(self, num_train_timesteps: int = 1000, solver: str = "ddim") -> None:
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose from {SOLVERS}")
        self.num_train_timesteps = num_train_timesteps
        self.solver = solver
        self.alphas_cumprod = cosine_alphas_cumprod(num_train_timesteps)  # (T,) float64

    # --- the forward process --------------------------------------------------------------------
    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``alpha_t, sigma_t`` for integer timesteps ``t`` (B,), shaped (B, 1, ...) to broadcast on ``like``."""
        abar = self.alphas_cumprod.to(t.device)[t.long()]  # (B,) float64
        shape = (-1,) + (1,) * (like.ndim - 1)
        alpha = abar.sqrt().to(like.dtype).reshape(shape)
        sigma = (1.0 - abar).sqrt().to(like.dtype).reshape(shape)
        return alpha, sigma

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = alpha_t x0 + sigma_t eps``."""
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``v = alpha_t eps - sigma_t x0``: the regression target."""
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * noise - sigma * x0

    def x0_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t, x_t)
        return alpha * x_t - sigma * v

    def eps_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t, x_t)
        return sigma * x_t + alpha * v

    # --- sampling -------------------------------------------------------------------------------
    def timesteps(self, steps: int) -> torch.Tensor:
        """``steps`` timesteps from ``T-1`` down, evenly spaced ("trailing"); the last step lands on clean data.

        Starting at ``T-1`` matters: "leading" spacing starts below it, where the sampler's
        ``N(0, I)`` start does not match the marginal (Lin et al. 2024).
        """
        if not 1 <= steps <= self.num_train_timesteps:
            raise ValueError(f"steps must be in 1..{self.num_train_timesteps}, got {steps}")
        T = self.num_train_timesteps
        return torch.tensor([round(T - i * T / steps) - 1 for i in range(steps)], dtype=torch.long)  # (N,)

    def _coefs(self, t: int | None) -> tuple[float, float]:
        """``alpha, sigma`` for a sampling timestep; ``None`` is clean data (alpha 1, sigma 0)."""
        if t is None:
            return 1.0, 0.0
        abar = float(self.alphas_cumprod[t])
        return math.sqrt(abar), math.sqrt(1.0 - abar)

    def ddim_step(self, x_t: torch.Tensor, v: torch.Tensor, t: int, t_next: int | None) -> torch.Tensor:
        """One DDIM (eta 0) step from ``t`` to ``t_next`` (``None``: clean data): keep the predicted
        noise, move the predicted x0 to the next level."""
        a_t, s_t = self._coefs(t)
        a_n, s_n = self._coefs(t_next)
        return a_n * (a_t * x_t - s_t * v) + s_n * (s_t * x_t + a_t * v)

    @torch.no_grad()
    def sample(self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_T: torch.Tensor,
               steps: int, solver: str | None = None) -> torch.Tensor:
        """Integrate from noise ``x_T`` (B, ...) to data with ``steps`` model calls; deterministic.

        ``model(x_t, t)`` returns v for ``x_t`` and timesteps ``t`` (B,) long. ``solver``:
        "ddim" (eta = 0, first order) or "dpmsolver" (DPM-Solver++(2M), Lu et al. 2022, second
        order in log-SNR, first order on the last step to clean data). The update runs in float32.
        """
        solver = solver or self.solver
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose from {SOLVERS}")
        ts = self.timesteps(steps).tolist()
        x = x_T.float()
        prev_x0, prev_h = None, None
        for i, t in enumerate(ts):
            t_next = ts[i + 1] if i + 1 < len(ts) else None
            a_t, s_t = self._coefs(t)
            a_n, s_n = self._coefs(t_next)
            tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            v = model(x, tt).float()
            x0 = a_t * x - s_t * v  # (B, ...) prediction of clean data
            if solver == "ddim" or t_next is None:
                # to clean data (sigma_n = 0) this returns x0: also DPM-Solver++'s first-order last step
                x = self.ddim_step(x, v, t, t_next)
            else:
                h = math.log(a_n / s_n) - math.log(a_t / s_t)  # step in log-SNR/2 (lambda)
                d = x0 if prev_x0 is None else x0 + (x0 - prev_x0) * (h / (2.0 * prev_h))
                x = (s_n / s_t) * x - a_n * math.expm1(-h) * d
                prev_h = h
            prev_x0 = x0
        return x
