"""Text encoders (frozen HF, MiniLM, small trainable + its tokenizer) and the embedding cache."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ctgen.models.text_encoders import (FrozenHFTextEncoder, ReportTokenizer, SmallTextEncoder,
                                        SmallTextEncoderConfig, TextEncoding, build_text_encoder,
                                        fit_text_tokenizer, minilm_encoder)
from ctgen.data.text_cache import EmbeddingCache, encode_prompts

REPORTS = [
    "No pleural effusion. The lungs are clear.",
    "Small right pleural effusion with adjacent atelectasis.",
    "Bilateral ground-glass opacities, more pronounced in the lower lobes.",
    "Cardiomegaly. No pneumothorax. Degenerative changes of the thoracic spine.",
    "A 6 mm nodule in the right upper lobe; follow-up CT recommended.",
    "Emphysema in both upper lobes. No consolidation.",
]


@pytest.fixture(scope="module")
def minilm() -> FrozenHFTextEncoder:
    return minilm_encoder(max_length=64, device="cpu")


class Counting:
    """Wraps a frozen encoder and records every text it is asked to encode."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []
        self.identity, self.max_length, self.dim = inner.identity, inner.max_length, inner.dim
        self.count_tokens = inner.count_tokens

    def encode(self, texts, batch_size=32):
        self.seen.extend(texts)
        return self.inner.encode(texts, batch_size=batch_size)


# --- frozen encoders ------------------------------------------------------------------------------


def test_minilm_shapes_and_mask(minilm):
    texts = ["no pleural effusion", "pleural effusion", REPORTS[3]]
    enc = minilm.encode(texts, batch_size=2)
    tok = minilm.tokenizer(texts, padding="longest", truncation=True, max_length=64, return_tensors="pt")
    assert isinstance(enc, TextEncoding) and minilm.dim == 384
    assert enc.hidden.shape == (3, tok["input_ids"].shape[1], 384) and enc.hidden.dtype == torch.float32
    assert torch.equal(enc.mask, tok["attention_mask"].bool())
    assert torch.all(enc.hidden[~enc.mask] == 0)  # zeros at padding
    assert enc.hidden[enc.mask].abs().sum(-1).min() > 0
    # negation changes the token states, not only their count
    neg, pos = enc.hidden[0, enc.mask[0]], enc.hidden[1, enc.mask[1]]
    assert neg.shape[0] == pos.shape[0] + 1
    assert not torch.allclose(neg[-3:], pos[-3:], atol=1e-2)


def test_minilm_padding_invariance_and_truncation(minilm):
    short, long = "pleural effusion", " ".join(REPORTS)
    alone = minilm.encode([short]).hidden[0]
    batched = minilm.encode([long, short]).hidden
    n = alone.shape[0]
    kept = " ".join(REPORTS[:3]) + " Cardiomegaly. No pneumothorax."  # the whole sentences that fit in 64 tokens
    assert batched.shape[1] == minilm.count_tokens(kept) <= 64 < minilm.count_tokens(" ".join(REPORTS[:4]))
    assert minilm.count_tokens(short) == n and minilm.count_tokens(long) > 64  # counted before truncation
    torch.testing.assert_close(batched[1, :n], alone, atol=1e-5, rtol=0)
    assert torch.all(batched[1, n:] == 0)
    # batch order does not matter either
    torch.testing.assert_close(minilm.encode([short, long], batch_size=1).hidden, batched[[1, 0]], atol=1e-5, rtol=0)
    # the caller's autocast does not leak in: cached states do not depend on the precision context
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(minilm.encode([short]).hidden[0], alone, atol=1e-6, rtol=0)


def test_minilm_frozen(minilm):
    assert not any(p.requires_grad for p in minilm.model.parameters())
    assert not minilm.model.training
    enc = minilm.encode(["no pneumothorax"])
    assert not enc.hidden.requires_grad and enc.hidden.grad_fn is None
    assert "max_length=64" in minilm.identity and str(minilm.path) in minilm.identity
    with pytest.raises(TypeError):
        minilm.encode("a single string")


