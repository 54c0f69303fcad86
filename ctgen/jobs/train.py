"""The training jobs: every model of both the cascade and the evaluation, through the one loop.

``run_training(kind, cfg, out_dir, checkpoint_root)`` is what ``ctgen train KIND --config FILE``
calls (the config's shape is documented in ``ctgen.jobs.config``). Cascade models: the CT-ViT
``tokenizer``, the MaskGIT ``generator``, the ``superres`` diffusion model. Evaluation feature
networks: ``clip`` (CT-CLIP-style volume/text model), ``classifier`` (18 labels; it also trains on
generated volumes, written as shards, for train on synthetic, test on real) and ``slicenet`` (the 2D
slice network whose features the 2D/2.5D FID uses). Text: the ``report_encoder``, the small text
encoder pretrained on the training reports' parsed findings, then frozen (``models.text_encoder.kind``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctgen.data import batches
from ctgen.data.derived import load_derived, producer_of
from ctgen.data.shards import labels_of
from ctgen.data.stream import load_shards, member_values
from ctgen.data.text import TextConditioning
from ctgen.jobs.config import config_hash, data_manifests, hu_window

log = logging.getLogger(__name__)

CASCADE_MODELS = ("tokenizer", "generator", "superres")
LATENT_MODELS = ("autoencoder", "latent_flow")  # the latent flow family (ctgen.jobs.train_latent)
EVAL_MODELS = ("clip", "classifier", "slicenet")  # the evaluation's feature networks, same loop
TEXT_MODELS = ("report_encoder",)  # the small text encoder pretrained on the training reports' findings
MODELS = CASCADE_MODELS + LATENT_MODELS + EVAL_MODELS + TEXT_MODELS
CORE = {"generator": "ctgen.models.maskgit.MaskGIT", "superres": "ctgen.models.superres_unet.SuperResDiffusion"}
POS_WEIGHT_MAX = 20.0  # cap of the automatic BCE positive weight: a label seen once must not dominate the loss


@dataclass(frozen=True)
class SliceData:
    """A superres preset's ``data`` options (the workflow adds the HU window, scale, prompt and paths)."""

    slices_per_volume: int = 4  # random axial slices per volume and epoch (seeded)


@dataclass(frozen=True)
class SliceNetData:
    """The slicenet's ``data`` options (the workflow adds the HU window and paths)."""

    slices_per_volume: int = 8  # random (plane, slice) pairs drawn per volume and epoch (seeded per batch)


@dataclass(frozen=True)
class VolumeData:
    """A clip or classifier preset's ``data`` options (the workflow adds the HU window, prompt and paths)."""

    augment: batches.Augment = field(default_factory=batches.Augment)  # training-time augmentation


def build_model(kind: str, cfg: dict[str, Any]) -> torch.nn.Module:
    """The untrained cascade model of ``kind`` from a config's ``model`` (and ``text_encoder``) sections."""
    if kind == "tokenizer":
        from ctgen.models.ctvit import CTViT

        return CTViT(CTViT.config_from_dict(cfg["model"]))
    from ctgen.models.conditioned import ConditionedConfig, TextConditioned

    return TextConditioned(ConditionedConfig(core_class=CORE[kind], core=cfg["model"], text_encoder=cfg.get("text_encoder")))


def _text(data: dict, max_length: int) -> TextConditioning:
    return TextConditioning(cache_path=data.get("text_cache"), tokenizer_path=data.get("text_tokenizer"),
                            max_length=max_length)


def _require_text(text: TextConditioning, make) -> None:
    """A text cache holds every sample trained on (:meth:`EmbeddingCache.require`), checked before the first step."""
    if text.cache is not None:
        text.cache.require(make.keys)


def _require_codebook(codebook_size: int, manifests: list[str]) -> None:
    """The generator's codebook is its tokenizer's (as the token manifests record it, where they do): a smaller one
    failed mid-training on a code past its embedding (a device-side assert on a GPU), a larger one trained a
    generator that sampling refuses."""
    for path in manifests:
        recorded = load_derived(path)["format"].get("codebook_size")
        if recorded is not None and recorded != codebook_size:
            raise ValueError(f"model.codebook_size {codebook_size} differs from the {recorded} codes of the tokenizer "
                             f"that made {path}: set model.codebook_size to {recorded}")


def _max_length(cfg: dict[str, Any]) -> int:
    return (cfg.get("text_encoder") or {}).get("max_length", cfg["data"].get("max_length", 128))


