"""The evaluation's feature networks: CLIP3D, Classifier3D, their shared encoder and training jobs."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from ctgen.data.batches import Augment, load_volumes
from ctgen.data.text import TextConditioning
from ctgen.data.text_cache import encode_prompts
from ctgen.jobs.features import embed_texts, extract_features, load_feature_nets
from ctgen.jobs.train import label_pos_weight, train_classifier, train_clip
from ctgen.models.classifier3d import Classifier3D, ClassifierConfig
from ctgen.models.clip3d import CLIP3D, CLIP3DConfig, clip_score, info_nce, same_text
from ctgen.models.text_encoders import TextEncoding, fit_text_tokenizer, pad_states
from ctprep.shards import merge_manifests, write_shards
from ctprep.volume import Volume

WINDOW = [-1000, 1000]
# (1, 32, 64, 64) volumes -> 16^3 after the stem, 3 stages up to 64 channels; ~0.4M parameters
DEMO_ENCODER = {"stem_stride": (2, 4, 4), "channels": (16, 32, 64), "blocks": (1, 1, 1), "norm_groups": 8}
TINY = {"stem_stride": (2, 4, 4), "channels": (8, 16), "blocks": (1, 1), "norm_groups": 4}
TEXT = {"vocab_size": 40, "dim": 16, "depth": 1, "heads": 2, "dropout": 0.0, "max_length": 16}


def blobs(kinds: list[str], shape=(16, 32, 32), seed: int = 0) -> torch.Tensor:
    """(N, 1, D, H, W) in [-1, 1]: a bright ball on the left, right, front, or none, over mild noise."""
    gen = torch.Generator().manual_seed(seed)
    d, h, w = shape
    axes = [torch.linspace(-1, 1, n) for n in (d, h, w)]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    centre = {"left": (0.0, -0.5), "right": (0.0, 0.5), "front": (-0.5, 0.0)}
    out = []
    for kind in kinds:
        vol = -0.8 + 0.05 * torch.randn(shape, generator=gen)
        if kind in centre:
            cy, cx = centre[kind]
            vol = vol + 1.6 * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + z**2) * 12)
        out.append(vol.clamp(-1, 1))
    return torch.stack(out)[:, None]


def test_shapes_at_two_grids_and_both_text_routes():
    torch.manual_seed(0)
    clip = CLIP3D(CLIP3DConfig(**DEMO_ENCODER, embed_dim=64, text_dim=32, text_encoder={**TEXT, "dim": 32})).eval()
    cached = CLIP3D(CLIP3DConfig(**DEMO_ENCODER, embed_dim=64, text_dim=24)).eval()
    clf = Classifier3D(ClassifierConfig(**DEMO_ENCODER, head_dropout=0.1)).eval()
    for grid in ((32, 64, 64), (21, 30, 50)):  # the demo grid, and one not divisible by the stem stride
        video = torch.rand(2, 1, *grid) * 2 - 1
        emb = clip.encode_volume(video)
        assert emb.shape == (2, 64) and torch.allclose(emb.norm(dim=-1), torch.ones(2))
        assert clip.volume_features(video).shape == (2, 64)
        assert clf.features(video).shape == (2, 64)
        probs = clf.predict(video)
        assert probs.shape == (2, 18) and ((probs > 0) & (probs < 1)).all()
    ids, mask = torch.randint(4, 40, (3, 7)), torch.ones(3, 7, dtype=torch.bool)
    mask[0, 4:] = False
    assert clip.encode_text(text_ids=ids, text_mask=mask).shape == (3, 64)
    states = torch.randn(3, 7, 24)
    t = cached.encode_text(text=states, text_mask=mask)
    assert t.shape == (3, 64) and torch.allclose(t.norm(dim=-1), torch.ones(3))
    padded = states.clone()
    padded[0, 4:] = 99.0  # padding must not change the pooled text
    assert torch.allclose(cached.encode_text(text=padded, text_mask=mask), t, atol=1e-6)
    with pytest.raises(ValueError, match="no trainable text encoder"):
        cached.encode_text(text_ids=ids, text_mask=mask)


def test_save_and_from_pretrained_give_identical_outputs(tmp_path):
    torch.manual_seed(0)
    clip = CLIP3D(CLIP3DConfig(**TINY, embed_dim=8, text_dim=16, text_encoder=TEXT)).eval()
    clf = Classifier3D(ClassifierConfig(**TINY, pos_weight=tuple(float(i + 1) for i in range(18)))).eval()
    video, ids = blobs(["left", "none"]), torch.randint(4, 40, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    clip.save_pretrained(tmp_path / "clip", seed=3)
    clf.save_pretrained(tmp_path / "clf")
    clip2 = CLIP3D.from_pretrained(tmp_path / "clip").eval()
    clf2 = Classifier3D.from_pretrained(tmp_path / "clf").eval()
    assert clip2.config == clip.config and clf2.config == clf.config
    assert torch.equal(clip.encode_volume(video), clip2.encode_volume(video))
    assert torch.equal(clip.encode_text(text_ids=ids, text_mask=mask), clip2.encode_text(text_ids=ids, text_mask=mask))
    assert torch.equal(clip(video, mask, text_ids=ids).loss, clip2(video, mask, text_ids=ids).loss)
    assert torch.equal(clf.predict(video), clf2.predict(video))
    labels = torch.zeros(2, 18)
    labels[0, 3] = 1
    assert torch.equal(clf(video, labels).loss, clf2(video, labels).loss)
    assert clf2.pos_weight[17] == 18.0  # the weights travel through the config


def test_a_config_field_the_saved_folder_lacks_is_named_when_it_defaults(tmp_path, caplog):
    """A folder written before a config field existed loads with the field's default, and says so."""
    clf = Classifier3D(ClassifierConfig(**TINY, pos_weight=tuple(float(i + 1) for i in range(18))))
    clf.save_pretrained(tmp_path / "clf")
    with caplog.at_level("WARNING", logger="ctgen.models.base"):
        assert Classifier3D.from_pretrained(tmp_path / "clf").defaulted_config == ()
    assert not caplog.records
    meta = json.loads((tmp_path / "clf" / "config.json").read_text())
    del meta["config"]["pos_weight"]
    (tmp_path / "clf" / "config.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="ctgen.models.base"):
        old = Classifier3D.from_pretrained(tmp_path / "clf")
    assert old.defaulted_config == ("pos_weight",)
    assert old.config.pos_weight == ClassifierConfig(**TINY).pos_weight != clf.config.pos_weight
    [record] = caplog.records
    assert "no pos_weight" in record.getMessage() and "older ctgen" in record.getMessage()


def test_a_junk_or_unreadable_weights_file_is_named_with_the_remedy(tmp_path):
    """A truncated model.safetensors (an interrupted copy) is one line naming the file, not safetensors' traceback."""
    clf = Classifier3D(ClassifierConfig(**TINY))
    clf.save_pretrained(tmp_path / "clf")
    weights = tmp_path / "clf" / "model.safetensors"
    weights.write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"clf/model.safetensors cannot be read \(.*\): train the model again"):
        Classifier3D.from_pretrained(tmp_path / "clf")
    weights.unlink()
    weights.mkdir()  # unreadable as a file: an OSError
    with pytest.raises(ValueError, match="clf/model.safetensors cannot be read"):
        Classifier3D.from_pretrained(tmp_path / "clf")


