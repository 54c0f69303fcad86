"""Training-job configs: reading and writing them, the model presets of ``config.yaml``, and run hashes.

One ``ctgen train MODEL --config FILE`` run reads a YAML/JSON file of the form::

    model: {...}            # the model's config fields (CTViTConfig, MaskGITConfig, SuperResConfig, ...)
    text_encoder: {...}     # generator/superres/clip: SmallTextEncoderConfig fields when trained jointly; absent: cached states
    train: {...}            # TrainConfig fields (ctgen/training/loop.py)
    data:                   # inputs; paths may also come as command-line flags
      manifests: [...]      # tokenizer, superres, clip, classifier: shard manifests of the training split
      tokens: PATH          # generator: the encode_tokens output
      text_cache: PATH      # a frozen encoder's cached prompt states (or text_tokenizer: PATH)
      hu_window: [lo, hi]   # the prep preset's HU window (its `clip`), mapped to [-1, 1]
      lowres_scale: 2       # in-plane factor between the shards' grid and the tokenizer's grid
      prompt: generatect    # which prompt template conditions the models
      slices_per_volume: 4  # superres: random slices per volume and epoch
      recon: PATH           # superres: tokenizer reconstructions as low-res inputs (else downsampled slices)
      augment: {...}        # clip, classifier: see ctgen.data.batches.Augment

Model presets live only in ``config.yaml`` (``model_presets``); :func:`model_preset` reads one for
scripts and benchmarks that run outside the workflow.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from ctprep.errors import read_text
from ctprep.intensity import check_window
from ctprep.shards import VOLUME_MEMBER, content_digest, sha256_file
from ctprep.volume import atomic_write

#: config.yaml at the root of a source checkout (benchmarks and tests read presets from it)
REPO_CONFIG = Path(__file__).resolve().parents[2] / "config.yaml"


#: The sections a training config may hold (what the training jobs read; the workflow's rule train_config writes
#: these): a misspelt one (``trian:``) was ignored and every setting in it left at its default
SECTIONS = ("model", "train", "data", "text_encoder", "maisi_checkpoint")


def load_config(path: str | Path) -> dict[str, Any]:
    """A training config from YAML/JSON; names the file and the problem when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training config {path} does not exist")
    text = read_text(path)  # names the file where it is not UTF-8 text
    try:
        cfg = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from None
    if not isinstance(cfg, dict) or "model" not in cfg or "train" not in cfg:
        raise ValueError(f"{path}: a training config needs `model` and `train` sections")
    unknown = sorted(map(str, set(cfg) - set(SECTIONS)))
    if unknown:
        raise ValueError(f"{path}: unknown section{'s' * (len(unknown) > 1)} {', '.join(unknown)} (a training config "
                         f"has {', '.join(SECTIONS)})")
    cfg.setdefault("data", {})
    return cfg