def run_training(kind: str, cfg: dict[str, Any], out_dir: str | Path, checkpoint_root: str | Path) -> Path:
    """Train one model from a config dict; returns the weights folder."""
    from ctgen.training.loop import TrainConfig, train

    if kind == "clip":
        return train_clip(cfg, out_dir, checkpoint_root)
    if kind == "classifier":
        return train_classifier(cfg, out_dir, checkpoint_root)
    if kind == "slicenet":
        return train_slicenet(cfg, out_dir, checkpoint_root)
    if kind == "report_encoder":
        return train_report_encoder(cfg, out_dir, checkpoint_root)
    if kind in LATENT_MODELS:
        from ctgen.jobs import train_latent

        run = train_latent.train_autoencoder if kind == "autoencoder" else train_latent.train_latent_flow
        return run(cfg, out_dir, checkpoint_root)
    if kind not in CASCADE_MODELS:
        raise ValueError(f"unknown model {kind!r}; one of {MODELS}")
    data, tcfg = cfg["data"], TrainConfig.from_dict(cfg["train"])
    if kind != "tokenizer":
        cfg = fit_text_dims(cfg)
    torch.manual_seed(tcfg.seed)  # the initial weights are part of the run's reproducibility
    model = build_model(kind, cfg)
    scale = data.get("lowres_scale", 1)
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:  # 2.5 was truncated, 0 failed in torch
        raise ValueError(f"data.lowres_scale: {scale!r} is not a positive integer (the in-plane factor)")
    stream = {"buffer": int(data.get("shuffle_buffer", 16)), "verify": bool(data.get("verify_shards", True))}
    if kind == "tokenizer":
        make = batches.streamed(data_manifests(data, "manifests"), batches.volume_decode(hu_window(data)),
                                batches.tokenizer_collate(scale), **stream)
    elif kind == "generator":
        text = _text(data, _max_length(cfg))
        make = batches.streamed(data_manifests(data, "tokens"), batches.token_decode(data.get("prompt")),
                                batches.generator_collate(text), **stream)
        _require_text(text, make)
        _require_codebook(model.core.config.codebook_size, data_manifests(data, "tokens"))
    else:
        spv = int(data.get("slices_per_volume", SliceData.slices_per_volume))  # a micro-batch: spv slices of each of batch_size / spv volumes
        parallel = [data_manifests(data, "recon")] if data.get("recon") else None
        text = _text(data, _max_length(cfg))
        make = batches.streamed(data_manifests(data, "manifests"), batches.volume_decode(hu_window(data), data.get("prompt")),
                                batches.superres_collate(text, scale, spv),
                                parallel=parallel, items_per_sample=spv, **stream)
        _require_text(text, make)
    checkpoint_dir = Path(checkpoint_root) / config_hash(cfg, kind)
    log.info("training %s: %d parameters on %d samples; checkpoints in %s", kind,
             sum(p.numel() for p in model.parameters()), make.n_samples, checkpoint_dir)
    # which tokenizer made the token grids / reconstructions it learned from (the cascade's spec checks it)
    derived = {f"{key}_from": producer_of(data_manifests(data, key), key) for key in ("tokens", "recon")
               if kind != "tokenizer" and data.get(key)}
    return train(model, make, tcfg, out_dir, checkpoint_dir=checkpoint_dir,
                 extra_meta={"model_kind": kind, "n_samples": make.n_samples,
                             "data": {k: str(v) for k, v in data.items()}, **derived})


def fit_text_dims(cfg: dict[str, Any]) -> dict[str, Any]:
    """Make the model's text width (and the small encoder's vocabulary) match the text source.

    The presets name a text width for their default encoder; the width that counts is the one of the
    encoder actually configured (MiniLM 384, CXR-BERT 768, the small encoder's ``dim``).
    """
    cfg = {**cfg, "model": dict(cfg["model"])}
    data = cfg["data"]
    if cfg.get("text_encoder") is not None:
        from ctgen.models.text_encoders import ReportTokenizer, SmallTextEncoderConfig

        enc = dict(cfg["text_encoder"])
        if data.get("text_tokenizer"):
            enc["vocab_size"] = ReportTokenizer.load(data["text_tokenizer"]).vocab_size
        cfg["text_encoder"] = enc
        dim = enc.get("dim", SmallTextEncoderConfig.dim)
    elif data.get("text_cache"):
        from ctgen.data.text_cache import EmbeddingCache

        dim = EmbeddingCache(data["text_cache"]).dim
    else:
        raise ValueError("generator/superres/clip training needs a text source: text_cache, or text_tokenizer with text_encoder")
    if cfg["model"].get("text_dim") != dim:
        log.info("text width %s -> %d (the configured text encoder's)", cfg["model"].get("text_dim"), dim)
        cfg["model"]["text_dim"] = dim
    return cfg


