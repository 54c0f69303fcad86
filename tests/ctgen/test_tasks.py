"""The cascade's training jobs end to end on tiny shards: tokenizer -> tokens -> generator, super-resolution."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from ctgen.jobs.config import config_hash, load_config, write_config
from ctgen.jobs.text import fit_text_tokenizer
from ctgen.data.stream import iter_raw_samples
from ctgen.jobs.tokens import encode_tokens
from ctgen.jobs.train import run_training
from ctgen.cli import main as ctgen_main

from tests.ctgen.tiny import GENERATOR, SUPERRES, TEXT, TOKENIZER, TRAIN, WINDOW


def test_cascade_trains_from_the_command_line(cohort, tmp_path):
    cfg_path = tmp_path / "tokenizer.yaml"
    cfg_path.write_text(yaml.safe_dump({"model": TOKENIZER, "train": TRAIN, "data": {"lowres_scale": 2, "hu_window": WINDOW}}))
    assert ctgen_main(["train", "tokenizer", "--config", str(cfg_path), "--manifests", cohort["manifest"],
                       "--out", str(tmp_path / "tokenizer"), "--checkpoints", str(tmp_path / "ckpt")]) == 0
    assert (tmp_path / "tokenizer" / "model.safetensors").is_file()
    meta = json.loads((tmp_path / "tokenizer" / "config.json").read_text())
    assert meta["provenance"]["seed"] == 0 and meta["config"]["codebook_size"] == 32

    tokens = encode_tokens(tmp_path / "tokenizer", cohort["manifest"], tmp_path / "tokens", 2, WINDOW, recon=True)
    assert json.loads(tokens.read_text())["format"]["codebook_size"] == 32  # the generator's training checks it
    samples = dict(iter_raw_samples(tokens))
    assert len(samples) == 6 and all(s["tokens.npy"].shape == (5, 2, 2) for s in samples.values())
    assert all(s["recon.npy"].shape == (8, 8, 8) and s["recon.npy"].dtype == np.float16 for s in samples.values())
    assert samples["train_1_a_1"]["prompts.json"]["generatect"].endswith("right pleural effusion.")

    fit_text_tokenizer(cohort["prompts"], "generatect", tmp_path / "text.json", vocab_size=120)
    for kind, model in (("generator", GENERATOR), ("superres", SUPERRES)):
        cfg = {"model": model, "text_encoder": TEXT, "train": TRAIN,
               "data": {"lowres_scale": 2, "prompt": "generatect", "slices_per_volume": 2, "hu_window": WINDOW}}
        path = tmp_path / f"{kind}.yaml"
        write_config(cfg, path)
        flags = ["--tokens", str(tokens)] if kind == "generator" else \
            ["--manifests", cohort["manifest"], "--recon", str(tokens)]
        assert ctgen_main(["train", kind, "--config", str(path), *flags, "--text-tokenizer", str(tmp_path / "text.json"),
                           "--out", str(tmp_path / kind), "--checkpoints", str(tmp_path / "ckpt")]) == 0
        saved = json.loads((tmp_path / kind / "config.json").read_text())
        assert saved["config"]["core"]["text_dim"] == TEXT["dim"]  # fitted to the encoder actually used
        assert saved["config"]["text_encoder"]["vocab_size"] <= 120
        metrics = pd.read_csv(tmp_path / kind / "metrics.csv")
        assert metrics["step"].max() == TRAIN["max_steps"] and np.isfinite(metrics["loss"]).all()


@pytest.mark.parametrize("codes", [16, 64])
def test_a_generator_codebook_other_than_the_tokenizers_is_refused_before_training(cohort, tmp_path, codes, capsys):
    """A smaller codebook failed mid-training (an IndexError; on a GPU a device-side assert), a larger one trained a
    generator that sampling refuses: both are one line before step 0, naming both sizes."""
    from ctgen.data.derived import write_derived

    rng = np.random.default_rng(0)
    samples = ({"__key__": key, "tokens.npy": rng.integers(0, 32, (5, 2, 2)).astype(np.int16),
                "prompt.txt": raw["prompt.txt"], "prompts.json": raw["prompts.json"], "labels.npy": raw["labels.npy"]}
               for key, raw in iter_raw_samples(cohort["manifest"]))
    tokens = write_derived(cohort["manifest"], samples, tmp_path / "tokens", "tokens", "tokenizer@0", {},
                           describe={"codebook_size": 32})
    fit_text_tokenizer(cohort["prompts"], "generatect", tmp_path / "text.json", vocab_size=120)
    path = tmp_path / "generator.yaml"
    write_config({"model": {**GENERATOR, "codebook_size": codes}, "text_encoder": TEXT, "train": TRAIN,
                  "data": {"lowres_scale": 2, "prompt": "generatect", "hu_window": WINDOW}}, path)
    assert ctgen_main(["train", "generator", "--config", str(path), "--tokens", str(tokens), "--text-tokenizer",
                       str(tmp_path / "text.json"), "--out", str(tmp_path / "generator"),
                       "--checkpoints", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"model.codebook_size {codes} differs from the 32 codes of the tokenizer that made {tokens}" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "ckpt").exists()


def test_config_hash_separates_runs(tmp_path):
    x, y = tmp_path / "x.json", tmp_path / "y.json"
    x.write_text("{}")
    y.write_text("{}")
    a = {"model": {"dim": 8}, "train": {"lr": 1e-3}, "data": {"manifests": [str(x)]}}
    b = {**a, "train": {"lr": 2e-3}}
    c = {**a, "data": {"manifests": [str(y)]}}  # another path to the same data: the same run
    assert config_hash(a) != config_hash(b)
    assert config_hash(a) == config_hash(c)
    y.write_text('{"shards": 1}')  # new data (Snakemake reran the job for it): a fresh run, not a resume
    assert config_hash(a) != config_hash(c)


def test_the_run_of_a_model_that_reads_no_text_is_named_by_what_it_reads(tmp_path):
    """Shards written again with other prompts leave the tokenizer's, the autoencoder's, the classifier's and SliceNet's
    checkpoint folder as it was (an interrupted training resumes after a template edit), not CLIP's; other labels move
    the classifier's and SliceNet's alone (SHARD_READS)."""
    from ctprep.shards import write_shards

    def manifest(name, prompt="no effusion", label=0):
        vol = {"key": "train_1_a_1", "volume": _volume(), "prompt": prompt, "prompts": {"findings": prompt},
               "meta": {}, "labels": [label] + [0] * 17}
        write_shards([vol], tmp_path / name, "train", shard_size=1, split="train")
        return str(tmp_path / name / "train.manifest.json")

    base, prompt, label = manifest("a"), manifest("b", prompt="effusion"), manifest("c", label=1)

    def run(kind, path):
        return config_hash({"model": {"dim": 8}, "train": {"lr": 1e-3}, "data": {"manifests": [path]}}, kind)

    for kind in ("tokenizer", "autoencoder"):
        assert run(kind, base) == run(kind, prompt) == run(kind, label)
    for kind in ("classifier", "slicenet"):
        assert run(kind, base) == run(kind, prompt) != run(kind, label)
    assert len({run("clip", p) for p in (base, prompt, label)}) == 3


def _volume():
    from ctprep.volume import Volume

    return Volume.from_3d(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), np.diag([0.7, 0.7, 1.5, 1.0]))


def test_bad_training_config_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": {}}))
    with pytest.raises(ValueError, match="needs `model` and `train`"):
        load_config(path)
    with pytest.raises(ValueError, match="unknown model"):
        run_training("vae", {"model": {}, "train": {}, "data": {}}, tmp_path, tmp_path)