def test_tiny_t5_loads_encoder_only(tmp_path, minilm):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    vocab = len(minilm.tokenizer)
    cfg = T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   pad_token_id=0, decoder_start_token_id=0)
    T5EncoderModel(cfg).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm.path / name, tmp_path / name)
    enc = build_text_encoder({"kind": "hf", "path": str(tmp_path), "max_length": 16}, device="cpu")
    assert type(enc.model).__name__ == "T5EncoderModel" and enc.dim == 32
    out = enc.encode(["no pleural effusion", "pleural effusion"])
    n = [len(minilm.tokenizer(t)["input_ids"]) for t in ("no pleural effusion", "pleural effusion")]
    assert out.hidden.shape == (2, n[0], 32) and out.mask.sum(1).tolist() == n
    alone = enc.encode(["pleural effusion"]).hidden[0]
    assert alone.shape == (n[1], 32)
    torch.testing.assert_close(out.hidden[1, :n[1]], alone, atol=1e-5, rtol=0)
    # identity changes with max_length and with the weights on disk
    other = FrozenHFTextEncoder(tmp_path, max_length=8, device="cpu")
    assert other.identity != enc.identity
    before = enc.identity
    (tmp_path / "extra.json").write_text("{}")
    assert FrozenHFTextEncoder(tmp_path, max_length=16, device="cpu").identity != before
    # other weights of the same architecture (the same file sizes), as a fine-tuned checkpoint: another identity
    before = FrozenHFTextEncoder(tmp_path, max_length=16, device="cpu").identity
    torch.manual_seed(1)
    T5EncoderModel(cfg).save_pretrained(tmp_path)
    assert FrozenHFTextEncoder(tmp_path, max_length=16, device="cpu").identity != before


