"""The evaluation's trained feature networks: loading them, and features of volumes, slices and texts.

The networks are trained by ``ctgen.jobs.train`` on real training volumes and live in a models
folder (``results/models``): ``clip`` (CT-CLIP-style), ``classifier`` (18 labels), ``slicenet``
(2D slices, the FID's feature space) and, where the workflow trained them, ``tstr_synthetic`` and
``tstr_real`` (the classifier trained on generated / on real training volumes). Each is loaded in
eval mode (EMA weights where present) on one device; every metric names the network it used by its
*profile*: the backbone and the first 8 hex digits of its weights' sha256.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ctgen.data.layout import unit_to_hu
from ctgen.data.text import TextConditioning
from ctgen.metrics.slices import PLANES, slice_stack
from ctgen.models.base import weights_folder
from ctgen.models.classifier3d import Classifier3D
from ctgen.models.clip3d import CLIP3D
from ctgen.models.slicenet import SliceNet
from ctprep.logs import progress
from ctprep.shards import sha256_file

log = logging.getLogger(__name__)

#: network -> (class, backbone name used in profiles); the first three are looked up in a models folder
NETWORKS = {"clip": (CLIP3D, "clip3d"), "classifier": (Classifier3D, "classifier3d"), "slicenet": (SliceNet, "slicenet2d"),
            "tstr_synthetic": (Classifier3D, "classifier3d-tstr-synthetic"),
            "tstr_real": (Classifier3D, "classifier3d-tstr-real")}
IN_MODELS_FOLDER = ("clip", "classifier", "slicenet")


@dataclass
class FeatureNets:
    """The trained feature networks, in eval mode on one device (any may be absent)."""

    clip: CLIP3D | None = None
    classifier: Classifier3D | None = None
    slicenet: SliceNet | None = None
    inception: torch.nn.Module | None = None  # InceptionV3 (pytorch-fid weights), a second 2D feature space
    tstr: dict[str, Classifier3D] = field(default_factory=dict)  # "synthetic" / "real" -> classifier
    profiles: dict[str, str] = field(default_factory=dict)  # network -> "backbone@sha8"
    window: tuple[float, float] = (-1000.0, 1000.0)  # HU window of [-1, 1] (for InceptionV3, which takes HU)

    @property
    def device(self) -> torch.device:
        for net in (self.clip, self.classifier, self.slicenet, self.inception, *self.tstr.values()):
            if net is not None:
                return next(net.parameters()).device
        return torch.device("cpu")

    def slice_spaces(self) -> dict[str, torch.nn.Module]:
        """The 2D feature spaces present: {"slicenet": ..., "inception": ...}."""
        return {k: v for k, v in (("slicenet", self.slicenet), ("inception", self.inception)) if v is not None}


def _profile(backbone: str, weights: Path) -> str:
    return f"{backbone}@{sha256_file(weights)[:8]}"


def load_feature_nets(clip_dir: str | Path | None = None, classifier_dir: str | Path | None = None,
                      device: str | torch.device = "cpu", ema: bool = True, *, slicenet_dir: str | Path | None = None,
                      tstr_dirs: dict[str, str | Path] | None = None, inception: str | Path | None = None,
                      window=(-1000.0, 1000.0)) -> FeatureNets:
    """Load the trained networks (their EMA weights when ``ema`` and present) for evaluation."""
    nets = FeatureNets(window=(float(window[0]), float(window[1])))
    named = {"clip": clip_dir, "classifier": classifier_dir, "slicenet": slicenet_dir,
             **{f"tstr_{k}": v for k, v in (tstr_dirs or {}).items()}}
    for name, directory in named.items():
        if directory is None:
            continue
        cls, backbone = NETWORKS[name]
        folder = weights_folder(directory, ema)
        net = cls.from_pretrained(folder).to(device).eval().requires_grad_(False)
        nets.profiles[name] = _profile(backbone, folder / "model.safetensors")
        if name.startswith("tstr_"):
            nets.tstr[name.removeprefix("tstr_")] = net
        else:
            setattr(nets, name, net)
    if inception:
        from ctgen.metrics.inception import InceptionV3Features

        nets.inception = InceptionV3Features.from_path(inception).to(device)
        nets.profiles["inception"] = _profile("inceptionv3", Path(inception))
    return nets


def load_models_folder(models_dir: str | Path, device: str | torch.device = "cpu", inception: str | Path | None = None,
                       window=(-1000.0, 1000.0), tstr: tuple[str | Path, str | Path] | None = None) -> FeatureNets:
    """The feature networks found in ``models_dir`` (a sub-folder each: clip, classifier, slicenet), and the TSTR
    classifiers ``tstr`` = (trained on synthetic, trained on real) where given."""
    models_dir = Path(models_dir)
    found = {name: models_dir / name for name in IN_MODELS_FOLDER if (models_dir / name / "config.json").is_file()}
    log.info("feature networks in %s: %s", models_dir, ", ".join(found) or "none")
    return load_feature_nets(found.get("clip"), found.get("classifier"), device, slicenet_dir=found.get("slicenet"),
                             tstr_dirs=dict(zip(("synthetic", "real"), tstr)) if tstr else None,
                             inception=inception, window=window)


@torch.no_grad()
def volume_outputs(nets: FeatureNets, video: torch.Tensor) -> dict[str, np.ndarray]:
    """A batch ``video`` (B, 1, D, H, W) in [-1, 1] -> what the 3D networks give, float32 rows:
    ``clip_features`` (B, F), ``clip_embedding`` (B, E) L2-normalised, ``classifier_features`` (B, F),
    ``probabilities`` (B, 18), and ``tstr_<name>`` (B, 18) for each TSTR classifier."""
    out: dict[str, torch.Tensor] = {}
    video = video.to(nets.device, torch.float32)
    if nets.clip is not None:
        feats = nets.clip.volume_features(video)
        out["clip_features"] = feats
        out["clip_embedding"] = torch.nn.functional.normalize(nets.clip.volume_proj(feats).float(), dim=-1)
    if nets.classifier is not None:
        feats = nets.classifier.features(video)
        out["classifier_features"] = feats
        out["probabilities"] = torch.sigmoid(nets.classifier.head(feats).float())
    for name, net in nets.tstr.items():
        out[f"tstr_{name}"] = net.predict(video)
    return {k: v.float().cpu().numpy() for k, v in out.items()}


@torch.no_grad()
def slice_outputs(nets: FeatureNets, volume: torch.Tensor, n_slices: int | None, batch_size: int = 64,
                  planes=PLANES) -> dict[str, dict[str, np.ndarray]]:
    """One volume (D, H, W) in [-1, 1] -> {space: {plane: (S, F) float32 features of its slices}}."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for space, net in nets.slice_spaces().items():
        out[space] = {}
        for plane in planes:
            stack = slice_stack(volume, plane, n_slices).to(nets.device)  # (S, h, w)
            rows = []
            for start in range(0, stack.shape[0], batch_size):
                chunk = stack[start:start + batch_size, None]  # (B, 1, h, w)
                if space == "inception":
                    rows.append(net(unit_to_hu(chunk, nets.window)))  # it windows HU itself
                else:
                    rows.append(net.features(chunk))
            out[space][plane] = torch.cat(rows).float().cpu().numpy()
    return out


