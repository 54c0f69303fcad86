"""The latent flow family's jobs on tiny shards: autoencoder training, the (mu, sigma) cache with its scale
factor, flow training from the cache, the sampling spec and `ctgen sample --family latent_flow`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ctgen.cli import main as ctgen_main
from ctgen.data.derived import load_derived, weights_id
from ctgen.data.stream import iter_raw_samples
from ctgen.jobs.latents import encode_latents, latent_scale_factor, report_sections
from ctgen.jobs.sample import write_latent_spec
from ctgen.jobs.text import fit_text_tokenizer
from ctgen.jobs.train import run_training

from tests.ctgen.tiny import WINDOW

TRAIN = {"max_steps": 3, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "ckpt_every": 2, "log_every": 1,
         "tensorboard": False, "seed": 0}
AE = {"num_channels": [8, 16, 16], "num_res_blocks": [1, 1, 1], "norm_num_groups": 4, "latent_channels": 4,
      "adv_weight": 0.0, "decode_window": None}
FLOW = {"latent_channels": 4, "latent_shape": [2, 4, 4], "channels": [16, 32], "attention_levels": [False, True],
        "num_head_channels": [0, 8], "num_res_blocks": 1, "norm_num_groups": 8, "cross_attention_dim": 16,
        "segments": ["findings", "impression"], "sample_steps": 2}
TEXT = {"dim": 16, "depth": 1, "heads": 2, "dropout": 0.0, "max_length": 32}


@pytest.fixture(scope="module")
def latent_run(cohort, tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    models = root / "models"
    data = {"manifests": [cohort["manifest"]], "hu_window": WINDOW}
    run_training("autoencoder", {"model": AE, "train": TRAIN, "data": data}, models / "autoencoder", root / "ckpt")
    latents = encode_latents(models / "autoencoder", cohort["manifest"], root / "latents", WINDOW, batch_size=4)
    tok = fit_text_tokenizer(cohort["prompts"], ["generatect"], root / "tok.json", vocab_size=120)
    run_training("latent_flow", {"model": FLOW, "text_encoder": TEXT, "train": TRAIN,
                                 "data": {"latents": [str(latents)], "text_tokenizer": str(tok), "prompt": "generatect"}},
                 models / "latent_flow", root / "ckpt")
    return {"root": root, "models": models, "latents": latents, "tok": tok}


def test_the_cache_holds_mu_and_sigma_and_their_moments(latent_run, cohort):
    samples = dict(iter_raw_samples(latent_run["latents"]))
    assert len(samples) == 6
    first = samples["train_0_a_1"]
    assert first["mu.npy"].shape == first["sigma.npy"].shape == (4, 2, 4, 4) and first["mu.npy"].dtype == np.float16
    assert (first["sigma.npy"] > 0).all() and np.allclose(first["spacing.npy"], [2.0, 2.0, 5.0])
    # deterministic: encoding again gives the same bytes (the posterior's parameters, never a draw)
    again = encode_latents(latent_run["models"] / "autoencoder", cohort["manifest"], latent_run["root"] / "again",
                           WINDOW, batch_size=3)
    a, b = load_derived(latent_run["latents"]), load_derived(again)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert a["producer"] == weights_id(latent_run["models"] / "autoencoder")
    # the scale factor from the manifest's moments equals 1 / std of z = mu + sigma eps computed here
    from ctgen.models.autoencoder import MaisiAutoencoder

    ae = MaisiAutoencoder.from_pretrained(latent_run["models"] / "autoencoder").eval()
    mus, sigmas = [], []
    with torch.no_grad():
        for key, raw in iter_raw_samples(cohort["manifest"]):
            from ctgen.data.batches import volume_decode

            mu, sigma = ae.encode(volume_decode(WINDOW)(raw)["volume"][None])
            mus.append(mu.double().numpy().ravel())
            sigmas.append(sigma.double().numpy().ravel())
    mu, sigma = np.concatenate(mus), np.concatenate(sigmas)
    expected = 1 / np.sqrt(np.mean(sigma**2) + np.var(mu))
    assert latent_scale_factor([latent_run["latents"]]) == pytest.approx(expected, rel=1e-4)
    flow_cfg = json.loads((latent_run["models"] / "latent_flow" / "config.json").read_text())
    assert flow_cfg["config"]["scale_factor"] == pytest.approx(expected, rel=1e-4)
    assert flow_cfg["provenance"]["latents_from"] == a["producer"]


def test_the_cache_can_be_encoded_in_windows(latent_run, cohort):
    """encode_window reaches the encoder from the job (the workflow's encode_latents flags): each sample's latents
    are the windowed encode's, not the whole one's; a window off the latent grid is refused before any work."""
    import dataclasses

    from ctgen.data.batches import volume_decode
    from ctgen.models.autoencoder import MaisiAutoencoder

    ae_dir = latent_run["models"] / "autoencoder"
    windowed = encode_latents(ae_dir, cohort["manifest"], latent_run["root"] / "windowed", WINDOW,
                              encode_window=(8, 8, 8), encode_overlap=0.5)
    ae = MaisiAutoencoder.from_pretrained(ae_dir).eval()
    key, raw = next(iter_raw_samples(cohort["manifest"]))
    with torch.no_grad():
        vol = volume_decode(WINDOW)(raw)["volume"][None]  # (1, 1, 8, 16, 16): two windows in-plane
        whole = ae.encode(vol)[0][0]
        ae.config = dataclasses.replace(ae.config, encode_window=(8, 8, 8), encode_overlap=0.5)
        tiled = ae.encode(vol)[0][0]
    got = dict(iter_raw_samples(windowed))[key]["mu.npy"]
    np.testing.assert_array_equal(got, tiled.to(torch.float16).numpy())
    assert not np.allclose(got, whole.numpy(), atol=1e-2)
    with pytest.raises(ValueError, match="each step must be a multiple of 4"):
        encode_latents(ae_dir, cohort["manifest"], latent_run["root"] / "bad", WINDOW, encode_window=(8, 8, 8),
                       encode_overlap=0.2)  # steps of 6 voxels


def test_report_sections_of_a_shard_meta():
    meta = {"report": {"findings": "Right pleural effusion.", "impression": "Not given.", "technique": "x"}}
    assert report_sections(meta) == {"findings": "Right pleural effusion.", "impression": ""}
    assert report_sections({}) == {"findings": "", "impression": ""}


def test_the_probe_job_asks_whether_the_flow_network_reads_the_report(latent_run, tmp_path):
    """`ctgen probe-latent-flow` after training (a job of its own: its held-out latents are no input of the
    training): the paired loss gains and velocity shift, each with n and a CI."""
    assert not (latent_run["models"] / "latent_flow" / "text_reliance.json").exists()  # training does not probe
    config = tmp_path / "latent_flow.json"
    config.write_text(json.dumps({"model": FLOW, "text_encoder": TEXT, "train": TRAIN, "data": {"prompt": "generatect"}}))
    probe = tmp_path / "probe" / "text_reliance.json"
    assert ctgen_main(["probe-latent-flow", "--config", str(config), "--network", str(latent_run["models"] / "latent_flow"),
                       "--latents", str(latent_run["latents"]), "--text-tokenizer", str(latent_run["tok"]),
                       "--out", str(probe), "--run-settings", json.dumps({"device": "cpu"})]) == 0
    records = json.loads(probe.read_text())
    names = {r["name"] for r in records}
    assert {f"text_reliance.{k}@{t}" for k in ("gain_vs_null", "gain_vs_other", "velocity_shift")
            for t in ("0.2", "0.5", "0.8")} == names
    n_latents = sum(1 for _ in iter_raw_samples([latent_run["latents"]]))
    assert all(r["n"] == min(64, n_latents) and r["ci"] is not None for r in records)
    # data.text_probe_latents 0: the file the workflow declares, empty
    from ctgen.jobs.train_latent import probe_text_reliance

    out = latent_run["root"] / "no_probe"
    shutil.copytree(latent_run["models"] / "latent_flow", out)
    assert json.loads(probe_text_reliance(out, lambda ctx: iter(()), max_latents=0).read_text()) == []
    # held-out latents (the workflow's evaluation split) scored beside them as text_reliance.heldout.*: given
    # the training latents themselves, the probe gives the training rows' numbers under the held-out names
    from ctgen.data import batches

    make = batches.streamed([str(latent_run["latents"])], batches.latent_decode("generatect"),
                            batches.latent_flow_collate(("findings", "impression"),
                                                        batches.SectionTokens(str(latent_run["tok"]), 32)))
    both = json.loads(probe_text_reliance(out, make, batch_size=2, device="cpu", heldout=make).read_text())
    train = {r["name"]: r for r in both if not r["name"].startswith("text_reliance.heldout.")}
    held = {r["name"].replace(".heldout", ""): r for r in both if r["name"].startswith("text_reliance.heldout.")}
    assert set(train) == set(held) == names and len(both) == 18
    for name, r in train.items():
        assert held[name]["value"] == pytest.approx(r["value"], rel=1e-6, abs=1e-9) and held[name]["n"] == r["n"]
        assert "training latents" in r["profile"] and "held-out latents" in held[name]["profile"]


def test_frozen_encoders_set_the_text_widths_from_their_caches(latent_run, tmp_path):
    """A frozen encoder's cache of another width than the preset's (MiniLM 384 vs CXR-BERT's 768) trains, and
    sections up to the cache's max_length fit the context (a preset's 4 rows failed at the first long section)."""
    from ctgen.data.text_cache import encode_prompts

    from tests.ctgen.test_feature_nets import _WordEncoder

    keys = [key for key, _ in iter_raw_samples(latent_run["latents"])]
    sections = {"findings": "small right pleural effusion with adjacent atelectasis", "impression": "effusion"}
    texts = {f"{k}:{seg}": text for k in keys for seg, text in sections.items()}
    cache = encode_prompts(_WordEncoder(), texts, tmp_path / "sections.safetensors")
    model = {**FLOW, "text_dims": [768], "max_text_tokens": 4}  # what a preset names (CXR-BERT's width)
    run_training("latent_flow", {"model": model, "train": {**TRAIN, "max_steps": 2},
                                 "data": {"latents": [str(latent_run["latents"])], "text_cache": str(cache),
                                          "prompt": "generatect"}},
                 tmp_path / "flow", tmp_path / "ckpt")
    saved = json.loads((tmp_path / "flow" / "config.json").read_text())["config"]
    assert saved["text_dims"] == [_WordEncoder.dim] and saved["text_encoder"] is None
    assert saved["max_text_tokens"] == _WordEncoder.max_length
    # a section missing from the cache is refused before the first step (a KeyError at its first batch before)
    partial = encode_prompts(_WordEncoder(), {k: t for k, t in texts.items() if not k.endswith(":impression")},
                             tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match=rf"{len(keys)} of the {2 * len(keys)} training keys are not in the text "
                                         rf"cache {partial} \(e.g. '.*:impression'\)"):
        run_training("latent_flow", {"model": model, "train": {**TRAIN, "max_steps": 2},
                                     "data": {"latents": [str(latent_run["latents"])], "text_cache": str(partial),
                                              "prompt": "generatect"}},
                     tmp_path / "flow2", tmp_path / "ckpt2")


def test_spec_and_sampling_through_the_cli(latent_run, cohort, tmp_path):
    models = latent_run["models"]
    preset = {"mode": "spacing", "spacing": [2.0, 2.0, 5.0], "shape": [16, 16, 8], "clip": WINDOW}
    models_cfg = {"text_encoder": {"kind": "small", "path": None, "max_length": 32}}
    write_latent_spec(models, preset, models_cfg, {"guidance_scale": 2.0}, [str(latent_run["latents"])],
                      [cohort["manifest"]], latent_run["tok"],
                      prompts={"templates": {}, "structured": {"enabled": True, "negated": "state"}, "max_chars": 90})
    spec = json.loads((models / "latent_flow.json").read_text())
    assert spec["grid"]["spacing_source"].startswith("the prep preset's fixed spacing")
    assert spec["prompt_rendering"] == {"max_chars": 90, "negated": "state"}  # how a new report is rendered
    assert spec["evaluation_text_encoder"]["kind"] == "small"  # the CLIP model's (models.text_encoder)
    prompts = tmp_path / "reports.csv"
    prompts.write_text("id,findings,impression\nr1,Right pleural effusion.,\nr2,,No acute findings.\n")
    out = tmp_path / "samples"
    assert ctgen_main(["sample", "--family", "latent_flow", "--models", str(models), "--prompts", str(prompts),
                       "--out-dir", str(out), "--seed", "3"]) == 0
    from ctprep.volume import load_nifti

    vol = load_nifti(out / "r1_s3.nii.gz")
    assert vol.shape == (16, 16, 8) and np.allclose(vol.spacing, [2.0, 2.0, 5.0], atol=1e-5)
    side = json.loads((out / "r2_s4.json").read_text())
    assert side["family"] == "latent_flow" and side["report"] == {"findings": "", "impression": "No acute findings."}
    assert side["spacing"]["mm"] == [2.0, 2.0, 5.0] and set(side["weights_sha256"]) == {"autoencoder", "latent_flow"}
    assert side["provenance"]["device"] == "cpu" and side["provenance"]["precision"] == "fp32"  # "auto" resolved
    # the window the volume was made in (export.hu_range is wider), and its voxels at each bound
    data = np.asarray(load_nifti(out / "r2_s4.nii.gz").data)
    assert side["hu_window"] == {"hu": WINDOW, "n_low": int((data == WINDOW[0]).sum()),
                                 "n_high": int((data == WINDOW[1]).sum())}
    # the VLM3D contract: one <input_image_name>.nii.gz per entry, stored in CT-RATE's voxel order
    entries = tmp_path / "prompts.json"
    entries.write_text(json.dumps([{"input_image_name": "valid_9_a_1", "report": "Right pleural effusion."}]))
    assert ctgen_main(["sample", "--family", "latent_flow", "--models", str(models), "--vlm3d", str(entries),
                       "--out-dir", str(tmp_path / "sub")]) == 0
    import nibabel as nib

    img = nib.load(tmp_path / "sub" / "valid_9_a_1.nii.gz")
    assert nib.aff2axcodes(img.affine) == ("P", "L", "I") and img.get_data_dtype() == np.int16
    # latents made by another autoencoder are refused by name
    other = tmp_path / "other"
    run_training("autoencoder", {"model": {**AE, "num_res_blocks": [1, 1, 2]}, "train": TRAIN,
                                 "data": {"manifests": [cohort["manifest"]], "hu_window": WINDOW}},
                 other / "autoencoder", tmp_path / "ckpt")
    with pytest.raises(ValueError, match="latent shards were made by autoencoder@"):
        write_latent_spec(other, preset, models_cfg, {}, [str(latent_run["latents"])], [cohort["manifest"]],
                          latent_run["tok"])


def test_resize_presets_write_the_training_volumes_median_spacing(cohort):
    from ctgen.data.grid import resolved_preset

    got = resolved_preset({"mode": "resize", "shape": [16, 16, 8], "clip": WINDOW}, [cohort["manifest"]])
    assert got["spacing"] == [2.0, 2.0, 5.0] and "median spacing of the 6 training volumes" in got["spacing_source"]


def test_nvidia_weights_instead_of_training(cohort, tmp_path):
    """`maisi_checkpoint` in the autoencoder's config: the released state dict (its layout) is loaded, not trained."""
    from ctgen.models.autoencoder import MaisiAutoencoder

    torch.manual_seed(3)
    released = MaisiAutoencoder(MaisiAutoencoder.config_from_dict(AE)).net.state_dict()
    torch.save(released, tmp_path / "autoencoder_epoch273.pt")  # NVIDIA's file: a plain state dict
    out = run_training("autoencoder", {"model": AE, "train": TRAIN, "maisi_checkpoint": str(tmp_path / "autoencoder_epoch273.pt"),
                                       "data": {"manifests": [cohort["manifest"]], "hu_window": WINDOW}},
                       tmp_path / "ae", tmp_path / "ckpt")
    loaded = MaisiAutoencoder.from_pretrained(out).net.state_dict()
    assert all(torch.equal(loaded[k], released[k]) for k in released)
    assert not (tmp_path / "ckpt").exists()  # nothing was trained
    wrong = {k: v for k, v in released.items() if "decoder" not in k}
    torch.save(wrong, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="decoder"):
        run_training("autoencoder", {"model": AE, "train": TRAIN, "maisi_checkpoint": str(tmp_path / "partial.pt"),
                                     "data": {"hu_window": WINDOW}}, tmp_path / "ae2", tmp_path / "ckpt")


def test_several_frozen_encoders_train_and_sample_through_the_cli(latent_run, cohort, tmp_path):
    """Report2CT's conditioning (models.latent_flow_text_encoders): two frozen encoders of other widths, their
    section states cached one file each, mean-pooled and concatenated by the flow network (`--text-cache A B`),
    named in order in the spec, and rebuilt from it to sample from a plain report."""
    import yaml

    from ctgen.data.text_cache import encode_prompts
    from ctgen.models.text_encoders import FrozenReportEncoder, ReportEncoder, ReportEncoderConfig

    keys = [key for key, _ in iter_raw_samples(latent_run["latents"])]
    texts = {f"{k}:{seg}": text for k in keys for seg, text in
             (("findings", "Right pleural effusion."), ("impression", "Effusion."))}
    encoders, caches = [], []
    for name, dim in (("enc_a", 16), ("enc_b", 24)):  # untrained: the plumbing, not what they know
        torch.manual_seed(dim)
        folder = tmp_path / name
        ReportEncoder(ReportEncoderConfig(vocab_size=120, dim=dim, depth=1, heads=2, max_length=32)).save_pretrained(folder)
        shutil.copyfile(latent_run["tok"], folder / "tokenizer.json")
        encoders.append({"kind": "report_encoder", "path": str(folder), "max_length": 32})
        caches.append(str(encode_prompts(FrozenReportEncoder(folder, 32), texts, tmp_path / f"{name}.safetensors")))
    cfg = tmp_path / "flow.yaml"
    cfg.write_text(yaml.safe_dump({"model": {**FLOW, "text_pooling": "mean"}, "train": TRAIN,
                                   "data": {"prompt": "generatect"}}))
    models = tmp_path / "models"
    shutil.copytree(latent_run["models"] / "autoencoder", models / "autoencoder")
    assert ctgen_main(["train", "latent_flow", "--config", str(cfg), "--latents", str(latent_run["latents"]),
                       "--text-cache", *caches, "--out", str(models / "latent_flow"),
                       "--checkpoints", str(tmp_path / "ckpt")]) == 0
    saved = json.loads((models / "latent_flow" / "config.json").read_text())["config"]
    assert saved["text_dims"] == [16, 24] and saved["text_pooling"] == "mean"
    preset = {"mode": "spacing", "spacing": [2.0, 2.0, 5.0], "shape": [16, 16, 8], "clip": WINDOW}
    write_latent_spec(models, preset, {"text_encoder": {"kind": "small"}}, {"guidance_scale": 2.0},
                      [str(latent_run["latents"])], [cohort["manifest"]], encoders=encoders)
    spec = json.loads((models / "latent_flow.json").read_text())
    assert [e["path"] for e in spec["text_encoders"]] == [e["path"] for e in encoders]
    out = tmp_path / "one.nii.gz"
    assert ctgen_main(["sample", "--family", "latent_flow", "--models", str(models), "--prompt",
                       "Right pleural effusion.", "--out", str(out), "--steps", "2"]) == 0
    assert json.loads(out.with_name("one.json").read_text())["report"] == {"findings": "Right pleural effusion.",
                                                                         "impression": ""}
    assert ctgen_main(["train", "generator", "--config", str(cfg), "--tokens", str(cfg), "--text-cache", *caches,
                       "--out", str(tmp_path / "g")]) == 2  # the cascade's models read one cache
