"""The report encoder: the small text encoder pretrained on the training reports' parsed findings, then
frozen (models.text_encoder.kind: report_encoder), trained through the one loop on a synthetic cohort."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from ctgen.jobs.features import spec_text_encoder
from ctgen.jobs.train import report_encoder_collate, report_encoder_samples, run_training
from ctgen.models.text_encoders import (REPORT_ENCODER_DIR, FrozenReportEncoder, ReportEncoder, ReportEncoderConfig,
                                        build_text_encoder, fit_text_tokenizer, spec_entry)
from ctgen.pipelines.spec import spec_weights
from ctprep.ctrate import LABELS
from ctprep.labelling import PARSED

# finding -> (present sentences, absent sentences); the absent ones name the finding too, so only the
# words around it tell them apart
FINDINGS = {
    "Pleural effusion": (["Small left pleural effusion.", "Bilateral pleural effusions are seen."],
                         ["No pleural effusion.", "There is no pleural effusion."]),
    "Cardiomegaly": (["The heart is enlarged.", "Cardiomegaly is noted."],
                     ["Heart size is normal.", "No cardiomegaly."]),
    "Lung nodule": (["A 6 mm nodule in the right upper lobe.", "Several pulmonary nodules are seen."],
                    ["No pulmonary nodule.", "No suspicious nodule is identified."]),
    "Emphysema": (["Centrilobular emphysema in both upper lobes.", "Emphysema is present."],
                  ["No emphysema.", "There is no emphysematous change."]),
}


def make_cohort(root, n_train: int = 80, n_valid: int = 40, seed: int = 0):
    """cohort.parquet, prompts.parquet and labels.parquet of random reports with known findings."""
    rng = np.random.default_rng(seed)
    cohort, prompts, labels = [], [], []
    for i in range(n_train + n_valid):
        split = "train" if i < n_train else "valid"
        name = f"{split}_{i}_a_1.nii.gz"
        present = {f: bool(rng.random() < 0.4) for f in FINDINGS}
        sentences = [FINDINGS[f][0 if p else 1][rng.integers(2)] for f, p in present.items()]
        rng.shuffle(sentences)
        shown = [f.lower() for f, p in present.items() if p]
        cohort.append({"VolumeName": name, "split": split, "findings": " ".join(sentences),
                       "impression": "; ".join(shown) or "No acute findings."})
        prompts.append({"VolumeName": name, "split": split, "structured": "; ".join(shown)})
        labels.append({"VolumeName": name, "split": split,
                       **{PARSED + lab: int(present.get(lab, False)) for lab in LABELS}})
    paths = {}
    for key, rows in (("cohort", cohort), ("prompts", prompts), ("labels", labels)):
        paths[key] = root / f"{key}.parquet"
        pd.DataFrame(rows).to_parquet(paths[key], index=False)
    texts = [r["findings"] for r in cohort[:n_train]] + [r["impression"] for r in cohort[:n_train]]
    fit_text_tokenizer(texts, vocab_size=200, path=root / "tokenizer.json")
    paths["text_tokenizer"] = root / "tokenizer.json"
    return paths


@pytest.fixture(scope="module", params=["mean", "max", "token"])
def trained(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("report_encoder")
    paths = make_cohort(root)
    cfg = {"model": {"dim": 32, "depth": 1, "heads": 2, "dropout": 0.0, "pos_weight": "auto", "pooling": request.param},
           "text_encoder": {"max_length": 64},
           "train": {"max_steps": 150, "batch_size": 16, "lr": 0.003, "min_lr": 0.0003, "warmup_steps": 10,
                     "ckpt_every": 1000, "log_every": 50, "seed": 0},
           "data": {"splits": ["train"], "prompt": "structured", **{k: str(v) for k, v in paths.items()}}}
    out = run_training("report_encoder", cfg, root / "models" / REPORT_ENCODER_DIR, root / "ckpt")
    return root, out, cfg


def test_reads_findings_and_negations_of_held_out_reports(trained):
    root, out, cfg = trained
    model = ReportEncoder.from_pretrained(out).eval()
    assert model.config.num_labels == len(LABELS) and model.config.max_length == 64
    assert len(model.config.pos_weight) == len(LABELS)  # "auto" was resolved from the training texts
    held_out = {**cfg["data"], "splits": ["valid"], "sections": ["findings"], "prompt": None}
    samples, names = report_encoder_samples(held_out, 64)
    assert len(samples) == 40 and names == list(LABELS)
    batch = report_encoder_collate(samples)
    with torch.no_grad():
        logits = model(batch["text_ids"], batch["text_mask"]).logits.numpy()
    for finding in FINDINGS:  # every held-out report names each finding, present or negated
        k = names.index(finding)
        assert roc_auc_score(batch["labels"][:, k].numpy(), logits[:, k]) > 0.9, finding


def test_training_texts_are_the_sections_and_prompt_of_the_training_reports_only(trained):
    _, _, cfg = trained
    samples, _ = report_encoder_samples(cfg["data"], 64)
    # findings + impression of every training report, + its structured prompt where a finding is present
    with_prompt = sum(1 for r in pd.read_parquet(cfg["data"]["prompts"]).query("split == 'train'")["structured"] if r)
    assert len(samples) == 80 + 80 + with_prompt
    with pytest.raises(ValueError, match="no report text"):
        report_encoder_samples({**cfg["data"], "splits": ["test"]}, 64)


def test_frozen_states_are_the_encoders_and_independent_of_the_batch(trained):
    root, out, _ = trained
    assert (out / "tokenizer.json").is_file()
    frozen = FrozenReportEncoder(out, max_length=64, device="cpu")
    assert frozen.dim == 32 and not any(p.requires_grad for p in frozen.encoder.parameters())
    short, long = "No pleural effusion.", "Small left pleural effusion. The heart is enlarged. Emphysema is present."
    alone, together = frozen.encode([short]), frozen.encode([long, short])
    n = int(alone.mask[0].sum())
    assert together.hidden.shape[1] > n and int(together.mask[1].sum()) == n
    torch.testing.assert_close(together.hidden[1, :n], alone.hidden[0, :n], atol=1e-5, rtol=0)
    assert frozen.count_tokens(short) == n  # what the sampling pipeline checks a prompt's length with
    assert frozen.count_tokens(" ".join([long] * 8)) > 64 >= int(frozen.encode([" ".join([long] * 8)]).mask.sum())
    assert torch.all(together.hidden[1, n:] == 0)
    ids, mask = frozen.tokenizer.encode_batch([short], 64)
    direct = ReportEncoder.from_pretrained(out).eval().encoder(ids, mask)
    torch.testing.assert_close(alone.hidden, direct, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="positions"):
        FrozenReportEncoder(out, max_length=65)


def test_spec_names_it_inside_the_models_folder_and_loads_it_from_there(trained, tmp_path):
    root, out, _ = trained
    models = out.parent
    entry = spec_entry({"kind": "report_encoder", "path": None, "max_length": 64}, models)
    assert entry == {"kind": "report_encoder", "path": REPORT_ENCODER_DIR, "max_length": 64}
    enc = build_text_encoder(entry, device="cpu", root=models)
    assert isinstance(enc, FrozenReportEncoder) and enc.path == out.resolve()
    # a spec hashes the encoder it names (read_spec refuses it retrained), never a leftover folder
    digest = spec_weights(models, [], [entry])[REPORT_ENCODER_DIR]
    assert digest == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert spec_weights(models, [], [{"kind": "small", "path": None, "max_length": 64}]) == {}
    # the evaluation's CLIP text side finds it through the spec, from any working directory
    (models / "cascade.json").write_text(json.dumps({"text_encoder": entry}))
    assert spec_text_encoder(models) == {**entry, "path": str(out)}
    other = spec_entry({"kind": "report_encoder", "path": str(out), "max_length": 64}, tmp_path)
    assert other["path"] == str(out)  # a folder given in config is kept as it is
    assert spec_entry({"kind": "minilm", "path": None, "max_length": 64}, tmp_path)["path"] is None
    with pytest.raises(FileNotFoundError, match="train_report_encoder"):
        spec_entry({"kind": "report_encoder", "path": None, "max_length": 64}, tmp_path)
    with pytest.raises(ValueError, match="needs 'path'"):
        build_text_encoder({"kind": "report_encoder"})
    with pytest.raises(FileNotFoundError, match="no pretrained report encoder"):
        build_text_encoder({"kind": "report_encoder", "path": str(tmp_path)})


def test_only_the_main_rank_copies_the_tokenizer(tmp_path, monkeypatch):
    """Under DDP every rank copied tokenizer.json into the one output folder, racing each other's writes."""
    from ctgen.jobs.train import train_report_encoder
    from ctgen.training import loop

    paths = make_cohort(tmp_path, n_train=8, n_valid=0)
    monkeypatch.setattr(loop, "train", lambda model, make, tcfg, out, **kw: Path(out))  # the weights are not the point
    cfg = {"model": {"dim": 16, "depth": 1, "heads": 2}, "train": {"max_steps": 1},
           "data": {"splits": ["train"], "prompt": "structured", **{k: str(v) for k, v in paths.items()}}}
    for rank, copied in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        out = tmp_path / f"rank{rank}"
        out.mkdir()
        train_report_encoder(cfg, out, tmp_path / "ckpt")
        assert (out / "tokenizer.json").exists() == copied, rank


