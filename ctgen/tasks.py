"""The training jobs and the steps between them, as functions the CLI and the rules call.

One ``ctgen train MODEL --config FILE`` run reads a YAML/JSON file of the form::

    model: {...}            # the model's config fields (CTViTConfig, MaskGITConfig, SuperResConfig)
    text_encoder: {...}     # generator/superres: SmallTextEncoderConfig fields when trained jointly; absent: cached states
    train: {...}            # TrainConfig fields (ctgen/train.py)
    data:                   # inputs; paths may also come as command-line flags
      manifests: [...]      # tokenizer, superres: shard manifests of the training split
      tokens: PATH          # generator: the encode_tokens output
      text_cache: PATH      # a frozen encoder's cached prompt states (or text_tokenizer: PATH)
      lowres_scale: 2       # in-plane factor between the shards' grid and the tokenizer's grid
      prompt: generatect    # which prompt template conditions the models
      slices_per_volume: 4  # superres: random slices per volume and epoch
      recon: PATH           # superres: tokenizer reconstructions as low-res inputs (else downsampled slices)
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from ctgen import datasets
from ctprep.ctrate import volume_key
from ctprep.shards import sha256_file
from ctprep.volume import atomic_write

log = logging.getLogger(__name__)

MODELS = ("tokenizer", "generator", "superres")
EVAL_MODELS = ("clip", "classifier")  # the evaluation's feature networks (ctgen/eval_tasks.py), same loop
CORE = {"generator": "ctgen.models.maskgit.MaskGIT", "superres": "ctgen.models.superres_unet.SuperResDiffusion"}


def load_config(path: str | Path) -> dict[str, Any]:
    text = Path(path).read_text()
    cfg = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if not isinstance(cfg, dict) or "model" not in cfg or "train" not in cfg:
        raise ValueError(f"{path}: a training config needs `model` and `train` sections")
    cfg.setdefault("data", {})
    return cfg


def config_hash(cfg: dict[str, Any]) -> str:
    """Short hash of a run's model+train+text config and of its data files' contents.

    The checkpoint folder is named by it, so an interrupted job (Slurm time limit, pre-emption)
    resumes, while a job rerun because its config or its input data changed starts afresh.
    """
    keyed = {k: cfg.get(k) for k in ("model", "text_encoder", "train")}
    keyed["data"] = data_fingerprint(cfg.get("data", {}))
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:12]


def data_fingerprint(data: dict[str, Any], max_hash_bytes: int = 256 << 20) -> dict[str, Any]:
    """Options as they are; files named in them by content hash (size and mtime beyond ``max_hash_bytes``)."""
    out = {}
    for key, value in sorted(data.items()):
        values = value if isinstance(value, list) else [value]
        prints = []
        for v in values:
            path = Path(str(v))
            if isinstance(v, (str, Path)) and path.is_file():
                stat = path.stat()
                if stat.st_size <= max_hash_bytes:
                    prints.append(sha256_file(path))
                else:
                    prints.append(f"{stat.st_size}:{stat.st_mtime_ns}")
            else:
                prints.append(v)
        out[key] = prints if isinstance(value, list) else prints[0]
    return out


def build_model(kind: str, cfg: dict[str, Any]) -> torch.nn.Module:
    if kind == "tokenizer":
        from ctgen.models.ctvit import CTViT

        return CTViT(CTViT.config_from_dict(cfg["model"]))
    from ctgen.models.conditioned import ConditionedConfig, TextConditioned

    return TextConditioned(ConditionedConfig(core_class=CORE[kind], core=cfg["model"], text_encoder=cfg.get("text_encoder")))


def _text(data: dict, prompts: dict[str, str], max_length: int) -> datasets.TextConditioning:
    return datasets.TextConditioning(prompts, cache_path=data.get("text_cache"), tokenizer_path=data.get("text_tokenizer"),
                                     max_length=max_length)


def run_training(kind: str, cfg: dict[str, Any], out_dir: str | Path, checkpoint_root: str | Path) -> Path:
    """Train one model of the cascade from a config dict; returns the weights folder."""
    from ctgen.train import TrainConfig, train

    if kind in EVAL_MODELS:
        from ctgen import eval_tasks

        run = eval_tasks.train_clip if kind == "clip" else eval_tasks.train_classifier
        return run(cfg, out_dir, checkpoint_root)
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; one of {MODELS + EVAL_MODELS}")
    data, tcfg = cfg["data"], TrainConfig.from_dict(cfg["train"])
    if kind != "tokenizer":
        cfg = _fit_text_dims(cfg)
    torch.manual_seed(tcfg.seed)  # the initial weights are part of the run's reproducibility
    model = build_model(kind, cfg)
    max_length = (cfg.get("text_encoder") or {}).get("max_length", data.get("max_length", 128))
    scale = int(data.get("lowres_scale", 1))
    if kind == "tokenizer":
        make = datasets.volume_batches(datasets.load_volumes(data["manifests"]), tcfg.batch_size, scale)
    elif kind == "generator":
        grids, prompts = datasets.load_tokens(data["tokens"])
        make = datasets.token_batches(grids, _text(data, prompts, max_length), tcfg.batch_size)
    else:
        volumes = datasets.load_volumes(data["manifests"], prompt=data.get("prompt"))
        recon = None
        if data.get("recon"):
            from safetensors.torch import load_file

            recon = load_file(data["recon"])
        prompts = {v["key"]: v["prompt"] for v in volumes}
        make = datasets.slice_batches(volumes, _text(data, prompts, max_length), tcfg.batch_size, scale,
                                      int(data.get("slices_per_volume", 4)), recon)
    checkpoint_dir = Path(checkpoint_root) / config_hash(cfg)
    log.info("training %s: %d parameters; checkpoints in %s", kind, sum(p.numel() for p in model.parameters()), checkpoint_dir)
    return train(model, make, tcfg, out_dir, checkpoint_dir=checkpoint_dir,
                 extra_meta={"model_kind": kind, "data": {k: str(v) for k, v in data.items()}})


def _fit_text_dims(cfg: dict[str, Any]) -> dict[str, Any]:
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
        from ctgen.text_cache import EmbeddingCache

        dim = EmbeddingCache(data["text_cache"]).dim
    else:
        raise ValueError("generator/superres training needs a text source: text_cache, or text_tokenizer with text_encoder")
    if cfg["model"].get("text_dim") != dim:
        log.info("text width %s -> %d (the configured text encoder's)", cfg["model"].get("text_dim"), dim)
        cfg["model"]["text_dim"] = dim
    return cfg


@torch.no_grad()
def encode_tokens(tokenizer_dir: str | Path, manifests: list[str], out_path: str | Path, lowres_scale: int,
                  prompt: str | None = None, recon_path: str | Path | None = None, batch_size: int = 2,
                  device: str = "cpu") -> dict[str, torch.Tensor]:
    """Token grids of every volume with a trained tokenizer (the generator's training data).

    Writes ``out_path`` (safetensors, {key: (t, h, w) int32}) and ``<out>.prompts.json`` ({key: prompt});
    with ``recon_path`` also the tokenizer's reconstructions ({key: (D, h, w) float16 in [-1, 1]}),
    the low-res inputs GenerateCT trained its super-resolution stage on.
    """
    from ctgen.models.ctvit import CTViT

    model = CTViT.from_pretrained(tokenizer_dir, map_location=device).eval()
    volumes = datasets.load_volumes(manifests, prompt=prompt)
    grids, recons = {}, {}
    for i in range(0, len(volumes), batch_size):
        chunk = volumes[i:i + batch_size]
        video = datasets.downsample(torch.stack([v["volume"].float() for v in chunk]), lowres_scale).to(device)
        idx = model.encode(video)  # (B, t, h, w)
        if recon_path:
            rec = model.decode(idx, num_slices=video.shape[2])  # (B, 1, D, h, w)
        for j, v in enumerate(chunk):
            grids[v["key"]] = idx[j].to(torch.int32).cpu().contiguous()
            if recon_path:
                recons[v["key"]] = rec[j, 0].clamp(-1, 1).half().cpu().contiguous()
    out_path = Path(out_path)
    atomic_write(out_path, lambda p: save_file(grids, p))
    atomic_write(out_path.with_suffix(".prompts.json"),
            lambda p: Path(p).write_text(json.dumps({v["key"]: v["prompt"] for v in volumes}, indent=1)))
    if recon_path:
        atomic_write(Path(recon_path), lambda p: save_file(recons, p))
    log.info("encoded %d volumes to token grids of shape %s", len(grids), tuple(next(iter(grids.values())).shape))
    return grids


def _prompt_texts(prompts_parquet: str | Path, column: str, splits: list[str] | None = None) -> dict[str, str]:
    import pandas as pd

    table = pd.read_parquet(prompts_parquet)
    if column not in table.columns:
        raise ValueError(f"{prompts_parquet} has no prompt column {column!r}; it has {list(table.columns[2:])}")
    if splits:
        table = table[table["split"].isin(splits)]
    return {volume_key(name): text for name, text in zip(table["VolumeName"], table[column])}


def fit_text_tokenizer(prompts_parquet: str | Path, column: str, out_path: str | Path, vocab_size: int,
                       splits: list[str] | None = ("train",)) -> Path:
    """The small encoder's tokenizer, fitted on the training split's prompts (never on held-out text)."""
    from ctgen.models.text_encoders import fit_text_tokenizer as fit

    texts = sorted(set(_prompt_texts(prompts_parquet, column, list(splits) if splits else None).values()))
    fit(texts, vocab_size, out_path)
    log.info("fitted a %d-token vocabulary on %d distinct prompts", vocab_size, len(texts))
    return Path(out_path)


def embed_prompts(prompts_parquet: str | Path, column: str, encoder_cfg: dict, out_path: str | Path) -> Path:
    """A frozen encoder's states for every prompt of the cohort, computed once and cached."""
    from ctgen.models.text_encoders import build_text_encoder
    from ctgen.text_cache import encode_prompts

    encoder = build_text_encoder(encoder_cfg)
    if encoder is None:
        raise ValueError("text_encoder.kind 'small' is trained with the model: there is nothing to cache")
    return encode_prompts(encoder, _prompt_texts(prompts_parquet, column), out_path)


def write_config(cfg: dict[str, Any], path: str | Path) -> Path:
    """A training config as YAML (what ``ctgen train --config`` reads), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: Path(p).write_text(yaml.safe_dump(cfg, sort_keys=False)))
    return path