# --- the evaluation's feature networks ------------------------------------------------------------


def label_pos_weight(labels: torch.Tensor, cap: float = POS_WEIGHT_MAX) -> tuple[float, ...]:
    """BCE positive weights negatives / positives per label of (N, labels), in [1, cap]; 1 where no positive.

    Unknown labels (NaN) count as neither positive nor negative.
    """
    labels = labels.float()
    pos = torch.nansum(labels, dim=0)
    neg = (~torch.isnan(labels)).sum(dim=0) - pos
    weight = torch.where(pos > 0, neg / pos.clamp(min=1), torch.ones_like(pos)).clamp(1.0, cap)
    return tuple(round(float(w), 4) for w in weight)


def _run_hash(kind: str, cfg: dict[str, Any], volumes: list[dict] | None = None) -> str:
    """Checkpoints are resumed only by the same model, training, augmentation and training data.

    ``config_hash`` covers the config and the contents of the data files (the manifests hold every
    shard's sha256); volumes handed in directly (generated ones, for TSTR) are hashed by content.
    """
    h = hashlib.sha256(f"{kind}:{config_hash(cfg, kind)}".encode())
    for v in volumes or []:
        h.update(v["key"].encode())
        h.update(torch.as_tensor(v["volume"]).numpy().tobytes())
        h.update(torch.as_tensor(v["labels"]).float().numpy().tobytes())
    return f"{kind}-{h.hexdigest()[:12]}"


def train_clip(cfg: dict[str, Any], out_dir: str | Path, checkpoint_root: str | Path) -> Path:
    """Train CLIP3D on the manifests' (volume, prompt) pairs; returns the weights folder."""
    from ctgen.models.clip3d import CLIP3D
    from ctgen.training.loop import TrainConfig

    data, tcfg = cfg["data"], TrainConfig.from_dict(cfg["train"])
    if tcfg.batch_size < 2:
        raise ValueError("CLIP training needs train.batch_size >= 2 (the other pairs are the negatives)")
    cfg = fit_text_dims(cfg)
    torch.manual_seed(tcfg.seed)  # the initial weights are part of the run's reproducibility
    model = CLIP3D(CLIP3D.config_from_dict({**cfg["model"], "text_encoder": cfg.get("text_encoder")}))
    text = _text(data, _max_length(cfg))
    make = batches.streamed(data_manifests(data, "manifests"), batches.volume_decode(hu_window(data), data.get("prompt")),
                            batches.clip_collate(text, batches.Augment.from_data(data)),
                            buffer=int(data.get("shuffle_buffer", 16)), verify=bool(data.get("verify_shards", True)))
    _require_text(text, make)
    return _train_feature_net(model, make, tcfg, cfg, out_dir, checkpoint_root, "clip", make.n_samples)


def train_classifier(cfg: dict[str, Any], out_dir: str | Path, checkpoint_root: str | Path,
                     volumes: list[dict] | None = None) -> Path:
    """Train Classifier3D on the manifests' volumes and labels, or on ``volumes`` when given.

    ``volumes``: [{key, volume (1, D, H, W) in [-1, 1], labels (18,)}], e.g. generated volumes with
    the labels of their prompts (train on synthetic, test on real). Unknown labels (NaN) are left out
    of the loss and of the automatic positive weights.
    """
    from ctgen.models.classifier3d import Classifier3D
    from ctgen.training.loop import TrainConfig

    data, tcfg = cfg["data"], TrainConfig.from_dict(cfg["train"])
    handed_in = volumes  # hashed by content for the checkpoint folder (no data file describes them)
    collate = batches.classifier_collate(batches.Augment.from_data(data))
    if volumes is None:
        manifests = data_manifests(data, "manifests")
        make = batches.streamed(manifests, batches.volume_decode(hu_window(data)), collate,
                                buffer=int(data.get("shuffle_buffer", 16)), verify=bool(data.get("verify_shards", True)))
        # unhashed: the stream above hashes each shard before its first read (see member_values)
        labels = [labels_of({"labels.npy": v})
                  for _, v in member_values(load_shards(manifests), "labels.npy", verify=False)]
    else:
        make = batches.listed([{**v, "volume": torch.as_tensor(v["volume"]).float(),
                                "labels": torch.as_tensor(v["labels"]).float()} for v in volumes], collate)
        labels = [np.asarray(torch.as_tensor(v["labels"]).float()) for v in volumes]
    model_cfg = dict(cfg["model"])
    if model_cfg.get("pos_weight") == "auto":
        model_cfg["pos_weight"] = label_pos_weight(torch.from_numpy(np.stack(labels)))
        log.info("automatic BCE pos_weight from %d volumes: %s", len(labels), model_cfg["pos_weight"])
    cfg = {**cfg, "model": model_cfg}
    torch.manual_seed(tcfg.seed)
    model = Classifier3D(Classifier3D.config_from_dict(model_cfg))
    return _train_feature_net(model, make, tcfg, cfg, out_dir, checkpoint_root, "classifier", len(labels), handed_in)