class TextEmbedder:
    """CLIP text embeddings of any texts: through the CLIP model's own small encoder (token ids from the
    cohort tokenizer) or a frozen encoder run here (the same states the workflow cached for training)."""

    def __init__(self, clip: CLIP3D, tokenizer_path: str | Path | None = None, frozen: dict | None = None,
                 max_length: int = 128):
        self.clip, self.max_length = clip, max_length
        self.tokenizer = self.encoder = None
        if clip.text_encoder is not None:
            if tokenizer_path is None:
                raise ValueError("the CLIP model has its own text encoder: its tokenizer (text_tokenizer.json) is needed")
            from ctgen.models.text_encoders import ReportTokenizer

            self.tokenizer = ReportTokenizer.load(tokenizer_path)
        else:
            from ctgen.models.text_encoders import build_text_encoder

            if not frozen or frozen.get("kind") == "small":
                raise ValueError("the CLIP model reads frozen-encoder states: the frozen encoder's config is needed")
            self.encoder = build_text_encoder(frozen, device=next(clip.parameters()).device)

    @torch.no_grad()
    def __call__(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """(N,) texts -> (N, E) L2-normalised float32 embeddings."""
        device = next(self.clip.parameters()).device
        rows = []
        for i in range(0, len(texts), batch_size):
            part = list(texts[i:i + batch_size])
            if self.tokenizer is not None:
                ids, mask = self.tokenizer.encode_batch(part, self.max_length)
                rows.append(self.clip.encode_text(text_ids=ids.to(device), text_mask=mask.to(device)))
            else:
                enc = self.encoder.encode(part).to(device)
                rows.append(self.clip.encode_text(text=enc.hidden, text_mask=enc.mask))
        if not rows:
            return np.zeros((0, self.clip.config.embed_dim), np.float32)
        return torch.cat(rows).float().cpu().numpy()


def spec_text_encoder(models_dir: str | Path, spec: str | Path | None = None) -> dict:
    """The text encoder the evaluation's CLIP model was trained with, as a sampling spec records it: ``spec``'s,
    else ``cascade.json``'s, else ``latent_flow.json``'s (the workflow's ``models.text_encoder``: a cascade spec's
    ``text_encoder``, a latent spec's ``evaluation_text_encoder``, whatever encoders the latent family itself read;
    an older latent spec's first encoder); {} if none. A report encoder's relative path is made absolute (it is
    relative to the spec's folder)."""
    import json

    from ctgen.models.text_encoders import resolved
    from ctgen.jobs.pairing import generator_specs

    for path in generator_specs(models_dir, spec):
        found = json.loads(path.read_text())
        enc = (found.get("text_encoder") or found.get("evaluation_text_encoder")
               or next(iter(found.get("text_encoders") or []), None))
        if enc:
            return resolved(enc, path.parent)  # a report encoder is named relative to the spec's folder
    return {}


def clip_text_embedder(nets: FeatureNets, models_dir: str | Path, spec: str | Path | None = None) -> TextEmbedder:
    """The CLIP model's text side: the tokenizer it was trained with (recorded in its config.json, else the
    cascade's copy in ``models_dir``), or the frozen encoder the spec names (:func:`spec_text_encoder`)."""
    data = (getattr(nets.clip, "provenance", None) or {}).get("data") or {}
    text = spec_text_encoder(models_dir, spec)
    tokenizer = next((p for p in (data.get("text_tokenizer"), Path(models_dir) / "text_tokenizer.json")
                      if p and p != "None" and Path(p).is_file()), None)
    own = nets.clip.config.text_encoder or {}  # the small encoder's learned positions bound the length
    return TextEmbedder(nets.clip, tokenizer_path=tokenizer, frozen=text,
                        max_length=int(own.get("max_length") or text.get("max_length") or 128))


# --- whole lists in memory (small sets: tests, guidance sweeps) --------------------------------------


def _chunks(volumes: list, batch_size: int) -> Iterator[torch.Tensor]:
    """Stacked (B, 1, D, H, W) float32 batches; volumes of differing shapes go one by one."""
    tensors = [torch.as_tensor(v["volume"] if isinstance(v, dict) else v) for v in volumes]
    for i in range(0, len(tensors), batch_size):
        part = tensors[i:i + batch_size]
        if all(t.shape == part[0].shape for t in part):
            yield torch.stack([t.float() for t in part])
        else:
            yield from (t.float()[None] for t in part)


@torch.no_grad()
def extract_features(nets: FeatureNets, volumes: list, batch_size: int = 2) -> dict[str, np.ndarray]:
    """Per-volume features of ``volumes`` ([{volume (1, D, H, W)}] or tensors), in [-1, 1]: the rows of
    :func:`volume_outputs`, concatenated."""
    out: dict[str, list[np.ndarray]] = {}
    for video in progress(_chunks(volumes, batch_size), total=-(-len(volumes) // batch_size), desc="features",
                          unit="batch"):
        for k, v in volume_outputs(nets, video).items():
            out.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in out.items()}


@torch.no_grad()
def embed_texts(clip: CLIP3D, text: TextConditioning, keys: list[str], batch_size: int = 32) -> np.ndarray:
    """CLIP text embeddings (N, E), L2-normalised, of the texts ``text`` gives for ``keys``."""
    device = next(clip.parameters()).device
    rows = []
    for i in range(0, len(keys), batch_size):
        batch = {k: v.to(device) for k, v in text(list(keys[i:i + batch_size])).items()}
        rows.append(clip.encode_text(**batch).float().cpu())
    return torch.cat(rows).numpy()
