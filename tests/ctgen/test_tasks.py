"""The cascade's training jobs end to end on tiny shards: tokenizer -> tokens -> generator, super-resolution."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from ctgen import tasks
from ctgen.cli import main as ctgen_main
from ctprep.shards import merge_manifests, write_shards
from ctprep.volume import Volume

TRAIN = {"max_steps": 4, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "ckpt_every": 2, "log_every": 1,
         "tensorboard": False, "seed": 0}
TOKENIZER = {"image_size": 8, "num_slices": 8, "patch_size": 4, "temporal_patch_size": 2, "dim": 32,
             "spatial_depth": 1, "temporal_depth": 1, "heads": 2, "dim_head": 16, "ff_mult": 2.0, "codebook_size": 32,
             "codebook_dim": 16, "adversarial_start": 2, "disc_dim": 8, "disc_layers": 1, "disc_slices": 2}
GENERATOR = {"codebook_size": 32, "dim": 32, "depth": 1, "heads": 2, "dim_head": 16, "ff_mult": 2, "text_dim": 999,
             "max_t": 5, "max_h": 2, "max_w": 2, "cond_drop_prob": 0.5}
SUPERRES = {"in_size": 8, "out_size": 16, "patch_size": 1, "channels": 16, "channel_mult": [1, 2], "layers_per_block": 1,
            "attention_levels": [1], "attention_head_dim": 8, "norm_groups": 4, "text_dim": 999, "cross_attention_dim": 16,
            "sample_steps": 2, "sampler": "ddim"}
TEXT = {"dim": 16, "depth": 1, "heads": 2, "dropout": 0.0, "max_length": 32}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """6 smooth int16 HU volumes (16 x 16 x 8 voxels, anisotropic affine) in shards, with prompts."""
    root = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(np.linspace(-1, 1, 8), np.linspace(-1, 1, 16), np.linspace(-1, 1, 16), indexing="ij")
    samples, rows = [], []
    for i in range(6):
        blob = np.exp(-((x - rng.uniform(-.5, .5)) ** 2 + (y - rng.uniform(-.5, .5)) ** 2 + z ** 2) * 3)
        hu = (-1000 + 1100 * blob).transpose(2, 1, 0).astype(np.int16)  # (I, J, K)
        vol = Volume.from_3d(hu, np.diag([2.0, 2.0, 5.0, 1.0]), source=f"v{i}")
        prompt = f"{50 + i} years old female: {'right pleural effusion' if i % 2 else 'no acute findings'}."
        samples.append({"key": f"train_{i}_a_1", "volume": vol, "prompt": prompt, "prompts": {"generatect": prompt},
                        "meta": {}, "labels": np.zeros(18, np.uint8)})
        rows.append({"VolumeName": f"train_{i}_a_1.nii.gz", "split": "train", "generatect": prompt})
    write_shards(samples, root / "c000", prefix="train-c000", shard_size=3, split="train")
    manifest = root / "manifest.json"
    merge_manifests([root / "c000" / "train-c000.manifest.json"], manifest, split="train")
    prompts = root / "prompts.parquet"
    pd.DataFrame(rows).to_parquet(prompts)
    return {"root": root, "manifest": str(manifest), "prompts": str(prompts)}


def test_cascade_trains_from_the_command_line(cohort, tmp_path):
    torch.set_num_threads(1)
    root = cohort["root"]
    cfg_path = tmp_path / "tokenizer.yaml"
    cfg_path.write_text(yaml.safe_dump({"model": TOKENIZER, "train": TRAIN, "data": {"lowres_scale": 2}}))
    assert ctgen_main(["train", "tokenizer", "--config", str(cfg_path), "--manifests", cohort["manifest"],
                       "--out", str(tmp_path / "tokenizer"), "--checkpoints", str(tmp_path / "ckpt")]) == 0
    assert (tmp_path / "tokenizer" / "model.safetensors").is_file()
    meta = json.loads((tmp_path / "tokenizer" / "config.json").read_text())
    assert meta["provenance"]["seed"] == 0 and meta["config"]["codebook_size"] == 32

    grids = tasks.encode_tokens(tmp_path / "tokenizer", [cohort["manifest"]], tmp_path / "tokens.safetensors", 2,
                                prompt="generatect", recon_path=tmp_path / "recon.safetensors")
    assert len(grids) == 6 and all(g.shape == (5, 2, 2) for g in grids.values())
    prompts = json.loads((tmp_path / "tokens.prompts.json").read_text())
    assert prompts["train_1_a_1"].endswith("right pleural effusion.")

    tasks.fit_text_tokenizer(cohort["prompts"], "generatect", tmp_path / "text.json", vocab_size=120)
    for kind, model in (("generator", GENERATOR), ("superres", SUPERRES)):
        cfg = {"model": model, "text_encoder": TEXT, "train": TRAIN,
               "data": {"lowres_scale": 2, "prompt": "generatect", "slices_per_volume": 2}}
        path = tmp_path / f"{kind}.yaml"
        tasks.write_config(cfg, path)
        flags = ["--tokens", str(tmp_path / "tokens.safetensors")] if kind == "generator" else \
            ["--manifests", cohort["manifest"], "--recon", str(tmp_path / "recon.safetensors")]
        assert ctgen_main(["train", kind, "--config", str(path), *flags, "--text-tokenizer", str(tmp_path / "text.json"),
                           "--out", str(tmp_path / kind), "--checkpoints", str(tmp_path / "ckpt")]) == 0
        saved = json.loads((tmp_path / kind / "config.json").read_text())
        assert saved["config"]["core"]["text_dim"] == TEXT["dim"]  # fitted to the encoder actually used
        assert saved["config"]["text_encoder"]["vocab_size"] <= 120
        metrics = pd.read_csv(tmp_path / kind / "metrics.csv")
        assert metrics["step"].max() == TRAIN["max_steps"] and np.isfinite(metrics["loss"]).all()


def test_config_hash_separates_runs():
    a = {"model": {"dim": 8}, "train": {"lr": 1e-3}, "data": {"manifests": ["x"]}}
    b = {**a, "train": {"lr": 2e-3}}
    c = {**a, "data": {"manifests": ["y"]}}  # data paths do not change what the checkpoint holds
    assert tasks.config_hash(a) != tasks.config_hash(b)
    assert tasks.config_hash(a) == tasks.config_hash(c)


def test_bad_training_config_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": {}}))
    with pytest.raises(ValueError, match="needs `model` and `train`"):
        tasks.load_config(path)
    with pytest.raises(ValueError, match="unknown model"):
        tasks.run_training("vae", {"model": {}, "train": {}, "data": {}}, tmp_path, tmp_path)