def slicenet_collate(slices_per_volume: int, image_size: int):
    """SliceNet's batch: k random (plane, index) slices of each volume, resized to ``image_size``.

    -> {"slices": (B * k, 1, S, S), "plane": (B * k,) long, "position": (B * k,) in [0, 1],
    "labels": (B * k, 18)}; slices are cut as the FID cuts them (``ctgen.metrics.slices.take_slice``).
    """
    from ctgen.metrics.slices import PLANE_AXIS, PLANES, take_slice
    from ctgen.models.slicenet import resize_slices

    def collate(samples, gen) -> dict:
        slices, planes, positions, labels = [], [], [], []
        for s in samples:
            volume = s["volume"][0]  # (D, H, W) in [-1, 1]
            for p in torch.randint(len(PLANES), (slices_per_volume,), generator=gen).tolist():
                size = volume.shape[PLANE_AXIS[PLANES[p]]]
                index = int(torch.randint(size, (1,), generator=gen))
                cut = take_slice(volume, PLANES[p], index)[None, None]  # (1, 1, a, b)
                slices.append(resize_slices(cut, image_size)[0])
                planes.append(p)
                positions.append(index / max(size - 1, 1))
                labels.append(s["labels"])
        return {"slices": torch.stack(slices), "plane": torch.tensor(planes), "position": torch.tensor(positions),
                "labels": torch.stack(labels)}

    return collate


def train_slicenet(cfg: dict[str, Any], out_dir: str | Path, checkpoint_root: str | Path) -> Path:
    """Train the 2D slice network of the FID on the manifests' real volumes (slices cut in the data workers).

    ``train.batch_size`` counts slices: each micro-batch reads ``batch_size / data.slices_per_volume`` volumes.
    """
    from ctgen.models.slicenet import SliceNet
    from ctgen.training.loop import TrainConfig

    data, tcfg = cfg["data"], TrainConfig.from_dict(cfg["train"])
    spv = int(data.get("slices_per_volume", SliceNetData.slices_per_volume))
    torch.manual_seed(tcfg.seed)
    model = SliceNet(SliceNet.config_from_dict(cfg["model"]))
    make = batches.streamed(data_manifests(data, "manifests"), batches.volume_decode(hu_window(data)),
                            slicenet_collate(spv, model.config.image_size), items_per_sample=spv,
                            buffer=int(data.get("shuffle_buffer", 16)), verify=bool(data.get("verify_shards", True)))
    return _train_feature_net(model, make, tcfg, cfg, out_dir, checkpoint_root, "slicenet", make.n_samples)


def _train_feature_net(model, make, tcfg, cfg, out_dir, checkpoint_root, kind: str, n_volumes: int,
                       handed_in: list[dict] | None = None) -> Path:
    from ctgen.training.loop import train

    checkpoint_dir = Path(checkpoint_root) / _run_hash(kind, cfg, handed_in)
    log.info("training %s: %d parameters on %d volumes; checkpoints in %s", kind,
             sum(p.numel() for p in model.parameters()), n_volumes, checkpoint_dir)
    meta = {"model_kind": kind, "n_volumes": n_volumes,
            "data": {k: str(v) for k, v in cfg["data"].items() if k != "volumes"}}
    return train(model, make, tcfg, out_dir, checkpoint_dir=checkpoint_dir, extra_meta=meta)


# --- the text side ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportEncoderData:
    """The report_encoder preset's ``data`` options (the workflow adds the tables, tokenizer and splits)."""

    sections: tuple[str, ...] = ("findings", "impression", "structured")  # report sections it reads, beside the prompt