def test_token_head_asks_every_real_token_for_the_reports_findings():
    """``pooling: token``: the loss is the BCE of each real token's logits against the report's labels, averaged
    over its tokens (unknown labels left out), and the report's logits are its tokens' mean (loops as reference)."""
    torch.manual_seed(0)
    model = ReportEncoder(ReportEncoderConfig(vocab_size=50, dim=16, depth=1, heads=2, num_labels=3,
                                              pos_weight=(1.0, 2.0, 1.0), pooling="token")).eval()
    ids = torch.randint(1, 50, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 4 + [0] * 2], dtype=torch.bool)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, float("nan")], [1, 1, 0]])
    with torch.no_grad():
        out = model(ids, mask, labels=labels)
        states = model.encoder(ids, mask)
    terms, logits = [], []
    for b in range(3):
        n = int(mask[b].sum())
        token_logits = model.head(states[b, :n]).detach()  # (n, K)
        logits.append(token_logits.mean(dim=0))
        for k in range(3):
            if not torch.isnan(labels[b, k]):
                per = torch.nn.functional.binary_cross_entropy_with_logits(
                    token_logits[:, k], labels[b, k].expand(n), pos_weight=model.pos_weight[k], reduction="none")
                terms.append(per.mean())
    torch.testing.assert_close(out.logits, torch.stack(logits), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.loss, torch.stack(terms).mean(), atol=1e-6, rtol=1e-5)