def write_config(cfg: dict[str, Any], path: str | Path) -> Path:
    """A training config as YAML (what ``ctgen train --config`` reads), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: Path(p).write_text(yaml.safe_dump(cfg, sort_keys=False)))
    return path


def model_preset(name: str, model: str, config: str | Path = REPO_CONFIG) -> dict[str, Any]:
    """A deep copy of ``model_presets.<name>.<model>`` of ``config`` (default: the checkout's config.yaml)."""
    presets = yaml.safe_load(Path(config).read_text())["model_presets"]
    if name not in presets:
        raise KeyError(f"no model preset {name!r} in {config}; it has {sorted(presets)}")
    if model not in presets[name]:
        raise KeyError(f"model preset {name!r} has no {model!r}; it has {sorted(presets[name])}")
    return json.loads(json.dumps(presets[name][model]))


def flow_text_encoders(models_cfg: dict[str, Any], preset: dict[str, Any]) -> list[dict[str, Any]]:
    """The latent flow family's text encoders, in order: ``models.latent_flow_text_encoders``, else the
    cascade's ``models.text_encoder``; each with ``path`` and ``max_length`` filled in.

    ``max_length``: an entry's own; else the preset's ``latent_flow.model.max_text_tokens`` where it sets one,
    the cascade's ``max_length`` otherwise. Why the preset's: the flow reads whole report sections (CT-RATE findings,
    median 319 tokens, state most positive findings past token 128), not the cascade's short prompts, and a preset
    that gives each section 256 context rows means 256 tokens of it: with the cascade's 128 the paper preset read
    half the findings it was sized for and padded the other half of every slot.

    Several encoders are Report2CT's conditioning, their pooled states concatenated: refused (``ValueError``,
    one line naming the keys) with the small trainable encoder among them, or unless the model preset's
    ``latent_flow.model.text_pooling`` is ``mean``.
    """
    tokens = preset.get("latent_flow", {}).get("model", {}).get("max_text_tokens")
    default = {"path": None, "max_length": int(tokens or models_cfg["text_encoder"]["max_length"])}
    own = models_cfg.get("latent_flow_text_encoders")
    if own:
        encoders = [{**default, **enc} for enc in own]
    else:  # the cascade's encoder, reading as many tokens of a section as the preset sizes its slot for
        encoders = [{**models_cfg["text_encoder"], "path": models_cfg["text_encoder"].get("path"),
                     "max_length": default["max_length"]}]
    if len(encoders) > 1:
        if any(e["kind"] == "small" for e in encoders):
            raise ValueError("models.latent_flow_text_encoders: the small trainable encoder is used alone, not among several")
        pooling = preset.get("latent_flow", {}).get("model", {}).get("text_pooling")
        if pooling != "mean":
            raise ValueError(f"models.latent_flow_text_encoders lists {len(encoders)} encoders: the preset's "
                             f"latent_flow.model.text_pooling must be mean (their pooled states concatenated), "
                             f"not {pooling!r}")
    return encoders


#: The volume-shard members that the trainings reading no text use (of what batches.volume_decode decodes, their
#: collates take these): the workflow retrains these models when those members change (ctprep.shards.content_digest),
#: not when the shards are written again with other prompts, reports or metadata; their checkpoints are named by the
#: same digest (config_hash), so such a rewrite does not restart an interrupted training
SHARD_READS = {"tokenizer": (VOLUME_MEMBER,), "autoencoder": (VOLUME_MEMBER,),
               "classifier": (VOLUME_MEMBER, "labels.npy"), "slicenet": (VOLUME_MEMBER, "labels.npy")}


def config_hash(cfg: dict[str, Any], kind: str | None = None) -> str:
    """Short hash of a run's model+train+text config and of its data files' contents.

    The checkpoint folder is named by it, so an interrupted job (Slurm time limit, pre-emption)
    resumes, while a job rerun because its config or its input data changed starts afresh. The
    training fields of ``RUN_ONLY`` (logging, checkpoint frequency, data workers, device) are left out:
    an edit of those resumes (changed a worker count, the data order of the rest is re-planned). ``kind``: a model
    of :data:`SHARD_READS` weighs its shard manifests by what it reads of them.
    """
    from ctgen.training.loop import RUN_ONLY

    keyed = {k: cfg.get(k) for k in ("model", "text_encoder", "train")}
    if isinstance(keyed["train"], dict):  # how the run works (logging, workers, device) is no other run
        keyed["train"] = {k: v for k, v in keyed["train"].items() if k not in RUN_ONLY}
    data = dict(cfg.get("data") or {})
    manifests = data.pop("manifests", None) if kind in SHARD_READS else None
    keyed["data"] = data_fingerprint(data)
    if manifests:  # what it reads of its shards, not their files (SHARD_READS)
        paths = manifests if isinstance(manifests, (list, tuple)) else [manifests]
        keyed["data"]["manifests"] = {"reads": content_digest(paths, SHARD_READS[kind])}
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


def hu_window(data: dict[str, Any]) -> tuple[float, float]:
    """The prep preset's HU window from a training config's ``data.hu_window``; named when absent."""
    window = data.get("hu_window")
    if window is None or len(window) != 2:
        raise ValueError("the training config needs data.hu_window: [low, high], the prep preset's HU `clip` window")
    check_window(float(window[0]), float(window[1]))
    return float(window[0]), float(window[1])


#: what each data key's manifests must list: volume shards (None) or a kind of derived shards
MANIFEST_KINDS = {"manifests": None, "tokens": "tokens", "recon": "tokens", "latents": "latents",
                  "probe_latents": "latents"}


def data_manifests(data: dict[str, Any], key: str) -> list[str]:
    """The shard manifests a training config's ``data.<key>`` names (one path or a list); named when absent, and
    when one lists other shards than the key reads (token shards given as volume shards, or the reverse)."""
    from ctgen.data.derived import is_derived, load_derived

    value = data.get(key)
    if not value:
        raise ValueError(f"the training config needs data.{key}: shard manifests")
    paths = [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    want = MANIFEST_KINDS.get(key, "any")
    for path in paths if want != "any" else ():
        if not Path(path).is_file():
            continue  # named by the reader, or by the CLI's check of input files
        kind = load_derived(path)["format"].get("kind") if is_derived(path) else None
        if kind != want:
            raise ValueError(f"data.{key}: {path} lists {kind or 'volume'} shards, where {want or 'volume'} shards "
                             "are expected")
    return paths
