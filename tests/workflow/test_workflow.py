"""The workflow end to end on a tiny demo config, its reruns after config edits, and its DAG at scale."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from tests.workflow.wf import REPO, SNAKEMAKE, make_workdir, merge, planned_rules, snakemake

pytestmark = pytest.mark.workflow


def test_demo_run_from_nothing_to_shards(demo_run):
    R = demo_run / "results"
    cohort = pd.read_parquet(R / "cohort/cohort.parquet")
    rejects = pd.read_csv(R / "rejects.csv")
    truth = pd.read_csv(demo_run / "resources/demo/dataset/demo_truth.csv", keep_default_na=False)
    # every injected fault is named in the rejects table; no clean volume is
    faulty = set(truth.loc[truth["fault"] != "", "VolumeName"])
    clean = set(truth.loc[truth["fault"] == "", "VolumeName"])
    assert faulty and faulty <= set(rejects["VolumeName"]), rejects
    assert not clean & set(rejects["VolumeName"])
    assert set(rejects["stage"]) >= {"cohort", "preprocess"}
    # shards hold exactly the clean volumes, per split, and verify against their manifests
    n_shard = 0
    for split in ("train", "valid"):
        manifest = json.loads((R / f"shards/{split}/manifest.json").read_text())
        keys = {k for s in manifest["shards"] for k in s["keys"]}
        expect = {n.split(".nii")[0] for n in clean if n.startswith(split)}
        assert keys == expect, (split, keys ^ expect)
        n_shard += manifest["n_samples"]
    assert n_shard == len(clean) == len(set(cohort["VolumeName"]) - set(rejects["VolumeName"]))
    res = subprocess.run([sys.executable, "-m", "ctgen.cli", "verify-shards",
                          str(R / "shards/train/manifest.json"), str(R / "shards/valid/manifest.json")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["n_samples"] == n_shard
    # every rule logged and benchmarked
    assert (R / "logs/cohort.log").stat().st_size > 0
    assert (R / "benchmarks/prep/000.tsv").exists()


def test_samples_read_back_with_stock_webdataset(demo_run):
    from ctgen.data.shards import iter_samples

    samples = list(iter_samples(demo_run / "results/shards/train/manifest.json"))
    assert samples
    s = samples[0]
    assert s["volume"].shape == (64, 64, 32) and str(s["volume"].dtype) == "int16"
    assert s["volume"].min() >= -1000 and s["volume"].max() <= 1000
    assert s["prompt"].split(" years old ")[0].isdigit()
    assert s["meta"]["orientation"] in ("RAS", ["R", "A", "S"])
    assert len(s["labels"]) == 18


def reversed_keys(value):
    """``value`` with the keys of every dict, however deep, in reverse order."""
    if isinstance(value, dict):
        return {k: reversed_keys(v) for k, v in reversed(list(value.items()))}
    return [reversed_keys(v) for v in value] if isinstance(value, list) else value


def reversed_sets(cfg):
    """``cfg`` with the evaluation's set-valued lists (the findings scored, the retrieval k) in reverse order."""
    ev = cfg["evaluation"]
    ev["faithfulness_labels"], ev["retrieval_k"] = ev["faithfulness_labels"][::-1], ev["retrieval_k"][::-1]
    assert len(ev["faithfulness_labels"]) > 1 and len(ev["retrieval_k"]) > 1
    return cfg


