"""Shared fixtures of the model tests: tiny shards and a tiny trained cascade."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ctprep.shards import merge_manifests, write_shards
from ctprep.volume import Volume

from tests.ctgen.tiny import GENERATOR, SUPERRES, TEXT, TOKENIZER, TRAIN, WINDOW


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models: thread start-up and contention cost more than the maths (50x on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
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



@pytest.fixture(scope="session")
def tiny_cascade(cohort, tmp_path_factory):
    """The three models trained for a few steps on the tiny cohort, with cascade.json: a sampling-ready folder."""
    from ctgen.jobs.text import fit_text_tokenizer
    from ctgen.jobs.tokens import encode_tokens
    from ctgen.jobs.train import run_training
    from ctgen.pipelines.text_to_ct import write_cascade, write_sampling_defaults

    out = tmp_path_factory.mktemp("cascade")
    models = out / "models"
    data = {"lowres_scale": 2, "prompt": "generatect", "slices_per_volume": 2, "hu_window": WINDOW}
    run_training("tokenizer", {"model": TOKENIZER, "train": TRAIN, "data": {**data, "manifests": [cohort["manifest"]]}},
                       models / "tokenizer", out / "ckpt")
    tokens = encode_tokens(models / "tokenizer", cohort["manifest"], out / "tokens", 2, WINDOW)
    fit_text_tokenizer(cohort["prompts"], "generatect", out / "text.json", vocab_size=120)
    text = {"text_tokenizer": str(out / "text.json")}
    run_training("generator", {"model": GENERATOR, "text_encoder": TEXT, "train": TRAIN,
                                     "data": {**data, **text, "tokens": str(tokens)}},
                       models / "generator", out / "ckpt")
    run_training("superres", {"model": SUPERRES, "text_encoder": TEXT, "train": TRAIN,
                                    "data": {**data, **text, "manifests": [cohort["manifest"]]}},
                       models / "superres", out / "ckpt")
    preset = {"spacing": [2.0, 2.0, 5.0], "shape": [16, 16, 8], "clip": [-1000, 1000]}
    models_cfg = {"lowres_scale": 2, "prompt": "generatect",
                  "text_encoder": {"kind": "small", "path": None, "max_length": TEXT["max_length"]}}
    write_cascade(models, preset, models_cfg, text_tokenizer=out / "text.json",
                  prompt_templates={"generatect": "{age} years old {sex}: {impression}"})
    write_sampling_defaults(models, {"steps": 3, "guidance_scale": 2.0, "temperature": 1.0})
    return models


@pytest.fixture()
def decoded_keys(monkeypatch) -> list[str]:
    """The keys of the shard volumes decoded while the test runs (``ctgen.data.shards.volume_decoder`` counted)."""
    from ctgen.data import shards

    decoded, decode = [], shards.volume_decoder

    def counting(key, data):
        out = decode(key, data)
        if out is not None:
            decoded.append(key)
        return out

    monkeypatch.setattr(shards, "volume_decoder", counting)
    return decoded