def test_info_nce_matches_a_hand_computation():
    torch.manual_seed(1)
    model = CLIP3D(CLIP3DConfig(**TINY, embed_dim=8, text_dim=5)).eval()
    video = blobs(["left", "right", "none"], seed=1)
    text, mask = torch.randn(3, 4, 5), torch.ones(3, 4, dtype=torch.bool)
    out = model(video, mask, text=text)
    v, t = model.encode_volume(video).tolist(), model.encode_text(text=text, text_mask=mask).tolist()
    s = math.exp(math.log(1 / 0.07))
    logit = [[s * sum(a * b for a, b in zip(v[i], t[j])) for j in range(3)] for i in range(3)]

    def ce(row, target):  # -log softmax(row)[target]
        return math.log(sum(math.exp(x) for x in row)) - row[target]

    i2t = sum(ce(logit[i], i) for i in range(3)) / 3
    t2i = sum(ce([logit[i][j] for i in range(3)], j) for j in range(3)) / 3
    assert out.loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-5)
    assert out.logit_scale.item() == pytest.approx(s, rel=1e-6)
    # duplicated texts are positives of each other: target mass split evenly between them
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.5, 3.0, 1.0], [1.0, 1.0, 1.0]])
    ids = torch.tensor([[5, 6, 0], [5, 6, 0], [7, 0, 0]])
    pos = same_text(ids > 0, text_ids=ids)
    assert pos.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    loss, acc_i2t, acc_t2i = info_nce(logits, pos)
    lsm_r, lsm_c = logits.log_softmax(1), logits.log_softmax(0)
    hand_i2t = -(lsm_r[0, :2].mean() + lsm_r[1, :2].mean() + lsm_r[2, 2]) / 3
    hand_t2i = -(lsm_c[:2, 0].mean() + lsm_c[:2, 1].mean() + lsm_c[2, 2]) / 3
    assert loss.item() == pytest.approx(float(hand_i2t + hand_t2i) / 2, rel=1e-6)
    assert acc_i2t.item() == pytest.approx(2 / 3) and acc_t2i.item() == pytest.approx(2 / 3)
    scores = clip_score(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[2.0, 0.0], [-1.0, 0.1]]))
    assert scores.tolist() == [100.0, 0.0]  # 100 * max(cos, 0)