def _tiny_t5(folder, minilm, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(minilm.tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                   pad_token_id=0, decoder_start_token_id=0)
    T5EncoderModel(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm.path / name, folder / name)


def test_a_spec_rebuilds_the_encoder_the_cache_was_made_with_or_refuses(tmp_path, minilm):
    """The spec records how the encoder was loaded (dtype) and the identity of the cached states the network was
    trained on; weights replaced in the folder since are refused at rebuild, not silently conditioned on, and the
    folder may move (the identity's key holds no path)."""
    from ctgen.models.text_encoders import identity_key, spec_entry

    folder = tmp_path / "enc"
    _tiny_t5(folder, minilm, 0)
    cfg = {"kind": "hf", "path": str(folder), "max_length": 16, "dtype": "bfloat16"}
    cache = EmbeddingCache(encode_prompts(build_text_encoder(cfg, device="cpu"), {"a": REPORTS[0]},
                                          tmp_path / "c.safetensors"))
    entry = spec_entry(cfg, tmp_path, cache.identity)
    assert entry["dtype"] == "bfloat16" and entry["cache_identity"] == identity_key(cache.identity)
    assert str(folder) not in entry["cache_identity"] and "dtype=bfloat16" in entry["cache_identity"]
    assert build_text_encoder(entry, device="cpu").dtype == torch.bfloat16  # as the cache was made
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    assert build_text_encoder({**entry, "path": str(moved)}, device="cpu") is not None
    _tiny_t5(folder, minilm, 1)  # other weights of the same architecture, in place
    with pytest.raises(ValueError, match="not the one the model was trained on"):
        build_text_encoder(entry, device="cpu")
    with pytest.raises(ValueError, match="not the one the model was trained on"):
        build_text_encoder({**entry, "path": str(moved), "dtype": "float32"}, device="cpu")  # other precision


def _tiny_bert(folder, minilm, tokenizer: bool = True):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(minilm.tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json") if tokenizer else ():
        shutil.copy(minilm.path / name, folder / name)


def test_a_folder_without_its_tokenizer_files_is_refused(tmp_path, minilm):
    """config.json and weights but no tokenizer files (an incomplete download) loaded an empty 5-token tokenizer:
    every word [UNK], "left" and "right pleural effusion" the same states, and no error or warning."""
    _tiny_bert(tmp_path / "complete", minilm)
    enc = build_text_encoder({"kind": "hf", "path": str(tmp_path / "complete"), "max_length": 16}, device="cpu")
    assert enc.dim == 32
    _tiny_bert(tmp_path / "notok", minilm, tokenizer=False)
    with pytest.raises(ValueError, match=r"notok: its tokenizer \(5 tokens.*lacks its tokenizer files") as err:
        build_text_encoder({"kind": "hf", "path": str(tmp_path / "notok"), "max_length": 16}, device="cpu")
    assert "\n" not in str(err.value)


def test_build_text_encoder_errors(tmp_path):
    assert build_text_encoder({"kind": "small", "max_length": 32}) is None
    with pytest.raises(ValueError, match="unknown text encoder kind"):
        build_text_encoder({"kind": "clip"})
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_text_encoder({"kind": "hf", "path": "google/t5-v1_1-xl"})
    with pytest.raises(ValueError, match="needs 'path'"):
        build_text_encoder({"kind": "hf"})
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        FrozenHFTextEncoder(tmp_path / "missing")


# --- small trainable encoder ----------------------------------------------------------------------


def test_report_tokenizer_round_trip(tmp_path):
    tok = fit_text_tokenizer(REPORTS * 3, vocab_size=200, path=tmp_path / "tok.json")
    again = fit_text_tokenizer(REPORTS * 3, vocab_size=200, path=tmp_path / "tok2.json")
    assert (tmp_path / "tok.json").read_text() == (tmp_path / "tok2.json").read_text()  # deterministic fit
    loaded = ReportTokenizer.load(tmp_path / "tok.json")
    assert loaded.vocab_size == tok.vocab_size <= 200
    texts = ["NO Pleural effusion.", "small right pleural effusion with adjacent atelectasis", "zebra"]
    ids, mask = tok.encode_batch(texts, max_length=32)
    ids2, mask2 = loaded.encode_batch(texts, max_length=32)
    assert torch.equal(ids, ids2) and torch.equal(mask, mask2) and ids.dtype == torch.long
    lower, _ = tok.encode_batch(["no pleural effusion."], 32)
    assert torch.equal(ids[0, :lower.shape[1]], lower[0]) and not mask[0, lower.shape[1]:].any()  # lowercased
    lengths = mask.sum(1)
    assert torch.all(ids[~mask] == 0) and torch.all(ids[:, 0] == loaded._tok.token_to_id("[CLS]"))
    assert torch.all(ids[torch.arange(3), lengths - 1] == loaded.sep_id)
    assert loaded._tok.token_to_id("[UNK]") in ids[2].tolist()  # unseen word
    cut, cut_mask = loaded.encode_batch(texts, max_length=4)
    assert cut.shape == (3, 4) and cut[1, -1] == loaded.sep_id and torch.equal(cut[1, :3], ids[1, :3])
    assert again.vocab_size == tok.vocab_size
    assert loaded._tok.encode("Pleural effusion").tokens == ["[CLS]", "pleural", "effusion", "[SEP]"]


def test_report_tokenizer_vocab_budget(tmp_path):
    full = fit_text_tokenizer(REPORTS, vocab_size=10_000, path=tmp_path / "full.json")
    assert full.vocab_size < 10_000  # merges ran out: every word is one piece
    pieces = [t for r in REPORTS for t in full._tok.encode(r).tokens]
    assert "opacities" in pieces and not any(t.startswith("##") or t == "[UNK]" for t in pieces)
    budget = full.vocab_size - 20
    assert fit_text_tokenizer(REPORTS, vocab_size=budget, path=tmp_path / "cut.json").vocab_size == budget
    with pytest.raises(ValueError, match="raise vocab_size"):
        fit_text_tokenizer(REPORTS, vocab_size=20, path=tmp_path / "tiny.json")


def tiny_config(**kw) -> SmallTextEncoderConfig:
    return SmallTextEncoderConfig(**{"vocab_size": 50, "dim": 32, "depth": 2, "heads": 4, "max_length": 12,
                                     "dropout": 0.0, **kw})


def test_small_encoder_shapes_and_mask():
    torch.manual_seed(0)
    model = SmallTextEncoder(tiny_config()).eval()
    ids = torch.randint(1, 50, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    out = model(ids, mask)
    assert out.shape == (2, 10, 32) and torch.isfinite(out).all()
    assert torch.all(out[1, 6:] == 0)
    # padded tokens do not reach the valid ones: changing them (or trimming them) changes nothing
    ids_b = ids.clone()
    ids_b[1, 6:] = 7
    torch.testing.assert_close(model(ids_b, mask)[1], out[1])
    torch.testing.assert_close(model(ids[1:, :6], mask[1:, :6])[0], out[1, :6], atol=1e-5, rtol=0)
    # a fully padded row stays finite (zeros)
    empty = model(ids, torch.zeros(2, 10, dtype=torch.bool))
    assert torch.isfinite(empty).all() and torch.all(empty == 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the GPU training precision
        low = model(ids, mask)
    assert torch.isfinite(low).all() and torch.all(low[1, 6:] == 0)  # final LayerNorm runs in float32
    torch.testing.assert_close(low.float(), out, atol=0.1, rtol=0.05)
    assert not torch.equal(low.float(), out)  # bf16 matmuls really ran
    with pytest.raises(ValueError):
        model(torch.zeros(1, 13, dtype=torch.long), torch.ones(1, 13, dtype=torch.bool))


def test_small_encoder_save_load_and_grads(tmp_path):
    torch.manual_seed(0)
    model = SmallTextEncoder(tiny_config(dropout=0.1))
    ids, mask = torch.randint(1, 50, (3, 8)), torch.ones(3, 8, dtype=torch.bool)
    mask[0, 5:] = False
    model.train()
    out = model(ids, mask)
    (out[mask] ** 2).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters()), "every parameter gets a gradient"
    assert model.position.grad[8:].abs().sum() == 0 and model.position.grad[:8].abs().sum() > 0
    model.eval()
    model.save_pretrained(tmp_path / "small", seed=0)
    loaded = SmallTextEncoder.from_pretrained(tmp_path / "small").eval()
    assert loaded.config == model.config
    assert torch.equal(loaded(ids, mask), model(ids, mask))


def test_a_damaged_or_foreign_model_folder_is_named_in_one_line(tmp_path, minilm):
    """Weights of another size beside a config (torch's size-mismatch traceback before), a config.json that is
    not ctgen's (a Hugging Face folder given as a report encoder: KeyError 'class'), a newer format: each a
    ValueError naming the folder, its key lists cut short."""
    from ctgen.models.text_encoders import FrozenReportEncoder

    SmallTextEncoder(tiny_config(dim=48)).save_pretrained(tmp_path / "wide")
    SmallTextEncoder(tiny_config()).save_pretrained(tmp_path / "small")
    shutil.copy(tmp_path / "wide" / "model.safetensors", tmp_path / "small" / "model.safetensors")
    with pytest.raises(ValueError, match=r"weights do not match its config.json .*shapes differ: \d+ \(.*\(48,?\)? ") as err:
        SmallTextEncoder.from_pretrained(tmp_path / "small")
    assert str(err.value).count(" for ") <= 3 and "..." in str(err.value)  # three named, the rest counted
    meta = json.loads((tmp_path / "wide" / "config.json").read_text())
    (tmp_path / "wide" / "config.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format 99, newer than"):
        SmallTextEncoder.from_pretrained(tmp_path / "wide")
    hf = tmp_path / "hf"
    shutil.copytree(minilm.path, hf)
    with pytest.raises(ValueError, match="config.json is not a ctgen model's"):
        FrozenReportEncoder(hf)


def test_small_encoder_overfits():
    torch.manual_seed(0)
    model = SmallTextEncoder(tiny_config())
    ids, mask = torch.randint(1, 50, (2, 6)), torch.ones(2, 6, dtype=torch.bool)
    target = torch.randn(2, 6, 32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = ((model(ids, mask) - target) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * first


# --- embedding cache ------------------------------------------------------------------------------


def test_cache_dedupes_and_round_trips(tmp_path, minilm):
    prompts = {"vol_a": REPORTS[0], "vol_b": REPORTS[1], "vol_c": REPORTS[0], "vol_d": REPORTS[2], "vol_e": ""}
    counting = Counting(minilm)
    path = encode_prompts(counting, prompts, tmp_path / "cache.safetensors", batch_size=2, dtype="float32")
    assert sorted(counting.seen) == sorted(set(prompts.values()))  # once per distinct text
    cache = EmbeddingCache(path)
    assert len(cache) == 5 and "vol_c" in cache and "vol_z" not in cache
    assert cache.dim == 384 and cache.identity == minilm.identity and cache.max_length == 64
    for key, text in prompts.items():
        direct = minilm.encode([text])
        torch.testing.assert_close(cache.get(key), direct.hidden[0, direct.mask[0]], atol=1e-5, rtol=0)
    assert torch.equal(cache.get("vol_a"), cache.get("vol_c"))
    assert cache.get("vol_e").shape == (2, 384)  # [CLS] [SEP]
    # float16 storage stays close
    half = EmbeddingCache(encode_prompts(minilm, prompts, tmp_path / "half.safetensors"))
    assert half.dtype == "float16" and half.get("vol_a").dtype == torch.float32
    torch.testing.assert_close(half.get("vol_a"), cache.get("vol_a"), atol=2e-2, rtol=1e-2)


def test_cache_batch_padding_and_missing_keys(tmp_path, minilm):
    prompts = {"a": "pleural effusion", "b": REPORTS[3]}
    cache = EmbeddingCache(encode_prompts(minilm, prompts, tmp_path / "c.safetensors"))
    la, lb = cache.get("a").shape[0], cache.get("b").shape[0]
    enc = cache.batch(["b", "a"])
    assert enc.hidden.shape == (2, lb, 384) and enc.mask.sum(1).tolist() == [lb, la]
    assert torch.all(enc.hidden[1, la:] == 0) and torch.equal(enc.hidden[1, :la], cache.get("a"))
    padded = cache.batch(["a"], pad_to=20)
    assert padded.hidden.shape == (1, 20, 384) and padded.mask[0].sum() == la
    with pytest.raises(ValueError):
        cache.batch(["b"], pad_to=2)
    with pytest.raises(KeyError, match=r"2 key\(s\).*'x'.*'y'"):
        cache.batch(["a", "x", "y"])
    with pytest.raises(KeyError, match="'q'"):
        cache.get("q")


def test_cache_skips_when_unchanged(tmp_path, minilm):
    prompts = {"a": "no pneumothorax", "b": "emphysema"}
    path = tmp_path / "c.safetensors"
    first = Counting(minilm)
    encode_prompts(first, prompts, path)
    mtime = path.stat().st_mtime_ns
    again = Counting(minilm)
    encode_prompts(again, prompts, path)
    assert again.seen == [] and path.stat().st_mtime_ns == mtime
    forced = Counting(minilm)
    encode_prompts(forced, prompts, path, if_changed=False)
    assert sorted(forced.seen) == ["emphysema", "no pneumothorax"]
    changed = Counting(minilm)
    encode_prompts(changed, {**prompts, "c": "cardiomegaly"}, path)
    assert len(changed.seen) == 3 and "c" in EmbeddingCache(path)
    other_dtype = Counting(minilm)
    encode_prompts(other_dtype, {**prompts, "c": "cardiomegaly"}, path, dtype="float32")
    assert len(other_dtype.seen) == 3


def test_the_latent_flow_familys_encoders_default_to_the_cascades_and_are_checked():
    from ctgen.jobs.config import flow_text_encoders

    models = {"text_encoder": {"kind": "small", "path": None, "max_length": 128, "vocab_size": 1000}}
    mean = {"latent_flow": {"model": {"text_pooling": "mean"}}}
    assert flow_text_encoders(models, {}) == [models["text_encoder"]]  # none of its own: the cascade's
    own = {**models, "latent_flow_text_encoders": [{"kind": "hf", "path": "/m/cxr-bert"}, {"kind": "minilm", "max_length": 64}]}
    assert flow_text_encoders(own, mean) == [{"kind": "hf", "path": "/m/cxr-bert", "max_length": 128},
                                             {"kind": "minilm", "path": None, "max_length": 64}]
    with pytest.raises(ValueError, match="text_pooling must be mean .* not 'tokens'"):
        flow_text_encoders(own, {"latent_flow": {"model": {"text_pooling": "tokens"}}})
    # a preset sizing each section's slot (the paper's 256 rows) reads as many tokens of it, where no entry says
    # otherwise: the cascade's 128 left half of every slot padding and most findings unread
    wide = {"latent_flow": {"model": {"text_pooling": "mean", "max_text_tokens": 256}}}
    assert flow_text_encoders(models, wide) == [{**models["text_encoder"], "max_length": 256}]
    assert [e["max_length"] for e in flow_text_encoders(own, wide)] == [256, 64]
    with pytest.raises(ValueError, match="the small trainable encoder is used alone"):
        flow_text_encoders({**models, "latent_flow_text_encoders": [{"kind": "minilm"}, {"kind": "small"}]}, mean)


def test_the_tokenizer_is_fitted_on_the_training_splits_given(tmp_path):
    """The workflow passes models.train_splits: words only in another split stay out of the vocabulary."""
    import pandas as pd

    from ctgen.cli import main

    pd.DataFrame({"VolumeName": ["train_1_a_1.nii.gz", "valid_1_a_1.nii.gz"], "split": ["train", "valid"],
                  "generatect": ["trainonlyword effusion", "evalonlyword effusion"]}).to_parquet(tmp_path / "p.parquet")
    for splits, seen, unseen in ((["train"], "trainonlyword", "evalonlyword"), (["valid"], "evalonlyword", "trainonlyword")):
        assert main(["fit-text-tokenizer", "--prompts", str(tmp_path / "p.parquet"), "--column", "generatect",
                     "--vocab-size", "200", "--splits", *splits, "--out", str(tmp_path / "t.json")]) == 0
        words = set(json.loads((tmp_path / "t.json").read_text())["model"]["vocab"])
        assert seen in words and unseen not in words


def test_a_damaged_cache_or_encoder_folder_is_named_in_one_line(tmp_path, minilm):
    """A truncated cache, a safetensors file without the cache's metadata, an empty or HTML file; an encoder folder
    without weights or with truncated ones: each a ValueError (one line from the command line) naming the path,
    where safetensors', KeyError's and transformers' tracebacks named none."""
    from safetensors.torch import save_file

    from ctgen.data.text_cache import FORMAT

    good = encode_prompts(minilm, {"a": "pleural effusion"}, tmp_path / "good.safetensors")
    data = good.read_bytes()
    bad = {"truncated": data[:-100], "empty": b"", "html": b"<html><body>Not found</body></html>"}
    for name, content in bad.items():
        (tmp_path / f"{name}.safetensors").write_bytes(content)
    save_file({"hidden": torch.zeros(1, 2)}, tmp_path / "foreign.safetensors", metadata={"cache_format": FORMAT})
    for name in [*bad, "foreign"]:
        path = tmp_path / f"{name}.safetensors"
        with pytest.raises(ValueError, match="is not a readable text cache") as err:
            EmbeddingCache(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value), name
    folder = tmp_path / "enc"
    _tiny_bert(folder, minilm)
    weights = folder / "model.safetensors"
    full = weights.read_bytes()
    weights.write_bytes(full[:len(full) // 2])
    with pytest.raises(ValueError, match=f"text encoder {folder} cannot be loaded") as err:
        build_text_encoder({"kind": "hf", "path": str(folder)}, device="cpu")
    assert "\n" not in str(err.value)
    weights.unlink()
    with pytest.raises(ValueError, match=f"text encoder {folder} cannot be loaded") as err:
        build_text_encoder({"kind": "hf", "path": str(folder)}, device="cpu")
    assert "\n" not in str(err.value)


NEGATED = ("Mild cardiomegaly is present. Pericardial effusion-thickening was not observed. "
           "Trachea and both main bronchi are open.")  # 10, 23 and 35 MiniLM tokens by sentence


def test_a_long_text_is_cut_at_whole_sentences_counted_and_logged(tmp_path, minilm, caplog):
    """A text over max_length was cut at the token limit, inside a sentence ("Pericardial effusion" kept, "-thickening
    was not observed" cut: an absent finding made present), and nothing counted or logged it."""
    short = minilm_encoder(max_length=16, device="cpu")
    with caplog.at_level("WARNING", logger="ctgen.data.text_cache"):
        cache = EmbeddingCache(encode_prompts(short, {"a": NEGATED, "b": "pleural effusion", "c": NEGATED},
                                              tmp_path / "c.safetensors", dtype="float32"))
    assert cache.truncated == 1  # distinct texts
    assert "1 of 2 distinct texts are longer than max_length 16 tokens (the longest 35)" in caplog.text
    first = minilm.encode(["Mild cardiomegaly is present."])
    assert cache.get("a").shape[0] == 10
    torch.testing.assert_close(cache.get("a"), first.hidden[0], atol=1e-5, rtol=0)
    assert EmbeddingCache(encode_prompts(short, {"b": "pleural effusion"}, tmp_path / "d.safetensors")).truncated == 0
    # the report tokenizer (the small and the report encoder, training and sampling) cuts the same way, and counts
    tok = fit_text_tokenizer(REPORTS * 3 + [NEGATED], vocab_size=300, path=tmp_path / "tok.json")
    n = [tok.count_tokens(t) for t in ("Mild cardiomegaly is present.", NEGATED)]
    ids, mask = tok.encode_batch([NEGATED, "pleural effusion"], n[0] + 2)
    assert mask.sum(1).tolist()[0] == n[0] and tok.cut == 1 and tok.longest == n[1]
    alone, _ = tok.encode_batch(["Mild cardiomegaly is present."], 64)
    assert torch.equal(ids[0, :n[0]], alone[0])
    one_sentence, _ = tok.encode_batch(["a b c d e f g h"], 5)  # a first sentence longer alone: the hard cut
    assert one_sentence.shape[1] == 5 and tok.cut == 2


class _Constant:
    """A stand-in frozen encoder: ``length`` rows of ``value`` for every text."""

    max_length, identity = 64, "Constant:/enc:0:max_length=64"

    def __init__(self, dim: int = 8, length: int = 4, value: float = 0.5):
        self.dim, self.length, self.value = dim, length, value

    def count_tokens(self, text: str) -> int:
        return self.length

    def encode(self, texts, batch_size=32) -> TextEncoding:
        return TextEncoding(torch.full((len(texts), self.length, self.dim), self.value),
                            torch.ones(len(texts), self.length, dtype=torch.bool))


def test_encoding_holds_the_states_once(tmp_path):
    """The packed states were kept as chunks and then concatenated: two copies at peak (7 GB of CT-RATE sections
    -> 14 GB against the rule's 8 GB). Measured in a fresh process: peak RSS growth under 1.5x the payload."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import resource, torch
        from tests.ctgen.test_text_encoders import _Constant
        from ctgen.data.text_cache import EmbeddingCache, encode_prompts
        enc = _Constant(dim=384, length=64)
        prompts = {{f"k{{i}}": f"text {{i}}" for i in range(4000)}}
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        path = encode_prompts(enc, prompts, {str(tmp_path / 'c.safetensors')!r}, batch_size=8)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
        payload = 4000 * 64 * 384 * 2
        cache = EmbeddingCache(path)
        assert torch.equal(cache.get("k7"), torch.full((64, 384), 0.5)), "states changed"
        print(grown / payload)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert float(out.stdout.split()[-1]) < 1.5, out.stdout


def test_non_finite_states_advise_what_can_be_set(tmp_path):
    """The advice was "use dtype='float32'", a cache dtype the jobs do not expose; it now tells the encoder's own
    precision (settable) from states beyond float16's range."""
    with pytest.raises(ValueError, match=r"text encoder /enc gives non-finite states for 'a'.*dtype: float32"):
        encode_prompts(_Constant(value=float("nan")), {"k": "a"}, tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match=r"states of 'a' reach 1e\+05, beyond the float16 the cache is stored in"):
        encode_prompts(_Constant(value=1e5), {"k": "a"}, tmp_path / "c.safetensors")
    assert EmbeddingCache(encode_prompts(_Constant(value=1e5), {"k": "a"}, tmp_path / "c.safetensors",
                                         dtype="float32")).get("k").max() == 1e5


def test_a_damaged_cache_row_or_layout_is_named(tmp_path):
    """Bytes of the states overwritten, or offsets past the rows: the file opened and gave NaN states, or a short
    row, silently; now a ValueError naming the key (or the layout) and the file."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = encode_prompts(_Constant(length=4), {"a": "x", "b": "y"}, tmp_path / "c.safetensors")
    data = bytearray(path.read_bytes())
    data[-8:] = b"\xff" * 8  # the last row's last values: NaN in float16
    (tmp_path / "nan.safetensors").write_bytes(bytes(data))
    cache = EmbeddingCache(tmp_path / "nan.safetensors")
    assert cache.get("a").isfinite().all()  # the other rows still read
    with pytest.raises(ValueError, match=f"text cache {tmp_path / 'nan.safetensors'} holds non-finite states for 'b'"):
        cache.batch(["a", "b"])
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    for name, offsets in {"past": [0, 1, 5], "unordered": [0, 5, 4], "short": [0, 4, 6]}.items():
        bad = tmp_path / f"{name}.safetensors"
        save_file({"hidden": tensors["hidden"], "offsets": torch.tensor(offsets)}, bad, metadata=meta)
        with pytest.raises(ValueError, match=f"{bad} is not a readable text cache .*offsets do not cover the 8 rows"):
            EmbeddingCache(bad)