def test_rerun_after_config_edits_touches_exactly_the_affected_rules(demo_run, tmp_path):
    edits = {  # each on a fresh copy of the finished run
        "none": None,
        "prompt": {"prompts": {"templates": {"generatect": "{sex}, {age} years: {impression}"}}},
        "structured": {"prompts": {"structured": {"negated": "state"}}},
        "preset": {"presets": {"demo": {"clip": [-1024, 1200]}}},
        "shard": {"shards": {"shard_size": 3}},
        "tok": {"model_presets": {"demo": {"tokenizer": {"train": {"lr": 1e-3}}}}},
        "ae": {"model_presets": {"demo": {"autoencoder": {"train": {"lr": 5e-4}}}}},
        "flow": {"model_presets": {"demo": {"latent_flow": {"train": {"lr": 5e-4}}}}},
        "gen": {"model_presets": {"demo": {"generator": {"model": {"depth": 1}}}}},
        "sr": {"model_presets": {"demo": {"superres": {"train": {"lr": 5e-4}}}}},
        "clip": {"model_presets": {"demo": {"clip": {"train": {"lr": 5e-4}}}}},
        "steps": {"sampling": {"steps": 3}},
        "guidance": {"sampling": {"guidance_scale": 3.0}},
        "flow_steps": {"sampling": {"latent_flow": {"guidance_scale": 3.0}}},
        # a model's default sampler steps: what samples from it, as the sampling section's own steps; no training.
        # (the tiny config sets sampling.sr_steps, which overrides the preset's: null here, then an edit of that alone)
        "sr_sample_steps": {"sampling": {"sr_steps": None},
                            "model_presets": {"demo": {"superres": {"model": {"sample_steps": 3}}}}},
        "sr_sample_steps_overridden": {"model_presets": {"demo": {"superres": {"model": {"sample_steps": 3}}}}},
        "flow_sample_steps": {"model_presets": {"demo": {"latent_flow": {"model": {"sample_steps": 3}}}}},
        # the autoencoder's encode window: the latent cache and what is trained on it, not the autoencoder
        "encode_window": {"model_presets": {"demo": {"autoencoder": {"model": {"encode_window": [16, 32, 32]}}}}},
        "eval": {"evaluation": {"hu_tolerance": 30.0}},
        "bootstrap": {"evaluation": {"bootstrap": 500, "faithfulness_labels": ["Cardiomegaly", "Pleural effusion"]}},
        "slices": {"evaluation": {"slices_per_volume": 8}},
        "evsplit": {"evaluation": {"split": "train"}},  # the references and the probe's held-out latents
        "reordered": reversed_sets,  # the same findings and k in another order: nothing
        "fig": {"figures": {"dpi": 100}},
        "slicenet": {"evaluation": {"slicenet": {"train": {"lr": 1e-3}}}},
        "tstr": {"evaluation": {"tstr_reports": 3}},
        "tstr_steps": {"evaluation": {"tstr_steps": 3}},
        # the same settings with every key in reverse order (a YAML tool's sorting, or a hand edit): nothing
        "sorted": reversed_keys,
        # where resumable state lives, how often a training logs, how fast reports are parsed: nothing but the record
        # of the super-resolution batch for `ctgen sample` by hand
        "bookkeeping": {"models": {"checkpoints": "elsewhere"}, "reports": {"batch_size": 7},
                        "evaluation": {"batch_size": 1}, "sampling": {"batch_size": 3},
                        "model_presets": {"demo": {"tokenizer": {"train": {"log_every": 7, "ckpt_every": 9}}}}},
        "dicom": {"sampling": {"dicom": False}},  # both families write (or not) their DICOM series
        "cascade_only_key": {"models": {"superres_lowres": "reconstruction"}},
    }

    def plan_of(name):
        work = tmp_path / name
        shutil.copytree(demo_run, work, symlinks=True)
        return name, planned_rules(work, edits[name])

    # two dry runs at a time: each is a snakemake process of ~4 s on one core, and this test runs in the
    # suite's last minutes, where the other workers have finished
    with ThreadPoolExecutor(2) as pool:
        jobs = dict(pool.map(plan_of, edits))  # rule -> planned jobs
    plan = {name: set(rules) for name, rules in jobs.items()}

    assert plan["none"] == set()  # a finished run has nothing to do
    # what reads the samples or the models: each family's evaluation, their comparison, the report
    scoring = {"evaluate", "compare_families", "guidance_scale", "guidance_sweep", "figures", "metric_tables", "all"}
    scoring_families = scoring - {"guidance_scale", "guidance_sweep"}  # the guidance sweep samples the cascade alone
    # the cascade also samples the TSTR training set, on which the TSTR classifier trains again
    sampling = {"cascade", "sample", "sample_tstr", "tstr_shards", "train_tstr"} | scoring
    latent_sampling = {"latent_flow_spec", "sample_latent_flow"} | scoring_families  # the latent flow family's
    # the flow network's text-reliance probe: after its training, in the report's tables
    latent = {"train_autoencoder", "encode_latents", "latents_manifest", "train_latent_flow",
              "probe_latent_flow"} | latent_sampling
    # everything trained on the shards: whatever rewrites them retrains both families and the feature networks
    models = {"train_tokenizer", "encode_tokens", "tokens_manifest", "train_generator", "train_superres", "train_clip",
              "train_classifier", "train_slicenet"} | sampling | latent
    prompts = {"prompts", "shards", "shard_manifest", "rejects", "text_tokenizer", "sample_prompts",
               "tstr_prompts"} | models
    # the trainings that read the volumes and labels alone weigh what they read of the shards, which a prompt leaves
    # as it was: not retrained (the models trained on text, and the tokens and latents that carry it, are)
    volumes_only = {"train_tokenizer", "train_autoencoder", "train_classifier", "train_slicenet"}
    assert plan["prompt"] == prompts - volumes_only
    assert plan["structured"] == prompts - volumes_only
    # a preprocessing setting: preprocessing and everything after it, not the cohort or the reports;
    # the HU window also reaches every training config (the models map it to [-1, 1])
    assert plan["preset"] == {"prep", "shards", "shard_manifest", "rejects", "train_config", "slicenet_config"} | models
    # another shard size lays the samples out in another order: the trainings that weigh the shards' contents retrain
    # too, once the manifests (a checkpoint) have been written; a dry run does not weigh what follows a checkpoint
    # that reruns (test_a_prompt_edit_retrains_the_models_trained_on_text_alone runs it)
    assert plan["shard"] == {"shards", "shard_manifest"} | models - volumes_only
    # a model's own settings: that model and what is built from it, nothing upstream
    assert plan["tok"] == \
        {"train_config", "train_tokenizer", "encode_tokens", "tokens_manifest", "train_generator"} | sampling
    assert plan["ae"] == {"train_config"} | latent
    assert plan["flow"] == {"train_config", "train_latent_flow", "probe_latent_flow"} | latent_sampling
    assert plan["gen"] == {"train_config", "train_generator"} | sampling
    assert plan["sr"] == {"train_config", "train_superres"} | sampling
    assert plan["clip"] == {"train_config", "train_clip"} | scoring
    # sampling settings: the samples and their scores (the spec of the models stays); evaluation settings: the
    # scores; figures: the figures
    assert plan["steps"] == sampling - {"cascade"} | {"cascade_sampling"}
    # the default guidance scale: not the guidance sweep, which samples at its own scales
    assert plan["guidance"] == plan["steps"] - {"guidance_scale", "guidance_sweep"}
    # the synthetic TSTR set is sampled again and its classifier retrained; the real one of the same reports is not
    assert jobs["steps"]["tstr_shards"] == jobs["steps"]["train_tstr"] == 1
    assert jobs["tstr"]["tstr_shards"] == jobs["tstr"]["train_tstr"] == 2  # other reports: both sets
    assert plan["flow_steps"] == latent_sampling  # the latent flow family's sampling: that family's samples alone
    assert plan["sr_sample_steps"] == plan["steps"] and plan["flow_sample_steps"] == latent_sampling
    assert plan["sr_sample_steps_overridden"] == set()
    assert plan["encode_window"] == {"encode_latents", "latents_manifest", "train_latent_flow",
                                     "probe_latent_flow"} | latent_sampling
    # a scoring setting scores the guidance sweep again without sampling it again; the slices its 2D FID takes are
    # read from the sampled volumes
    assert plan["eval"] == plan["bootstrap"] == scoring - {"guidance_scale"}
    assert plan["slices"] == scoring
    # the evaluation split: the scores and the flow network's held-out probe, never a training (the probe's held-out
    # latents were an input of the flow network's training)
    assert plan["evsplit"] == scoring | {"probe_latent_flow"}
    assert plan["reordered"] == set()  # the scores do not depend on the order (ctgen.jobs.eval_config)
    assert plan["fig"] == {"figures", "metric_tables", "all"}
    # the slice network's settings: it and the scores; TSTR's size: its samples, classifiers and the scores
    assert plan["slicenet"] == {"slicenet_config", "train_slicenet"} | scoring
    assert plan["tstr"] == {"tstr_prompts", "sample_tstr", "tstr_shards", "train_tstr"} | scoring_families
    # the TSTR classifiers' steps: their config and training, not the feature classifier or the samples
    assert plan["tstr_steps"] == {"train_config", "train_tstr"} | scoring_families
    assert plan["sorted"] == set() and plan["bookkeeping"] == {"cascade_sampling", "all"}
    assert plan["dicom"] == {"sample", "sample_latent_flow"} | scoring_families
    # super-resolution's low-res inputs: the tokenizer's reconstructions (a shard set of their own), super-resolution
    # and what samples from it; not the generator (its token shards stay) nor the latent flow family
    assert plan["cascade_only_key"] == {"encode_recon", "recon_manifest", "train_superres"} | sampling