def test_clip_overfits_four_pairs_to_perfect_retrieval():
    torch.manual_seed(0)
    model = CLIP3D(CLIP3DConfig(**TINY, embed_dim=16, text_dim=16, text_encoder=TEXT))
    video = blobs(["left", "right", "front", "none"])
    ids = torch.tensor([[2, 10, 11, 3], [2, 12, 11, 3], [2, 13, 11, 3], [2, 14, 3, 0]])  # [CLS] ... [SEP]
    mask = ids > 0
    # lr 1e-3: at 3e-3 the run collapsed back to chance (loss ln 4) on 2 torch threads, and converged on 1 or 3
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = model(video, mask, text_ids=ids).loss.item()
    for _ in range(120):
        out = model(video, mask, text_ids=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        final = model(video, mask, text_ids=ids)
        sims = model.encode_volume(video) @ model.encode_text(text_ids=ids, text_mask=mask).t()  # (4, 4)
    assert final.loss.item() < 0.2 * first
    assert final.accuracy_i2t.item() == 1.0 and final.accuracy_t2i.item() == 1.0
    assert torch.equal(sims.argmax(dim=1), torch.arange(4)) and torch.equal(sims.argmax(dim=0), torch.arange(4))


def test_classifier_overfits_visible_labels_with_perfect_separation():
    torch.manual_seed(0)
    model = Classifier3D(ClassifierConfig(**TINY, head_dropout=0.0))
    kinds = ["left", "right", "none", "front", "left", "none", "right", "front"]
    video = blobs(kinds, seed=2)
    labels = torch.zeros(8, 18)
    labels[:, 0] = torch.tensor([k != "none" for k in kinds], dtype=torch.float32)  # any blob
    labels[:, 5] = torch.tensor([k == "left" for k in kinds], dtype=torch.float32)  # a left-sided blob
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        model(video, labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    probs = model.predict(video)
    out = model(video, labels)
    assert out.accuracy.item() == 1.0
    for lab in (0, 5):  # AUROC 1: every positive scores above every negative
        pos, neg = probs[labels[:, lab] == 1, lab], probs[labels[:, lab] == 0, lab]
        assert pos.min() > neg.max()
    assert probs[:, 1].max() < 0.5  # an always-negative label stays negative


def test_augment_flips_only_along_w_and_is_seeded():
    video = blobs(["left", "right", "none", "front"], seed=3)
    flip = Augment(flip_w=True)
    a = flip(video, torch.Generator().manual_seed(0))
    b = flip(video, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    flipped = [torch.equal(a[i], video[i].flip(-1)) for i in range(4)]
    kept = [torch.equal(a[i], video[i]) for i in range(4)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped)
    jitter = Augment(intensity=0.1)(video, torch.Generator().manual_seed(0))
    assert jitter.abs().max() <= 1 and not torch.equal(jitter, video)
    assert torch.equal(Augment()(video, torch.Generator()), video)
    assert label_pos_weight(torch.tensor([[1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1]]))[:2] == (3.0, 1.0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8 int16 HU volumes (32 x 32 x 16 voxels) with a nodule left or right, labelled and described."""
    root = tmp_path_factory.mktemp("eval_cohort")
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(np.linspace(-1, 1, 16), np.linspace(-1, 1, 32), np.linspace(-1, 1, 32), indexing="ij")
    samples = []
    for i in range(8):
        side = ("left", "right", "none", "front")[i % 4]
        cx = {"left": -0.5, "right": 0.5}.get(side, 0.0)
        cy = -0.5 if side == "front" else 0.0
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + z**2) * 12) * (side != "none")
        hu = (-900 + 1500 * blob + rng.normal(0, 20, blob.shape)).transpose(2, 1, 0).astype(np.int16)  # (I, J, K)
        labels = np.zeros(18, np.uint8)
        labels[0], labels[5] = side != "none", side == "left"
        prompt = f"{side} nodule." if side != "none" else "no acute findings."
        vol = Volume.from_3d(hu, np.diag([4.0, 4.0, 8.0, 1.0]), source=f"v{i}")
        samples.append({"key": f"train_{i}_a_1", "volume": vol, "prompt": prompt, "prompts": {"generatect": prompt},
                        "meta": {}, "labels": labels})
    write_shards(samples, root / "c000", prefix="train-c000", shard_size=4, split="train")
    manifest = root / "manifest.json"
    merge_manifests([root / "c000" / "train-c000.manifest.json"], manifest, split="train")
    fit_text_tokenizer([s["prompt"] for s in samples], 40, root / "text.json")
    encode_prompts(_WordEncoder(), {s["key"]: s["prompt"] for s in samples}, root / "cache.safetensors")
    return {"manifest": str(manifest), "tokenizer": str(root / "text.json"), "cache": str(root / "cache.safetensors")}


class _WordEncoder:
    """A stand-in frozen encoder for the cached-states route: one fixed 12-d vector per word."""

    identity, max_length, dim = "test-word-encoder", 16, 12

    def encode(self, texts: list[str], batch_size: int = 32) -> TextEncoding:
        states = [torch.stack([torch.randn(12, generator=torch.Generator().manual_seed(sum(map(ord, w))))
                               for w in t.split()]) for t in texts]
        return pad_states(states, 12)

    def count_tokens(self, text: str) -> int:
        return len(text.split())


def test_train_clip_and_classifier_through_the_loop(shards, tmp_path):
    train = {"max_steps": 6, "batch_size": 4, "lr": 2e-3, "warmup_steps": 1, "ckpt_every": 3, "log_every": 1,
             "tensorboard": False, "ema_decay": 0.9}
    clip_cfg = {"model": {**TINY, "embed_dim": 8, "text_dim": 999}, "text_encoder": {**TEXT, "vocab_size": 7},
                "train": train, "data": {"manifests": [shards["manifest"]], "text_tokenizer": shards["tokenizer"],
                                         "prompt": "generatect", "augment": {"intensity": 0.05}, "hu_window": WINDOW}}
    train_clip(clip_cfg, tmp_path / "clip", tmp_path / "ckpt")
    clf_cfg = {"model": {**TINY, "pos_weight": "auto"}, "train": train,
               "data": {"manifests": [shards["manifest"]], "augment": {"flip_w": True, "intensity": 0.05},
                        "hu_window": WINDOW}}
    train_classifier(clf_cfg, tmp_path / "clf", tmp_path / "ckpt")
    for name in ("clip", "clf"):
        metrics = pd.read_csv(tmp_path / name / "metrics.csv")
        assert metrics["step"].max() == 6 and np.isfinite(metrics["loss"]).all()
        assert (tmp_path / name / "ema" / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "clip" / "config.json").read_text())
    assert saved["config"]["text_dim"] == 16 and saved["config"]["text_encoder"]["vocab_size"] <= 40
    weights = json.loads((tmp_path / "clf" / "config.json").read_text())["config"]["pos_weight"]
    assert weights[0] == 1.0  # 6 of 8 have a blob: 2 / 6, raised to the floor of 1
    assert weights[5] == 3.0 and weights[1] == 1.0  # 2 of 8 left-sided: 6 / 2

    nets = load_feature_nets(tmp_path / "clip", tmp_path / "clf")
    volumes = load_volumes([shards["manifest"]], WINDOW, prompt="generatect")
    assert volumes[0]["volume"].shape == (1, 16, 32, 32) and volumes[2]["labels"].sum() == 0
    feats = extract_features(nets, volumes[:3] + [volumes[3]["volume"][:, :10]], batch_size=2)
    assert feats["clip_features"].shape == (4, 16) and feats["clip_embedding"].shape == (4, 8)
    assert feats["classifier_features"].shape == (4, 16) and feats["probabilities"].shape == (4, 18)
    with torch.no_grad():  # batched extraction agrees with the model's own methods
        ref = nets.classifier.predict(volumes[0]["volume"].float()[None])[0].numpy()
    assert np.allclose(feats["probabilities"][0], ref, atol=1e-5)
    text = TextConditioning({v["key"]: v["prompt"] for v in volumes}, tokenizer_path=shards["tokenizer"], max_length=16)
    emb = embed_texts(nets.clip, text, [v["key"] for v in volumes[:3]])
    assert emb.shape == (3, 8) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)

    # the cached frozen-encoder route: text width taken from the cache
    cached_cfg = {**clip_cfg, "text_encoder": None, "train": {**train, "max_steps": 2, "ema_decay": 0.0},
                  "data": {**clip_cfg["data"], "text_tokenizer": None, "text_cache": shards["cache"]}}
    train_clip(cached_cfg, tmp_path / "clip_cached", tmp_path / "ckpt")
    cached = load_feature_nets(clip_dir=tmp_path / "clip_cached").clip
    assert cached.config.text_dim == 12 and cached.text_encoder is None
    text = TextConditioning({}, cache_path=shards["cache"])
    assert embed_texts(cached, text, [v["key"] for v in volumes]).shape == (8, 8)

    # train-on-synthetic: an explicit volume list replaces the manifests, with its own checkpoints
    synthetic = [{"key": f"gen_{i}", "volume": v["volume"].flip(-1), "labels": v["labels"]}
                 for i, v in enumerate(volumes)]
    train_classifier({**clf_cfg, "train": {**train, "max_steps": 2}}, tmp_path / "tstr", tmp_path / "ckpt",
                                volumes=synthetic)
    assert json.loads((tmp_path / "tstr" / "train_summary.json").read_text())["steps"] == 2
    assert len(list((tmp_path / "ckpt").iterdir())) == 4  # 2 clips, real classifier, synthetic classifier


def test_a_cache_missing_training_keys_is_refused_before_training(shards, tmp_path):
    """A key missing from the text cache was a KeyError traceback at the first batch holding it, maybe far into
    training; it is one line, counted, with an example, before the first step."""
    from ctgen.data.stream import iter_raw_samples

    keys = sorted(k for k, _ in iter_raw_samples(shards["manifest"]))
    partial = encode_prompts(_WordEncoder(), {k: "left nodule." for k in keys[:-2]}, tmp_path / "partial.safetensors")
    cfg = {"model": {**TINY, "embed_dim": 8, "text_dim": 12}, "text_encoder": None,
           "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "tensorboard": False},
           "data": {"manifests": [shards["manifest"]], "text_cache": str(partial), "prompt": "generatect",
                    "hu_window": WINDOW}}
    with pytest.raises(ValueError, match=rf"2 of the 8 training keys are not in the text cache {partial} "
                                         rf"\(e.g. '(?:{keys[-2]}|{keys[-1]})'\)"):
        train_clip(cfg, tmp_path / "clip", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_the_clip_text_side_comes_from_the_spec_of_the_family_scored(tmp_path):
    """A latent-flow-only run has no cascade.json: the frozen encoder is the one latent_flow.json names."""
    from ctgen.jobs.features import spec_text_encoder

    minilm = {"kind": "minilm", "path": None, "max_length": 64}
    (tmp_path / "latent_flow.json").write_text(json.dumps({"text_encoders": [minilm, {"kind": "hf", "path": "x"}]}))
    assert spec_text_encoder(tmp_path) == minilm
    (tmp_path / "cascade.json").write_text(json.dumps({"text_encoder": {"kind": "small", "max_length": 32}}))
    assert spec_text_encoder(tmp_path)["kind"] == "small"  # the cascade's, where both exist
    assert spec_text_encoder(tmp_path, tmp_path / "latent_flow.json") == minilm  # the scored family's first
    assert spec_text_encoder(tmp_path / "nothing") == {}
