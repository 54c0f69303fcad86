"""Report sections -> synthetic chest CT with the latent flow family (MAISI autoencoder + latent flow).

``LatentFlowPipeline.from_pretrained(models_dir)`` loads ``autoencoder/`` and ``latent_flow/``
(EMA weights when present) and the text side described by ``models_dir/latent_flow.json``
(:func:`write_latent_flow_spec`). A call encodes each report's sections (an empty section
conditions on its null segment), integrates the rectified-flow ODE from noise with Euler steps
(the pipeline owns the loop: timesteps from MONAI's ``RFlowScheduler.set_timesteps``, classifier-
free guidance batched with the conditional pass), decodes the latent with the autoencoder's
bounded-memory sliding window, and returns int16 HU :class:`~ctprep.volume.Volume` s on the prep
preset's grid with a truthful RAS affine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.schedulers import RFlowScheduler

from ctgen.data.layout import at_window_bounds, from_model_layout, unit_to_int16_hu
from ctgen.data.text_cache import EmbeddingCache
from ctgen.models.text_encoders import spec_entry
from ctgen.pipelines.spec import GRID_KEYS, load_network, read_spec, spec_files, spec_weights
from ctprep.prompts import rendering
from ctprep.shards import sha256_file
from ctprep.volume import Volume

log = logging.getLogger(__name__)

SPEC = "latent_flow.json"
FAMILY = "latent_flow"
MODELS = ("autoencoder", "latent_flow")


def write_latent_flow_spec(models_dir: str | Path, prep_preset: dict, text_encoders: list[dict],
                           sampling: dict, text_tokenizer: str | Path | None = None,
                           prompt_rendering: dict | None = None, evaluation_text_encoder: dict | None = None,
                           caches: list[str | Path] | None = None) -> Path:
    """``latent_flow.json``: what sampling needs beside the weights (grid, text side, defaults, hashes).

    ``text_encoders``: one ``{"kind", "path", "max_length"}`` per encoder, in the order the model
    was trained with (``kind: small`` alone, with ``text_tokenizer`` copied beside the weights).
    ``prompt_rendering``: how a new report becomes its ``structured`` section
    (:func:`ctprep.prompts.rendering` of the config). ``evaluation_text_encoder``: the one the evaluation's CLIP
    model was trained with (the workflow's ``models.text_encoder``), which the family's own may differ from.
    ``caches``: the frozen encoders' cached section states the network was trained on, in the same order
    (their identities are recorded and checked against the encoders sampling rebuilds).
    """
    import shutil

    from ctgen.models.base import provenance
    from ctprep.volume import atomic_write

    models_dir = Path(models_dir)
    if caches is not None and len(caches) != len(text_encoders):
        raise ValueError(f"{len(caches)} text caches for {len(text_encoders)} text encoders")
    identities = [EmbeddingCache(c).identity for c in caches] if caches else [None] * len(text_encoders)
    entries = [spec_entry(enc, models_dir, ident) for enc, ident in zip(text_encoders, identities)]
    spec = {
        "family": FAMILY,
        "grid": {"spacing": list(prep_preset["spacing"]), "shape": list(prep_preset["shape"]),
                 "clip": list(prep_preset.get("clip", (-1000, 1000))),
                 "spacing_source": prep_preset.get("spacing_source", "the prep preset's spacing")},
        "text_encoders": entries,
        "sampling": dict(sampling),
        "prompt_rendering": dict(prompt_rendering or rendering({})),
        "weights": spec_weights(models_dir, list(MODELS), entries),
        "autoencoder_id": f"autoencoder@{sha256_file(models_dir / 'autoencoder' / 'model.safetensors')[:16]}",
        "provenance": provenance(),
    }
    if evaluation_text_encoder:
        spec["evaluation_text_encoder"] = spec_entry(evaluation_text_encoder, models_dir)
    if any(e["kind"] == "small" for e in spec["text_encoders"]):
        if len(spec["text_encoders"]) != 1 or not text_tokenizer:
            raise ValueError("the small text encoder is used alone, with its tokenizer copied beside the weights")
        shutil.copyfile(text_tokenizer, models_dir / "text_tokenizer.json")
        spec["text_encoders"][0]["tokenizer"] = "text_tokenizer.json"
    spec["files"] = spec_files(models_dir, list(MODELS), [e["tokenizer"] for e in spec["text_encoders"] if "tokenizer" in e])
    spec["config_hash"] = hashlib.sha256(json.dumps({k: spec[k] for k in ("grid", "text_encoders", "weights")},
                                                    sort_keys=True).encode()).hexdigest()[:16]
    atomic_write(models_dir / SPEC, lambda p: Path(p).write_text(json.dumps(spec, indent=2) + "\n"))
    return models_dir / SPEC


def euler_sample(velocity: Callable[[torch.Tensor, float], torch.Tensor], scheduler: RFlowScheduler,
                 noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Integrate ``dx = v dt`` from ``noise`` (t = T) to data (t = 0) with ``steps`` Euler steps.

    The timesteps are MONAI's (``set_timesteps``: evenly spaced, then its resolution shift, held in
    float16); the update is ``x <- x + v (t - t_next) / T`` with a final ``t_next = 0``. Written here
    rather than calling ``RFlowScheduler.step``, which truncates ``next_timestep`` to an integer:
    with continuous timesteps its 30 steps travel up to ~3% more than [T, 0] (it equals this
    update exactly when the timesteps are integers; the tests check both).
    """
    scheduler.set_timesteps(steps, device=noise.device, input_img_size_numel=math.prod(noise.shape[2:]))
    ts = [float(t) for t in scheduler.timesteps] + [0.0]
    T = float(scheduler.num_train_timesteps)
    x = noise.float()
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + velocity(x, t).float() * ((t - t_next) / T)
    return x


@dataclasses.dataclass
class LatentSampleSettings:
    """How one batch of volumes is sampled (recorded in every sidecar)."""

    steps: int | None = None  # Euler steps; None: the model's sample_steps (30 at paper size)
    guidance_scale: float = 5.0  # classifier-free guidance (1: none; Report2CT samples at ~3-7)
    latent_shape: tuple[int, int, int] | None = None  # (D, H, W) latent; None: the model's latent_shape
    spacing: tuple[float, float, float] | None = None  # mm (x, y, z) of the output; None: the prep grid's
    decode_window: tuple[int, int, int] | None | str = "config"  # latent decode window; "config": the autoencoder's
    precision: str = "auto"  # "auto": bf16 autocast for the network on CUDA, fp32 on CPU; "fp32"; "bf16"

    def __post_init__(self) -> None:
        bad = [] if self.steps is None or self.steps >= 1 else [f"steps {self.steps!r}"]
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            bad.append(f"guidance_scale {self.guidance_scale!r}")
        for name in ("latent_shape", "spacing"):
            value = getattr(self, name)
            if value is not None and (len(value) != 3 or min(value) <= 0):
                bad.append(f"{name} {value!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            bad.append(f"precision {self.precision!r}")
        if bad:
            raise ValueError(f"sampling settings out of range: {', '.join(bad)} (steps >= 1, guidance >= 0, "
                             "three positive sizes, precision auto/fp32/bf16)")


class LatentFlowPipeline:
    """Inference only; takes one ``torch.Generator`` per volume for reproducible samples."""

    def __init__(self, models_dir: str | Path, spec: dict, autoencoder, flow, device: torch.device):
        self.models_dir, self.spec, self.device = Path(models_dir), spec, device
        self.autoencoder, self.flow = autoencoder, flow
        self.weights_used: dict[str, str] = {}  # network -> the folder its weights came from (from_pretrained)
        self.scheduler = flow.config.make_scheduler()  # the pipeline's own: set_timesteps mutates it
        ae_scale, flow_scale = float(autoencoder.scale_factor), float(flow.config.scale_factor)
        # an autoencoder that stores a scale factor (set once its latents were measured) must agree; the
        # workflow's does not (it is trained before its latents exist): there the latents' producer is checked
        if ae_scale != 1.0 and not math.isclose(ae_scale, flow_scale, rel_tol=1e-6):
            raise ValueError(f"the flow model was trained with latent scale {flow_scale:.6g} but the autoencoder "
                             f"stores {ae_scale:.6g}: the models come from different runs")
        made_by = (getattr(flow, "provenance", {}) or {}).get("latents_from")
        if made_by and spec.get("autoencoder_id") and made_by != spec["autoencoder_id"]:
            raise ValueError(f"the flow model was trained on latents of {made_by}, not of this autoencoder "
                             f"({spec['autoencoder_id']}): the models come from different runs")
        if autoencoder.config.latent_channels != flow.config.latent_channels:
            raise ValueError(f"autoencoder latent channels ({autoencoder.config.latent_channels}) do not match "
                             f"the flow model's ({flow.config.latent_channels})")
        longest = max((e.get("max_length") or 0 for e in spec["text_encoders"]), default=0)
        if flow.config.text_pooling == "tokens" and longest > flow.config.max_text_tokens:
            raise ValueError(f"text encoders give up to {longest} tokens but the model takes {flow.config.max_text_tokens}")

    @classmethod
    def from_pretrained(cls, models_dir: str | Path, device: str | torch.device = "cpu",
                        use_ema: bool = True) -> LatentFlowPipeline:
        from ctgen.models.autoencoder import MaisiAutoencoder
        from ctgen.models.latent_flow import LatentFlow

        models_dir, device = Path(models_dir), torch.device(device)
        spec = read_spec(models_dir, SPEC, "is not a trained latent flow model (write_latent_flow_spec writes the spec)",
                         {**GRID_KEYS, "text_encoders": list})

        used = {}

        def load(name, kind, ema=use_ema):
            return load_network(models_dir / name, kind, device, ema, used)

        # the autoencoder decodes with the weights that encoded the flow network's training latents (raw)
        pipe = cls(models_dir, spec, load("autoencoder", MaisiAutoencoder, ema=False), load("latent_flow", LatentFlow),
                   device)
        pipe.weights_used = used
        return pipe

    # --- text ---------------------------------------------------------------------------------
    @functools.cached_property
    def _small_tokenizer(self):
        from ctgen.models.text_encoders import ReportTokenizer

        return ReportTokenizer.load(self.models_dir / self.spec["text_encoders"][0]["tokenizer"])

    @functools.cached_property
    def _frozen_encoders(self) -> list:
        from ctgen.models.text_encoders import build_text_encoder

        return [build_text_encoder(e, device=self.device, root=self.models_dir) for e in self.spec["text_encoders"]]

    def section_tokens(self, sections: dict[str, str]) -> dict[str, dict[str, int]]:
        """{segment: {"n": tokens its text makes, "max": tokens the encoder takes}} (the most over the frozen
        encoders): a longer text is cut to ``max`` (CT-RATE findings can run past 128 tokens), which the sidecar
        records and the sampling job warns about, as the cascade's --truncate-prompt does."""
        out = {}
        for seg, text in sections.items():
            if not text:
                continue
            if self.flow.context.encoder is not None:
                limit = int(self.spec["text_encoders"][0]["max_length"])
                _, mask = self._small_tokenizer.encode_batch([text], 1 << 16)
                out[seg] = {"n": int(mask.sum()), "max": limit}
            else:
                counts = [(e.count_tokens(text), e.max_length) for e in self._frozen_encoders]
                n, limit = max(counts, key=lambda c: c[0] - c[1])
                out[seg] = {"n": int(n), "max": int(limit)}
        return out

    def encode_sections(self, sections: dict[str, list[str]]) -> dict[str, torch.Tensor]:
        """The flow model's text inputs for ``{segment: texts}``; blank texts get an all-False mask."""
        from ctgen.models.report_context import blank_empty, text_keys

        out: dict[str, torch.Tensor] = {}
        for seg, texts in sections.items():
            if self.flow.context.encoder is not None:
                ids, mask = self._small_tokenizer.encode_batch([t or "" for t in texts], self.spec["text_encoders"][0]["max_length"])
                out[f"{seg}_ids"], out[f"{seg}_mask"] = ids.to(self.device), blank_empty(texts, mask).to(self.device)
                continue
            for e, encoder in enumerate(self._frozen_encoders):
                enc = encoder.encode([t or "" for t in texts])
                key, mask_key = text_keys(seg, e)
                out[key], out[mask_key] = enc.hidden.to(self.device), blank_empty(texts, enc.mask).to(self.device)
        return out

    # --- geometry -----------------------------------------------------------------------------
    @staticmethod
    def affine(shape_dhw: tuple[int, int, int], spacing_xyz: tuple[float, float, float]) -> np.ndarray:
        """RAS affine of a (D, H, W) model-layout volume (W = i along R, H = j along A, D = k along S), centred at 0."""
        d, h, w = shape_dhw
        aff = np.diag([*map(float, spacing_xyz), 1.0])
        aff[:3, 3] = -np.asarray(spacing_xyz, dtype=float) * (np.array([w, h, d]) - 1) / 2.0
        return aff

    # --- sampling -----------------------------------------------------------------------------
    def _sections(self, findings, impression, other: dict) -> dict[str, list[str]]:
        given = {k: v for k, v in {"findings": findings, "impression": impression, **other}.items() if v is not None}
        segments = self.flow.config.segments
        unknown = set(given) - set(segments)
        if unknown:
            raise ValueError(f"this model conditions on {list(segments)}, not {sorted(unknown)}")
        n = {len(v) for v in given.values()}
        if len(n) != 1 or 0 in n:
            raise ValueError("give one text per volume for every section (lists of equal, non-zero length)")
        count = n.pop()
        for texts in given.values():
            if isinstance(texts, str) or not all(t is None or isinstance(t, str) for t in texts):
                raise TypeError("each section is a list of strings (or None for an absent section)")
        return {seg: list(given.get(seg, [""] * count)) for seg in segments}  # absent -> blank -> null segment

    @torch.no_grad()
    def __call__(self, findings: list[str] | None = None, impression: list[str] | None = None,
                 settings: LatentSampleSettings | None = None, generators: list[torch.Generator] | None = None,
                 **sections: list[str]) -> list[Volume]:
        """One volume per report (int16 HU, RAS affine); an empty or absent section conditions on its null."""
        settings = settings or LatentSampleSettings()
        texts = self._sections(findings, impression, sections)
        n = len(next(iter(texts.values())))
        cfg = self.flow.config
        shape = tuple(settings.latent_shape or cfg.latent_shape)
        steps = settings.steps or cfg.sample_steps
        spacing = tuple(settings.spacing or self.spec["grid"]["spacing"])
        generators = generators or [torch.Generator(device=self.device).manual_seed(i) for i in range(n)]
        if len(generators) != n:
            raise ValueError(f"{len(generators)} generators for {n} volumes")
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision(settings) == "bf16"
                    else contextlib.nullcontext())
        volumes = []
        for i in range(n):
            t0 = time.perf_counter()
            text = self.encode_sections({seg: v[i:i + 1] for seg, v in texts.items()})
            context, null = self.flow.encode_text(**text), self.flow.null_context(1).to(self.device)
            noise = torch.randn((1, cfg.latent_channels, *shape), generator=generators[i], device=self.device)
            spacing_t = torch.tensor([spacing], dtype=torch.float32, device=self.device)

            def velocity(x, t):
                with autocast:
                    return self.flow.guided_velocity(x, t, context, null, settings.guidance_scale, spacing_t)

            z = euler_sample(velocity, self.scheduler, noise, steps)  # (1, C, d, h, w) scaled latent
            t1 = time.perf_counter()
            image = self.autoencoder.decode(z / cfg.scale_factor, window=settings.decode_window, output_device="cpu")
            t2 = time.perf_counter()
            hu, n_nonfinite = unit_to_int16_hu(image[0].float(), tuple(self.spec["grid"]["clip"]))  # (1, D, H, W)
            report = {seg: v[i] for seg, v in texts.items()}
            if n_nonfinite:
                log.warning("the latent flow model gave %d non-finite voxels of %d for the report %r: written as the "
                            "HU window's bounds (NaN: its lower bound) and counted in the sidecar's n_nonfinite",
                            n_nonfinite, hu.numel(), {k: t[:40] for k, t in report.items() if t})
            vol = from_model_layout(hu, self.affine(tuple(hu.shape[1:]), spacing), source="ctgen synthetic",
                                    synthetic=True, family=FAMILY, report=report,
                                    n_nonfinite=n_nonfinite,
                                    hu_window=at_window_bounds(hu, self.spec["grid"]["clip"]))  # (1, I=W, J=H, K=D)
            vol.meta["timing_s"] = {"flow": round(t1 - t0, 3), "decode": round(t2 - t1, 3)}
            log.info("sampled %s in %.1f s (flow %d steps %.1f s, decode %.1f s)", vol.shape, t2 - t0, steps,
                     t1 - t0, t2 - t1)
            volumes.append(vol)
        return volumes

    def precision(self, settings: LatentSampleSettings) -> str:
        """The network's arithmetic for ``settings``: "auto" is bf16 autocast on CUDA, fp32 elsewhere."""
        if settings.precision != "auto":
            return settings.precision
        return "bf16" if self.device.type == "cuda" else "fp32"

    def sidecar(self, sections: dict[str, str], seed: int, settings: LatentSampleSettings) -> dict[str, Any]:
        """What every sample records: family, report sections, seed, settings, weight and config hashes, code version."""
        from ctgen.models.base import provenance

        grid = self.spec["grid"]
        spacing = {"mm": list(settings.spacing or grid["spacing"]),
                   "why": "given" if settings.spacing else grid.get("spacing_source", "the prep preset's spacing")}
        used = {**dataclasses.asdict(settings), "precision": self.precision(settings),
                "steps": settings.steps or self.flow.config.sample_steps}  # what None and "auto" resolved to
        return {"family": FAMILY, "report": dict(sections), "text_tokens": self.section_tokens(sections), "seed": seed,
                "settings": used, "spacing": spacing,
                "weights_sha256": self.spec.get("weights", {}), "weights_used": dict(self.weights_used),
                "files_sha256": self.spec.get("files", {}), "config_hash": self.spec.get("config_hash"),
                "models_dir": str(self.models_dir.resolve()),  # as typed, a rerun from another folder failed
                # the same seed gives other noise and arithmetic on another device or precision
                "provenance": provenance(seed, device=str(self.device), precision=self.precision(settings))}