def report_encoder_samples(data: dict[str, Any], max_length: int) -> tuple[list[dict], list[str]]:
    """({text_ids, labels} per training text, the label names): every non-empty section and prompt of each
    report of ``data["splits"]``, labelled with the parser's findings of that report (never the dataset's:
    the parser reads any cohort's reports, and no held-out report is read)."""
    import pandas as pd

    from ctgen.jobs.text import prompt_texts, section_texts
    from ctgen.models.text_encoders import ReportTokenizer
    from ctprep.ctrate import LABELS, volume_key
    from ctprep.labelling import PARSED

    table = pd.read_parquet(data["labels"])
    table = table[table["split"].isin(list(data["splits"]))]
    labels = {volume_key(n): np.asarray(r, dtype=np.float32)
              for n, r in zip(table["VolumeName"], table[[PARSED + lab for lab in LABELS]].to_numpy())}
    texts: list[tuple[str, str]] = []  # (key, text)
    sections = section_texts(data["cohort"], data["prompts"]) if data.get("cohort") else {}
    wanted = set(data.get("sections", ReportEncoderData.sections))
    for name, text in sorted(sections.items()):
        key, _, section = name.rpartition(":")
        if section in wanted and key in labels and text.strip():
            texts.append((key, text))
    for column in [data["prompt"]] if data.get("prompt") and data["prompt"] not in wanted else []:
        texts += [(k, t) for k, t in sorted(prompt_texts(data["prompts"], column).items()) if k in labels and t.strip()]
    if not texts:
        raise ValueError(f"no report text of the splits {list(data['splits'])} to pretrain the report encoder on")
    tokenizer = ReportTokenizer.load(data["text_tokenizer"])
    samples = []
    for start in range(0, len(texts), 256):
        chunk = texts[start:start + 256]
        ids, mask = tokenizer.encode_batch([t for _, t in chunk], max_length)
        samples += [{"text_ids": i[m].to(torch.int32), "labels": torch.from_numpy(labels[k])}
                    for (k, _), i, m in zip(chunk, ids, mask)]
    return samples, list(LABELS)


def report_encoder_collate(samples: list[dict], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Right-pad token ids ([PAD] = 0) into ``text_ids``/``text_mask`` (B, L); ``labels`` (B, K)."""
    length = max(len(s["text_ids"]) for s in samples)
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    for b, s in enumerate(samples):
        ids[b, :len(s["text_ids"])] = s["text_ids"]
    return {"text_ids": ids, "text_mask": ids != 0, "labels": torch.stack([s["labels"] for s in samples])}


def train_report_encoder(cfg: dict[str, Any], out_dir: str | Path, checkpoint_root: str | Path) -> Path:
    """Pretrain the small text encoder to tell a report's findings from its text; its tokenizer is copied
    beside the weights, so the folder is the frozen encoder ``models.text_encoder.kind: report_encoder`` reads.

    The texts are held in memory as int32 token ids, at most ``max_length`` a text: CT-RATE's 50k reports
    with three sections each at 128 tokens are 77 MB at most (less than one paper-grid volume).
    """
    import shutil

    from ctgen.models.text_encoders import ReportEncoder, ReportTokenizer
    from ctgen.training.loop import TrainConfig, train

    data, tcfg = cfg["data"], TrainConfig.from_dict(cfg["train"])
    enc = dict(cfg.get("text_encoder") or {})
    max_length = int(enc.get("max_length", 128))
    samples, names = report_encoder_samples(data, max_length)
    labels = torch.stack([s["labels"] for s in samples])  # (N, K)
    model_cfg = {**cfg["model"], "max_length": max_length, "num_labels": len(names),
                 "vocab_size": ReportTokenizer.load(data["text_tokenizer"]).vocab_size}
    if model_cfg.get("pos_weight") == "auto":
        model_cfg["pos_weight"] = label_pos_weight(labels)
    torch.manual_seed(tcfg.seed)
    model = ReportEncoder(ReportEncoder.config_from_dict(model_cfg))
    checkpoint_dir = Path(checkpoint_root) / config_hash({**cfg, "model": model_cfg})
    positives = labels.nansum(dim=0).int().tolist()
    log.info("training report_encoder: %d parameters on %d texts (positives per label: %s); checkpoints in %s",
             sum(p.numel() for p in model.parameters()), len(samples), dict(zip(names, positives)), checkpoint_dir)
    out = train(model, batches.listed(samples, report_encoder_collate), tcfg, out_dir, checkpoint_dir=checkpoint_dir,
                extra_meta={"model_kind": "report_encoder", "n_samples": len(samples), "labels": names,
                            "data": {k: str(v) for k, v in data.items()}})
    if int(os.environ.get("RANK", "0")) == 0:  # one writer: under DDP every rank copied it into the same folder
        shutil.copyfile(data["text_tokenizer"], Path(out) / "tokenizer.json")
    return out
