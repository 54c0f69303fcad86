"""Does the latent flow network read the report? Its velocity loss with the right report, the null
context and another patient's report, at fixed noise levels, on the latents it was trained on and
on held-out latents (the evaluation split's, never trained on).

A network that ignores the text has the same loss under all three contexts; one that reads it has
a lower loss with its own report than with the null context or another report's, most at high
noise, where the report has to decide the anatomy (at low noise the noisy latent already shows it).
The comparison is paired: every latent gets the same noise and timestep under the three contexts,
and the relative gains ``(loss_other - loss_own) / loss_other`` are averaged over latents with a
bootstrap CI (:func:`ctgen.metrics.summary.mean_with_ci`). Beside it, how far the report moves the
predicted velocity: ``|v_own - v_null| / |v_own|``.

Both sets are needed, and neither is the faithfulness. On the training latents a network that
memorised each training report's latent scores as well as one that learned what the findings look
like; the held-out latents show whether the report predicts an unseen patient's latent. On the demo
(150 training reports) a transformer trained on the free-text report cut its loss by 10% with the own
report on the training latents, raised it by 8% on the held-out ones, and drew volumes the classifier
scored at chance: it had learned the patients, not the findings. But a held-out loss no lower than
the null context's does not prove the opposite: with the own report the demo's flow network (structured
prompt, 2,400 steps) is no better than the null context on the held-out latents (-0.2% to -3.1% at
t/T = 0.8 over 3 seeds; -6% to -7% after 3,600 steps: it draws the anatomy of training patients with
such findings, not this patient's), while the classifier finds the reported findings in its volumes
at 0.65-0.73 macro AUROC. Whether the findings are drawn is the faithfulness evaluation's question
(docs/experiments.md, "Latent flow family").

Written here rather than taken from a library: this probe is ours (the training loss alone cannot
tell a network that reads the report from one that learned the mean volume).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch

from ctgen.metrics.summary import MetricValue, mean_with_ci

log = logging.getLogger(__name__)

NOISE_LEVELS = (0.2, 0.5, 0.8)  # t / T at which the contexts are compared (1 = pure noise)
CONTEXTS = ("own", "null", "other")


@torch.no_grad()
def context_losses(model, batch: dict[str, torch.Tensor], noise_levels: Iterable[float],
                   generator: torch.Generator) -> dict[str, np.ndarray]:
    """Per-latent velocity MSE under each context, ``{"<ctx>@<t>": (B,)}``, plus ``"shift@<t>"``
    (``|v_own - v_null| / |v_own|``). "other" is the next latent's report (the batch rolled by one)."""
    model.eval()
    c = model.config
    dev = next(model.parameters()).device
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
    text = {k: v for k, v in batch.items() if k in model.context.input_keys()}
    mu = batch["latent_mu"].float()
    b = mu.shape[0]
    if b < 2:
        raise ValueError("the text-reliance probe needs batches of at least 2 latents (another report to compare)")
    z = mu * c.scale_factor  # the posterior mean: no sampling noise in the paired comparison
    noise = torch.randn(z.shape, generator=generator).to(dev)  # CPU draws: the same on any device
    own = model.encode_text(**text)
    contexts = {"own": own, "null": model.null_context(b).to(own), "other": own.roll(1, dims=0)}
    out: dict[str, np.ndarray] = {}
    for level in noise_levels:
        t = torch.full((b,), float(level) * c.num_train_timesteps, device=dev)
        x_t = model.scheduler.add_noise(z, noise, t)
        target = z - noise
        v = {name: model.velocity(x_t, t, ctx, batch.get("spacing")).float() for name, ctx in contexts.items()}
        for name in CONTEXTS:
            out[f"{name}@{level:g}"] = (v[name] - target).pow(2).flatten(1).mean(1).cpu().numpy()
        out[f"shift@{level:g}"] = ((v["own"] - v["null"]).flatten(1).norm(dim=1)
                                   / v["own"].flatten(1).norm(dim=1).clamp_min(1e-12)).cpu().numpy()
    return out


def text_reliance(model, batches: Iterable[dict[str, torch.Tensor]], *, max_latents: int = 64,
                  noise_levels: Iterable[float] = NOISE_LEVELS, seed: int = 0,
                  heldout: bool = False) -> list[MetricValue]:
    """The probe over up to ``max_latents`` latents of ``batches``: per noise level, the relative loss
    gain of the own report over the null context and over another report, and the velocity shift.
    ``heldout``: the latents were never trained on; the names read ``text_reliance.heldout.*``."""
    noise_levels = tuple(noise_levels)
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, list[np.ndarray]] = {}
    seen = 0
    for batch in batches:
        if seen >= max_latents:
            break
        take = min(batch["latent_mu"].shape[0], max_latents - seen)
        if take < 2:
            break
        batch = {k: v[:take] if torch.is_tensor(v) else v for k, v in batch.items()}
        for k, v in context_losses(model, batch, noise_levels, gen).items():
            parts.setdefault(k, []).append(v)
        seen += take
    if not parts:
        raise ValueError("no batch of at least 2 latents to probe (another report to compare with)")
    per = {k: np.concatenate(v) for k, v in parts.items()}
    which = "held-out" if heldout else "training"
    profile = f"latent_flow:{len(per[f'own@{noise_levels[0]:g}'])} {which} latents, paired noise"
    name = "text_reliance.heldout" if heldout else "text_reliance"
    values = []
    for level in noise_levels:
        own = per[f"own@{level:g}"]
        for other in ("null", "other"):
            ref = per[f"{other}@{level:g}"]
            values.append(mean_with_ci((ref - own) / ref, f"{name}.gain_vs_{other}@{level:g}", profile=profile,
                                       extra={"loss_own": float(own.mean()), f"loss_{other}": float(ref.mean())}))
        values.append(mean_with_ci(per[f"shift@{level:g}"], f"{name}.velocity_shift@{level:g}", profile=profile))
    for m in values:
        log.info("%s = %.4g [%s] (n = %d)%s", m.name, m.value,
                 ", ".join(f"{x:.4g}" for x in m.ci) if m.ci else "no CI", m.n, f"; {m.flag}" if m.flag else "")
    return values