def test_unknown_labels_are_left_out_of_the_loss():
    torch.manual_seed(0)
    model = ReportEncoder(ReportEncoderConfig(vocab_size=50, dim=16, depth=1, heads=2, num_labels=3,
                                              pos_weight=(1.0, 2.0, 1.0))).eval()
    ids, mask = torch.randint(1, 50, (4, 5)), torch.ones(4, 5, dtype=torch.bool)
    full = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    unknown = full.clone()
    unknown[0, 2] = unknown[3, 0] = float("nan")
    logits = model(ids, mask).logits.detach()
    per = torch.nn.functional.binary_cross_entropy_with_logits(logits, full, pos_weight=torch.tensor([1.0, 2, 1]),
                                                               reduction="none")
    keep = ~torch.isnan(unknown)
    torch.testing.assert_close(model(ids, mask, labels=unknown).loss, per[keep].mean())
    with pytest.raises(ValueError, match="pos_weight"):
        ReportEncoder(ReportEncoderConfig(vocab_size=50, dim=16, depth=1, heads=2, num_labels=3, pos_weight=(1.0,)))


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_the_label_head_reads_the_real_tokens_only(pooling):
    """Pooled states over the real tokens (an independent loop per report); padding changes nothing."""
    torch.manual_seed(0)
    model = ReportEncoder(ReportEncoderConfig(vocab_size=50, dim=16, depth=1, heads=2, num_labels=3,
                                              pooling=pooling)).eval()
    ids = torch.randint(1, 50, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], dtype=torch.bool)
    with torch.no_grad():
        states = model.encoder(ids, mask)
        got = model.pooled(states, mask)
        for b in range(3):
            real = states[b, : int(mask[b].sum())]
            torch.testing.assert_close(got[b], real.max(dim=0).values if pooling == "max" else real.mean(dim=0))
        alone = model(ids[2:, :2], mask[2:, :2]).logits  # the third report without its padding
    torch.testing.assert_close(model(ids, mask).logits[2:].detach(), alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        ReportEncoder(ReportEncoderConfig(vocab_size=50, dim=16, depth=1, heads=2, pooling="cls"))