def test_a_prompt_edit_retrains_the_models_trained_on_text_alone(demo_run, tmp_path):
    """Shards written again with other prompts retrain CLIP (trained on text), not the tokenizer, the autoencoder, the
    classifier or SliceNet: each weighs the digest of what it reads of the shards (the volumes, the labels;
    ctprep.shards.content_digest), read again once the manifests (a checkpoint) are written. Before, a template edit
    retrained every model (at CT-RATE's size, the tokenizer and the autoencoder are GPU-days). Another shard size
    (another sample order) retrains them all."""
    work = tmp_path / "work"
    shutil.copytree(demo_run, work, symlinks=True)
    models = ("tokenizer", "autoencoder", "classifier", "slicenet", "clip")
    targets = [f"results/models/{m}/model.safetensors" for m in models]

    def stamps():
        return {m: (work / f"results/models/{m}/model.safetensors").stat().st_mtime_ns for m in models}

    def edit(change):
        cfg = merge(yaml.safe_load((work / "config.yaml").read_text()), change)
        (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    before = stamps()
    manifest = work / "results/shards/train/manifest.json"
    shards = json.loads(manifest.read_text())["shards"]
    edit({"prompts": {"templates": {"generatect": "{sex}, {age} years: {impression}"}}})
    snakemake(work, *targets)
    after = json.loads(manifest.read_text())["shards"]
    assert [s["sha256"] for s in after] != [s["sha256"] for s in shards]  # the shards were written again
    assert [s["member_sha256"]["vol.b2nd"] for s in after] == [s["member_sha256"]["vol.b2nd"] for s in shards]
    now = stamps()
    assert {m for m in models if now[m] != before[m]} == {"clip"}
    assert planned_rules(work, None, "-n", *targets) == {}
    edit({"shards": {"shard_size": 3}})
    snakemake(work, *targets)
    later = stamps()
    assert all(later[m] != now[m] for m in models)
    assert planned_rules(work, None, "-n", *targets) == {}


def test_weights_replaced_at_the_same_path_rerun_what_loads_them(demo_run, tmp_path):
    """A local weights file named in config.yaml is an input of the jobs that load it: replaced in place (the same
    path, so the same params), it reruns them by its date; the MAISI checkpoint and frozen encoders' folders the same
    way (ctgen.jobs.workflow_config.local_files)."""
    work = tmp_path / "work"
    shutil.copytree(demo_run, work, symlinks=True)
    weights = tmp_path / "pt_inception-2015-12-05.pth"
    weights.write_bytes(b"old")
    os.utime(weights, (946684800, 946684800))  # 2000-01-01: older than the results
    mtime = ("--rerun-triggers", "mtime")  # dates alone: the path's first appearance in the params is not the point
    assert planned_rules(work, {"evaluation": {"inception_weights": str(weights)}}, *mtime) == {}
    weights.write_bytes(b"new")
    assert set(planned_rules(work, None, *mtime)) == \
        {"evaluate", "compare_families", "figures", "metric_tables", "all"}


def test_a_fresh_checkout_reruns_nothing_and_a_script_edit_its_rule(demo_run, tmp_path):
    """Snakemake's `code` trigger compares a script's file date with its outputs': a clone of the same commit
    planned every job of a finished run. With the profile's triggers, a checkout with every file dated now plans
    nothing, and an edit of a script's content reruns its rule (and what reads its outputs)."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("Snakefile", "config.yaml", "workflow", "envs"):  # copied, not copy2: every file dated now
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, checkout / name, copy_function=shutil.copy)
        else:
            shutil.copy(src, checkout / name)
    work = tmp_path / "work"
    shutil.copytree(demo_run, work, symlinks=True)
    profile = ("--workflow-profile", str(checkout / "workflow/profiles/local"))
    assert planned_rules(work, None, *profile, repo=checkout) == {}
    script = checkout / "workflow/scripts/metric_tables.py"
    script.write_text(script.read_text() + "# an edit\n")
    assert set(planned_rules(work, None, *profile, repo=checkout)) == {"metric_tables", "all"}


def test_strict_mode_fails_and_names_the_rejects(demo_run, tmp_path):
    work = tmp_path / "strict"
    shutil.copytree(demo_run, work, symlinks=True)
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    cfg["prep"]["strict"] = True
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = snakemake(work, check=False)
    assert res.returncode != 0
    log = (work / "results/logs/cohort.log").read_text()
    assert "strict mode" in log and "missing metadata row" in log


def test_lint_is_clean():
    res = subprocess.run([*SNAKEMAKE, "--lint"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0 and "Lints for" not in res.stdout + res.stderr, res.stdout + res.stderr


def test_bad_config_gets_a_clear_message(tmp_path):
    work = make_workdir(tmp_path, {"prep": {"preset": "nope"}})
    res = snakemake(work, "-n", check=False)
    assert res.returncode != 0 and "is not among presets" in res.stdout + res.stderr
    work = make_workdir(tmp_path / "b", {"prep": {"n_chunks": 0}})
    res = snakemake(work, "-n", check=False)
    assert res.returncode != 0 and "n_chunks" in res.stdout + res.stderr


def test_dag_of_a_50k_cohort_builds_fast(tmp_path):
    # 500 chunks of 100 volumes: the DAG depends on the chunk count, not on reading the cohort
    work = make_workdir(tmp_path, {"demo": {"enabled": False}, "dataset": {"root": str(tmp_path / "ds")},
                                   "prep": {"n_chunks": 500}})
    (tmp_path / "ds").mkdir()
    t0 = time.perf_counter()
    res = snakemake(work, "-n", "--quiet", "rules")
    seconds = time.perf_counter() - t0
    assert "prep" in res.stdout and " 500" in res.stdout
    assert seconds < 60, seconds


def test_rejects_name_only_the_injected_faults(demo_run):
    rejects = pd.read_csv(demo_run / "results/rejects.csv")
    truth = pd.read_csv(demo_run / "resources/demo/dataset/demo_truth.csv", keep_default_na=False)
    assert set(rejects["VolumeName"]) == set(truth.loc[truth["fault"] != "", "VolumeName"])


def test_reports_are_parsed_and_agree_with_the_demo_labels(demo_run):
    labels = pd.read_parquet(demo_run / "results/reports/labels.parquet")
    mentions = pd.read_parquet(demo_run / "results/reports/mentions.parquet")
    assert len(labels) > 0 and {"status", "label", "laterality"} <= set(mentions.columns)
    agreement = pd.read_csv(demo_run / "results/reports/label_agreement.tsv", sep="\t")
    # the demo reports state exactly their labels, in CT-RATE prose: the parser must read them back
    assert (agreement["agreement"] >= 0.9).all(), agreement
    prompts = pd.read_parquet(demo_run / "results/prompts/prompts.parquet")
    assert "structured" in prompts and prompts["structured"].str.len().gt(0).all()


def test_the_cascade_is_trained_with_provenance(demo_run):
    for model in ("tokenizer", "generator", "superres"):
        folder = demo_run / "results/models" / model
        meta = json.loads((folder / "config.json").read_text())
        assert meta["provenance"]["seed"] == 0 and meta["provenance"]["ctgen_version"]
        metrics = pd.read_csv(folder / "metrics.csv")
        assert metrics["loss"].notna().all() and metrics["step"].max() > 0
    assert list((demo_run / "checkpoints").glob("*/*/last.pt"))  # resumable state beside, not inside, the outputs


def real_copy(tmp_path):
    """A working folder on a real CT-RATE-layout copy (the demo cohort written by ``ctprep demo``, no demo rule):
    (work folder, dataset root, its config)."""
    work = make_workdir(tmp_path / "work", {"demo": {"enabled": False}})
    root = tmp_path / "dataset"
    subprocess.run([sys.executable, "-m", "ctprep.cli", "demo", str(root), "--config", str(work / "config.yaml")],
                   check=True, capture_output=True)
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    cfg["dataset"]["root"] = str(root)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return work, root, cfg


def rewrite(path, first_half: bool, value: int) -> None:
    """A volume replaced at the same path: the first (or second) half of its first axis set to ``value`` (other
    voxels, another file size)."""
    image = nib.load(path)
    data = np.asanyarray(image.dataobj).copy()
    middle = data.shape[0] // 2
    data[slice(None, middle) if first_half else slice(middle, None)] = value
    nib.save(nib.Nifti1Image(data, image.affine, image.header), path)


def test_a_cohort_rerun_prepares_again_only_the_chunks_whose_rows_changed(tmp_path):
    """The cohort is a checkpoint and each prep chunk's param is the digest of the rows it reads: a corrected report
    reruns the cohort and prepares nothing; a volume removed from the copy prepares its own chunk alone (before,
    any cohort rerun prepared every chunk again: hours of CPU at CT-RATE's size). Under --until the cohort is a
    plain rule (Snakemake loses a checkpoint's chunk jobs there): every chunk again, but never nothing."""
    work, root, cfg = real_copy(tmp_path)
    prep = [f"results/prep/{c:03d}.parquet" for c in range(cfg["prep"]["n_chunks"])]
    targets = ("-n", *prep)  # for planned_rules: -n ends its --quiet list
    snakemake(work, *prep)
    cohort = pd.read_parquet(work / "results/cohort/cohort.parquet")
    assert cohort["chunk"].nunique() == 2  # both chunks hold volumes

    def stamps():
        return {p.stem: p.stat().st_mtime_ns for p in (work / "results/prep").glob("*.parquet")}

    before = stamps()
    assert len(before) == 2 and planned_rules(work, None, *targets) == {}
    reports = root / "radiology_text_reports/train_reports.csv"
    table = pd.read_csv(reports)
    table.loc[0, "Findings_EN"] += " A corrected sentence."
    table.to_csv(reports, index=False)
    assert planned_rules(work, None, *targets) == {"cohort": 1}  # a checkpoint: the chunks are weighed after it
    snakemake(work, *prep)
    assert stamps() == before  # the report is no input of preparation
    gone = cohort.iloc[0]
    Path(gone["path"]).unlink()  # a volume the user removed: its chunk's rows change
    snakemake(work, *prep)
    after = stamps()
    changed = {c for c in after if after[c] != before[c]}
    assert changed == {f"{gone['chunk']:03d}"}, (changed, gone["chunk"])
    prepared = pd.read_parquet(work / f"results/prep/{gone['chunk']:03d}.parquet")
    assert gone["VolumeName"] not in set(prepared["VolumeName"])
    assert planned_rules(work, None, *targets) == {}
    # a volume replaced at the same path (a corrected download: other voxels, other size) under --until: the
    # cohort reruns and, a plain rule there, every chunk is prepared again, each recording its rows as they are now
    chunk = f"{1 - gone['chunk']:03d}"  # the other chunk; one of its volumes that prepared (not a demo fault)
    other = cohort.set_index("VolumeName").loc[pd.read_parquet(work / f"results/prep/{chunk}.parquet")["VolumeName"][0]]
    rewrite(other["path"], True, -1000)
    before = stamps()
    snakemake(work, "--until", "prep")
    assert all(stamps()[c] != before[c] for c in before)
    assert planned_rules(work, None, *targets) == {}
    before = stamps()
    rewrite(other["path"], False, 0)  # the same without --until: its chunk alone (its size changed)
    snakemake(work, *prep)
    after = stamps()
    assert {c for c in after if after[c] != before[c]} == {chunk}


def test_a_real_copy_reruns_its_cohort_for_new_volumes_not_for_other_files(tmp_path):
    """A real CT-RATE copy (no demo rule): its folder's date is not compared, its tables and its volumes (by name and
    size) are. A note or a partial download at the folder's top reran the cohort and every prep chunk after it."""
    work, root, cfg = real_copy(tmp_path)
    until = ("--until", "cohort")
    snakemake(work, *until)
    assert planned_rules(work, None, *until) == {}
    (root / "NOTES.txt").write_text("downloaded 2026-12-07\n")  # the folder's date is now newer than the cohort
    (root / "train_fixed.part").write_bytes(b"")
    assert planned_rules(work, None, *until) == {}
    scan = next(root.glob("train*/*/*/*.nii.gz"))  # one more volume downloaded
    shutil.copy(scan, scan.with_name(scan.name.replace(".nii.gz", "_9.nii.gz")))
    assert planned_rules(work, None, *until) == {"cohort": 1}
