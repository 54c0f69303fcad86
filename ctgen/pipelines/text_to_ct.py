"""Report text -> synthetic chest CT: the whole cascade at inference, with truthful geometry.

``TextToCTPipeline.from_pretrained(models_dir)`` loads the three trained models and the text side
described by ``models_dir/cascade.json`` (written by the workflow's ``cascade`` rule, or by
:func:`write_cascade`). A call encodes each prompt once, samples token grids with MaskGIT
(classifier-free guidance batched with the conditional pass), decodes them with the tokenizer, and
lifts every slice with the super-resolution model in batches. The result is a :class:`Volume` in
HU on the prep preset's grid: the same spacing and the canonical RAS orientation the models were
trained on, so nothing is left for the user to guess.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctgen.data.layout import at_window_bounds, from_model_layout, unit_to_int16_hu
from ctgen.data.text_cache import EmbeddingCache
from ctgen.models.text_encoders import spec_entry
from ctgen.pipelines.spec import GRID_KEYS, check_types, load_network, read_spec, spec_files, spec_weights
from ctprep.prompts import rendering
from ctprep.reports.normalise import replace_surrogates
from ctprep.volume import Volume

log = logging.getLogger(__name__)

CASCADE = "cascade.json"
#: config.yaml's ``sampling`` settings beside the weights: the defaults of ``ctgen sample`` by hand
SAMPLING_DEFAULTS = "cascade_sampling.json"


def write_sampling_defaults(models_dir: str | Path, sampling: dict) -> Path:
    """``cascade_sampling.json``: the sampling settings ``ctgen sample`` takes where its options leave them out.

    A file of its own (the workflow's ``cascade_sampling`` rule), not a part of ``cascade.json``: an edit of the
    default guidance scale rewrites this file alone, so the guidance sweep, which reads ``cascade.json`` and
    samples at its own scales, is not sampled again.
    """
    from ctprep.volume import atomic_write

    path = Path(models_dir) / SAMPLING_DEFAULTS
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(dict(sampling), indent=2, sort_keys=True) + "\n"))
    return path


def sampling_defaults(models_dir: str | Path, spec: dict) -> dict:
    """The recorded sampling defaults of a cascade: ``cascade_sampling.json``, else the ``sampling`` section of a
    ``cascade.json`` written before that file existed, else none."""
    from ctprep.errors import read_json

    path = Path(models_dir) / SAMPLING_DEFAULTS
    if path.is_file():
        defaults = read_json(path, "sampling defaults")
        check_types(defaults, SAMPLING_TYPES, path, optional=True)
        return dict(defaults)
    if not spec.get("sampling"):  # e.g. cascade.json made alone (snakemake -R cascade), or copied without it
        log.warning("%s has no %s: sampling with ctgen's own defaults where no option is given", models_dir,
                    SAMPLING_DEFAULTS)
    check_types({"sampling": spec.get("sampling") or {}}, {"sampling": dict}, Path(models_dir) / CASCADE)
    check_types(spec.get("sampling") or {}, SAMPLING_TYPES, Path(models_dir) / CASCADE, optional=True)
    return dict(spec.get("sampling") or {})


#: the types of the sampling defaults ``ctgen sample`` reads (a hand-edited "steps": "many" was a TypeError)
SAMPLING_TYPES = {"steps": int, "guidance_scale": (int, float), "temperature": (int, float),
                  "sr_steps": (int, type(None)), "batch_size": int, "seed": int, "per_prompt": int}
#: what the cascade reads of its spec, beside the grid (a cascade.json without "grid" was a KeyError)
CASCADE_KEYS = {**GRID_KEYS, "grid.lowres_scale": int, "text_encoder": dict, "text_encoder.kind": str,
                "text_encoder.max_length": int}


def write_cascade(models_dir: str | Path, prep_preset: dict, models_cfg: dict,
                  text_tokenizer: str | Path | None = None, prompt_templates: dict | None = None,
                  prompt_rendering: dict | None = None) -> Path:
    """``cascade.json``: what sampling needs beside the weights (grid, text side, hashes; the defaults of
    ``ctgen sample`` are :func:`write_sampling_defaults`'s).

    ``text_tokenizer``: the small trainable encoder's tokenizer JSON, copied beside the weights; for a frozen
    encoder (rebuilt from its local path at sampling) the cache of states the models were trained on, whose
    identity sampling checks the rebuilt encoder against. ``prompt_rendering``:
    how a new report is rendered as a prompt (:func:`ctprep.prompts.rendering` of the config).
    """
    import shutil

    from ctgen.models.base import provenance
    from ctprep.volume import atomic_write

    models_dir = Path(models_dir)
    frozen_cache = text_tokenizer if models_cfg["text_encoder"]["kind"] != "small" else None
    text = spec_entry(models_cfg["text_encoder"], models_dir,
                      EmbeddingCache(frozen_cache).identity if frozen_cache else None)
    spec = {
        "grid": {"spacing": list(prep_preset["spacing"]), "shape": list(prep_preset["shape"]),
                 "clip": list(prep_preset.get("clip", (-1000, 1000))), "lowres_scale": int(models_cfg["lowres_scale"]),
                 "spacing_source": prep_preset.get("spacing_source", "the prep preset's spacing")},
        "text_encoder": text,
        "prompt_template": models_cfg["prompt"],
        "prompt_template_text": (prompt_templates or {}).get(models_cfg["prompt"]),
        "prompt_rendering": dict(prompt_rendering or rendering({})),
        "weights": spec_weights(models_dir, [m for m in ("tokenizer", "generator", "superres")
                                             if (models_dir / m / "model.safetensors").is_file()], [text]),
        "provenance": provenance(),
    }
    if models_cfg["text_encoder"]["kind"] == "small":  # its tokenizer travels with the weights
        if not text_tokenizer:
            raise ValueError("the small text encoder's tokenizer is needed beside the weights")
        shutil.copyfile(text_tokenizer, models_dir / "text_tokenizer.json")
        spec["text_encoder"]["tokenizer"] = "text_tokenizer.json"
    spec["files"] = spec_files(models_dir, [m for m in ("tokenizer", "generator", "superres")
                                            if (models_dir / m / "model.safetensors").is_file()],
                               [spec["text_encoder"]["tokenizer"]] if "tokenizer" in spec["text_encoder"] else [])
    spec["config_hash"] = hashlib.sha256(json.dumps({k: spec[k] for k in ("grid", "text_encoder", "weights")},
                                                    sort_keys=True).encode()).hexdigest()[:16]
    atomic_write(models_dir / CASCADE, lambda p: Path(p).write_text(json.dumps(spec, indent=2) + "\n"))
    return models_dir / CASCADE


@dataclass
class SampleSettings:
    """How one batch of volumes is sampled (recorded in every sidecar)."""

    num_slices: int | None = None  # slices of the output volume; None: the training grid's
    steps: int = 18  # MaskGIT parallel decoding steps
    guidance_scale: float = 5.0  # classifier-free guidance of the generator (1: none)
    temperature: float = 1.0  # MaskGIT sampling temperature, annealed to 0
    sr_steps: int | None = None  # super-resolution sampler steps; None: the model's config
    sr_guidance_scale: float = 1.0  # guidance of the super-resolution model
    sr_batch_size: int = 64  # slices per super-resolution batch
    super_resolution: bool = True  # False: return the low-res volume (its own, coarser spacing)
    truncate_prompt: bool = False  # True: cut prompts longer than the text encoder takes (whole sentences); False: refuse them

    def __post_init__(self) -> None:
        bad = [f"{k} {v!r}" for k, v in (("steps", self.steps), ("sr_batch_size", self.sr_batch_size),
                                          ("sr_steps", self.sr_steps))
               if v is not None and v < 1]
        # one slice wrote a NIfTI that ctprep's own reader refuses (>= 2 voxels per axis) and no DICOM series
        bad += [f"num_slices {self.num_slices!r}"] if self.num_slices is not None and self.num_slices < 2 else []
        bad += [f"{k} {v!r}" for k, v in (("guidance_scale", self.guidance_scale), ("temperature", self.temperature),
                                          ("sr_guidance_scale", self.sr_guidance_scale))
                if not (math.isfinite(v) and v >= 0)]
        if bad:  # the workflow's schema refuses them too; the CLI and the API would have sampled with them
            raise ValueError(f"sampling settings out of range: {', '.join(bad)} (counts >= 1, num_slices >= 2, "
                             "scales >= 0)")


class TextToCTPipeline:
    """Inference only; takes a ``torch.Generator`` per volume for reproducible samples."""

    def __init__(self, models_dir: str | Path, spec: dict, tokenizer, generator, superres, device: torch.device):
        self.models_dir, self.spec, self.device = Path(models_dir), spec, device
        self.tokenizer, self.generator, self.superres = tokenizer, generator, superres
        self.weights_used: dict[str, str] = {}  # network -> the folder its weights came from (from_pretrained)

    @classmethod
    def from_pretrained(cls, models_dir: str | Path, device: str | torch.device = "cpu", use_ema: bool = True):
        from ctgen.models.conditioned import TextConditioned
        from ctgen.models.ctvit import CTViT

        models_dir, device = Path(models_dir), torch.device(device)
        spec = read_spec(models_dir, CASCADE, "is not a trained cascade (run the workflow's `cascade` rule, or "
                                              "ctgen.pipelines.text_to_ct.write_cascade)", CASCADE_KEYS)

        used = {}

        def load(name, kind, ema=use_ema):
            folder = models_dir / name
            return load_network(folder, kind, device, ema, used) if (folder / "model.safetensors").is_file() else None

        # the tokenizer decodes with the weights that encoded the generator's training tokens (encode_tokens: raw)
        tokenizer, generator = load("tokenizer", CTViT, ema=False), load("generator", TextConditioned)
        if tokenizer is None or generator is None:
            raise FileNotFoundError(f"{models_dir} needs at least tokenizer/ and generator/ weights")
        gen_codes, tok_codes = generator.core.config.codebook_size, tokenizer.config.codebook_size
        if gen_codes != tok_codes:
            raise ValueError(f"generator codebook ({gen_codes}) does not match the tokenizer's ({tok_codes})")
        pipe = cls(models_dir, spec, tokenizer, generator, load("superres", TextConditioned), device)
        pipe.weights_used = used
        return pipe

    # --- text ---------------------------------------------------------------------------------
    @functools.cached_property
    def text_tokenizer(self):
        """The small trainable encoder's tokenizer, stored beside the weights (loaded on first use)."""
        from ctgen.models.text_encoders import ReportTokenizer

        return ReportTokenizer.load(self.models_dir / self.spec["text_encoder"]["tokenizer"])

    @functools.cached_property
    def frozen_encoder(self):
        """The spec's frozen encoder (MiniLM, a local Hugging Face model), built on first use."""
        from ctgen.models.text_encoders import build_text_encoder

        return build_text_encoder(self.spec["text_encoder"], device=self.device, root=self.models_dir)

    def encode_text(self, model, prompts: list[str]) -> dict[str, torch.Tensor]:
        """{"text", "text_mask"} for a model: its own trained encoder, or the frozen one of the spec."""
        if model.text_encoder is not None:
            ids, mask = self.text_tokenizer.encode_batch(prompts, self.spec["text_encoder"]["max_length"])
            return model.encode_text(text_ids=ids.to(self.device), text_mask=mask.to(self.device))
        enc = self.frozen_encoder.encode(prompts)
        return {"text": enc.hidden.to(self.device), "text_mask": enc.mask.to(self.device)}

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens the cascade's text encoder makes of ``prompt`` (special tokens included)."""
        prompt = replace_surrogates(prompt)  # as __call__ encodes it (the tokenizers raise TypeError on a surrogate)
        if self.spec["text_encoder"]["kind"] == "small":
            _, mask = self.text_tokenizer.encode_batch([prompt], 1 << 16)
            return int(mask.sum())
        return self.frozen_encoder.count_tokens(prompt)

    # --- geometry -----------------------------------------------------------------------------
    def affine(self, shape_dhw: tuple[int, int, int], spacing_xyz: list[float]) -> np.ndarray:
        """RAS affine of a (D, H, W) model-layout volume (W = i along R, H = j along A, D = k along S), centred at 0."""
        d, h, w = shape_dhw
        aff = np.diag([*spacing_xyz, 1.0])
        aff[:3, 3] = -np.asarray(spacing_xyz) * (np.array([w, h, d]) - 1) / 2.0
        return aff

    def validate(self, prompts: list[str], settings: SampleSettings, names: list[str] | None = None) -> None:
        """Refuse what cannot be sampled; ``names``: how each prompt is named in the error (a prompts file's ids: a
        0-based index named no row of it), else ``prompt <index>``."""
        if not prompts:
            raise ValueError("no prompts given")
        for i, p in enumerate(prompts):
            name = names[i] if names else f"prompt {i}"
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"{name} is empty: a report text is needed to condition the scan")
            limit = self.spec["text_encoder"]["max_length"]
            if not settings.truncate_prompt and (n := self.prompt_tokens(p)) > limit:
                raise ValueError(f"{name} has {n} text tokens but the text encoder takes {limit}: shorten it "
                                 "(e.g. the impression only) or allow truncation (--truncate-prompt)")
        max_t = self.generator.core.config.max_t
        n = settings.num_slices
        if n is not None:
            t = self.tokenizer.tokens_shape(n, 8 * self.tokenizer.config.patch_size, 8 * self.tokenizer.config.patch_size)[0]
            if n < 2 or t > max_t:
                raise ValueError(f"num_slices={n} is impossible for this generator: it needs 2 <= slices and a token "
                                 f"depth <= {max_t} (at most {self._max_slices()} slices)")

    def _max_slices(self) -> int:
        c = self.tokenizer.config
        t = self.generator.core.config.max_t
        return 1 + (t - 1) * c.temporal_patch_size if c.first_slice_separate else t * c.temporal_patch_size

    # --- sampling -----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompts: list[str], settings: SampleSettings | None = None,
                 generators: list[torch.Generator] | None = None) -> list[Volume]:
        """One volume per prompt (int16 HU, RAS affine); ``generators``: one per prompt, for reproducibility."""
        settings = settings or SampleSettings()
        # a lone surrogate (a non-UTF-8 byte on the command line, "\ud800" in a JSON row) is no character: the text
        # tokenizers raise TypeError on it and no UTF-8 file can hold it; U+FFFD, as the latent family's reports get
        prompts = [replace_surrogates(p) if isinstance(p, str) else p for p in prompts]
        self.validate(prompts, settings)
        grid, tok = self.spec["grid"], self.tokenizer.config
        scale = grid["lowres_scale"]
        d = settings.num_slices or tok.num_slices
        h_lo, w_lo = grid["shape"][1] // scale, grid["shape"][0] // scale  # prep shape is (I=R, J=A, K=S)
        grid_t = self.tokenizer.tokens_shape(d, h_lo, w_lo)
        generators = generators or [torch.Generator(device=self.device).manual_seed(i) for i in range(len(prompts))]
        if len(generators) != len(prompts):
            raise ValueError(f"{len(generators)} generators for {len(prompts)} prompts")
        volumes = []
        for i, prompt in enumerate(prompts):
            t0 = time.perf_counter()
            text = self.encode_text(self.generator, [prompt])  # once per prompt
            tokens = self.generator.core.generate(**text, grid=grid_t, steps=settings.steps,
                                                  guidance_scale=settings.guidance_scale,
                                                  temperature=settings.temperature, generator=generators[i])
            low = self.tokenizer.decode(tokens, num_slices=d)  # (1, 1, D, h, w) in [-1, 1]
            t1 = time.perf_counter()
            if settings.super_resolution and self.superres is not None:
                sr_text = self.encode_text(self.superres, [prompt])  # once per prompt, shared by its slices
                lr = low[0].transpose(0, 1)  # (D, 1, h, w): the slices as a batch
                high = self.superres.core.sample(
                    lr, sr_text["text"].expand(d, -1, -1), sr_text["text_mask"].expand(d, -1),
                    steps=settings.sr_steps, generator=generators[i], guidance_scale=settings.sr_guidance_scale,
                    batch_size=settings.sr_batch_size)  # (D, 1, H, W)
                volume, spacing = high.transpose(0, 1), list(grid["spacing"])  # (1, D, H, W)
            else:
                volume = low[0]
                spacing = [grid["spacing"][0] * scale, grid["spacing"][1] * scale, grid["spacing"][2]]
            t2 = time.perf_counter()
            hu, n_nonfinite = unit_to_int16_hu(volume.float().cpu(), tuple(grid["clip"]))  # (1, D, H, W)
            if n_nonfinite:
                log.warning("the cascade gave %d non-finite voxels of %d for prompt %r: written as the HU window's "
                            "bounds (NaN: its lower bound) and counted in the sidecar's n_nonfinite", n_nonfinite,
                            hu.numel(), prompt[:80])
            vol = from_model_layout(hu, self.affine(tuple(hu.shape[1:]), spacing), source="ctgen synthetic",
                                    synthetic=True, prompt=prompt, n_nonfinite=n_nonfinite,
                                    hu_window=at_window_bounds(hu, grid["clip"]))  # (1, I=W, J=H, K=D)
            vol.meta["timing_s"] = {"lowres": round(t1 - t0, 3), "superres": round(t2 - t1, 3)}
            log.info("sampled %s in %.1f s (low-res %.1f s, super-resolution %.1f s)", vol.shape, t2 - t0,
                     t1 - t0, t2 - t1)
            volumes.append(vol)
        return volumes

    def sidecar(self, prompt: str, seed: int, settings: SampleSettings) -> dict[str, Any]:
        """What every sample records: prompt, seed, settings, checkpoint hashes, config hash, code version."""
        from dataclasses import asdict

        from ctgen.models.base import provenance

        grid = self.spec["grid"]
        spacing = {"mm": list(grid["spacing"]), "why": grid.get("spacing_source", "the prep preset's spacing")}
        if not (settings.super_resolution and self.superres is not None):  # the low-res grid was returned
            spacing = {"mm": [grid["spacing"][0] * grid["lowres_scale"], grid["spacing"][1] * grid["lowres_scale"],
                              grid["spacing"][2]], "why": f"the low-res grid: {spacing['why']}, in-plane x "
                                                          f"{grid['lowres_scale']} (no super-resolution)"}
        sr = settings.super_resolution and self.superres is not None
        used = {**asdict(settings), "super_resolution": sr}
        if sr:  # what a None took from the model's config
            cfg = self.superres.core.config
            used.update(sr_steps=settings.sr_steps or cfg.sample_steps, sr_sampler=cfg.sampler)
        return {"family": "cascade", "prompt": replace_surrogates(prompt), "seed": seed, "settings": used, "spacing": spacing,
                "weights_sha256": self.spec.get("weights", {}), "weights_used": dict(self.weights_used),
                "files_sha256": self.spec.get("files", {}), "config_hash": self.spec.get("config_hash"),
                "models_dir": str(self.models_dir.resolve()),  # as typed, a rerun from another folder failed
                # the same seed gives other noise on another device; the cascade samples in fp32
                "provenance": provenance(seed, device=str(self.device), precision="fp32")}
