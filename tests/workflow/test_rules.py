"""The rules' bookkeeping, read from Snakemake's own plan of a run in which every rule has a job.

Every job writes its own log and its own benchmark; the bookkeeping rules are local (run in the
Snakemake process, never queued on Slurm) and cheap; the wildcard constraints refuse targets that
name no split, chunk or model.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.workflow.wf import REPO, SNAKEMAKE, make_workdir, snakemake

BOOKKEEPING = {"train_config", "shard_manifest", "tokens_manifest", "latents_manifest", "rejects", "cascade",
               "latent_flow_spec", "sample_prompts"}  # seconds each
JOB = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):\n((?:    .*\n?)*)", re.M)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The tiny config with the optional inputs present, so the DICOM and labeller rules are planned."""
    tmp = tmp_path_factory.mktemp("rules")
    (tmp / "series").mkdir()
    (tmp / "labelled.jsonl").write_text("")
    return make_workdir(tmp / "work", {"dicom": {"series_dir": str(tmp / "series")},
                                       "reports": {"eval_jsonl": str(tmp / "labelled.jsonl")}})


def planned(workdir, *args: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, {log, benchmark, resources, ...}) of every job of a dry run."""
    res = snakemake(workdir, "-n", *args)
    found = [(m.group(1), dict(re.findall(r"^    (\w+): (.*)$", m.group(2), re.M)))
             for m in JOB.finditer(res.stdout + res.stderr)]
    assert found, res.stdout[-3000:] + res.stderr[-3000:]
    return found


@pytest.fixture(scope="module")
def jobs(workdir, tmp_path_factory) -> list[tuple[str, dict[str, str]]]:
    """Every job of a run from nothing, plus the frozen text encoder's and the reconstructions' (the other side of
    a switch)."""
    found = planned(workdir)
    frozen = make_workdir(tmp_path_factory.mktemp("frozen"), {"models": {"text_encoder": {"kind": "report_encoder"}}})
    frozen_jobs = planned(frozen, "--until", "embed_prompts", "embed_sections")
    text = ("train_report_encoder", "embed_prompts", "embed_sections")
    # super-resolution on the tokenizer's reconstructions (as GenerateCT): their own shard set
    recon = make_workdir(tmp_path_factory.mktemp("recon"), {"models": {"superres_lowres": "reconstruction"}})
    recon_jobs = planned(recon, "--until", "recon_manifest")
    return found + [job for job in frozen_jobs if job[0] in text] + \
        [job for job in recon_jobs if job[0] in ("encode_recon", "recon_manifest")]


def test_every_rule_is_planned(workdir, jobs):
    res = snakemake(workdir, "--list-rules")
    rules = {line.split()[0] for line in res.stdout.splitlines() if re.fullmatch(r"\w+", line.strip())}
    assert {"dicom2nifti", "demo_cohort", "evaluate_labeller", "train_clip", "figures"} <= rules
    assert {rule for rule, _ in jobs} == rules


def test_every_job_writes_its_own_log_and_benchmark(jobs):
    work = [(rule, fields) for rule, fields in jobs if rule != "all"]  # `all` only collects targets
    missing = sorted({rule for rule, f in work if "log" not in f or "benchmark" not in f})
    assert not missing, f"rules without a log or a benchmark: {missing}"
    for key, folder in (("log", "results/logs/"), ("benchmark", "results/benchmarks/")):
        paths = [f[key] for _, f in work]
        assert all(p.startswith(folder) for p in paths), paths
        assert len(set(paths)) == len(paths), f"jobs share a {key}: {sorted(p for p in paths if paths.count(p) > 1)}"


def test_bookkeeping_rules_are_local_and_cheap(jobs):
    compiled = subprocess_stdout([*SNAKEMAKE, "--print-compilation"])
    block = re.search(r"workflow\.localrules\((.*?)\)", compiled, re.S)
    assert block, "the Snakefile has no localrules"
    local = set(re.findall(r"'(\w+)'", block.group(1)))
    assert BOOKKEEPING | {"all"} <= local
    for rule, fields in jobs:
        if rule in local - {"all"}:  # on the login node: one core, minutes, no GPU
            res = dict(kv.split("=", 1) for kv in fields["resources"].split(", "))
            assert "threads" not in fields and "gpu" not in res, (rule, fields)
            assert int(res["runtime"]) <= 30 and int(res["mem_mb"]) <= 1000, (rule, res)


def test_every_job_that_can_use_a_gpu_asks_the_slurm_profile_for_one(jobs):
    import yaml

    profile = yaml.safe_load((REPO / "workflow/profiles/slurm/config.yaml").read_text())["set-resources"]
    gpu_rules = {rule for rule, f in jobs if "gpu" in dict(kv.split("=", 1) for kv in f["resources"].split(", "))}
    assert {"train_tokenizer", "train_latent_flow", "sample_latent_flow", "evaluate", "embed_sections",
            "encode_tokens", "encode_recon", "encode_latents"} <= gpu_rules
    missing = sorted(r for r in gpu_rules if profile.get(r, {}).get("gpu", 0) < 1
                     or profile[r].get("slurm_partition") != "gpu")
    assert not missing, f"rules with a gpu resource that the Slurm profile queues without a GPU: {missing}"


@pytest.mark.parametrize("overrides", [{}, {"models": {"generators": ["latent_flow"]}},
                                       {"models": {"generators": ["cascade"], "superres_lowres": "reconstruction",
                                                   "text_encoder": {"kind": "minilm"}}, "evaluation": {"tstr": False}},
                                       {"models": {"text_encoder": {"kind": "report_encoder"}}},
                                       {"models": {"latent_flow_text_encoders": [{"kind": "minilm"},
                                                                                 {"kind": "report_encoder"}]},
                                        "model_presets": {"demo": {"latent_flow": {"model": {"text_pooling": "mean"}}}}}],
                         ids=["both-families", "latent-flow", "cascade-frozen-text", "report-encoder", "flow-encoders"])
def test_every_job_is_a_target_of_all(workdir, tmp_path, overrides):
    """Snakemake does not rebuild a missing intermediate file while the files after it look up to date
    (snakemake/snakemake#1978), and a job deletes its outputs when it starts: after a job that failed, a rerun
    would leave the old results in place. One output of every job among `all`'s targets reruns it instead."""
    work = make_workdir(tmp_path, overrides) if overrides else workdir
    plan = planned(work)
    targets = set(next(f for rule, f in plan if rule == "all")["input"].split(", "))
    uncovered = sorted({rule for rule, f in plan if rule != "all" and not set(f["output"].split(", ")) & targets})
    assert not uncovered, f"jobs that no target of `all` reruns after they fail: {uncovered}"
    assert len(plan) > 30


def test_the_latent_flow_family_reads_its_own_encoders(tmp_path):
    """models.latent_flow_text_encoders: one embed_sections job per encoder, in order, and the flow network trains
    on all their caches while the cascade keeps models.text_encoder (here the small one); the report encoder this
    run pretrains gets the longest max_length of its users."""
    work = make_workdir(tmp_path / "two", {
        "models": {"latent_flow_text_encoders": [{"kind": "minilm", "max_length": 32},
                                                 {"kind": "report_encoder", "max_length": 48}]},
        "model_presets": {"demo": {"latent_flow": {"model": {"text_pooling": "mean"}}}}})
    res = snakemake(work, "-n", "-p", "results/models/latent_flow.json", "results/models/generator/model.safetensors")
    out = res.stdout + res.stderr
    sections = sorted(re.findall(r"ctgen embed-sections .*--encoder '(\{.*?\})' --out (\S+)", out),
                      key=lambda s: s[1])  # a dry run lists the jobs in no fixed order
    assert [(json.loads(e)["kind"], json.loads(e)["max_length"], path) for e, path in sections] == [
        ("minilm", 32, "results/text/sections/0.safetensors"), ("report_encoder", 48, "results/text/sections/1.safetensors")]
    assert json.loads(sections[1][0])["path"] == "results/models/report_encoder"  # the one this run trains
    assert "--text-cache results/text/sections/0.safetensors results/text/sections/1.safetensors" in out
    assert re.search(r"ctgen train generator .*--text-tokenizer results/text/tokenizer.json", out)
    assert "embed-prompts" not in out  # the cascade's small encoder trains with the generator
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    snakemake(work, "results/models/report_encoder.yaml")
    assert yaml.safe_load((work / "results/models/report_encoder.yaml").read_text())["text_encoder"] == {"max_length": 48}
    assert cfg["models"]["text_encoder"]["kind"] == "small"
    for overrides, needle in (
            ({"models": {"latent_flow_text_encoders": [{"kind": "minilm"}, {"kind": "hf", "path": str(tmp_path)}]}},
             "lists 2 encoders: the preset's latent_flow.model.text_pooling must be mean"),
            ({"models": {"latent_flow_text_encoders": [{"kind": "small"}, {"kind": "minilm"}]},
              "model_presets": {"demo": {"latent_flow": {"model": {"text_pooling": "mean"}}}}},
             "the small trainable encoder is used alone")):
        res = snakemake(make_workdir(tmp_path / "bad", overrides), "-n", check=False)
        lines = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("config error")]
        assert res.returncode != 0 and len(lines) == 1 and needle in lines[0], res.stderr[-2000:]
        assert "Traceback" not in res.stdout + res.stderr


@pytest.mark.parametrize(("overrides", "args", "needle"), [
    ({"prep": {"preset": "spacingg"}}, [], "prep.preset 'spacingg' is not among presets"),
    ({"shards": {"prompt": "generatec"}}, [], "shards.prompt 'generatec' is not a prompt the workflow writes"),
    ({"prompts": {"structured": {"enabled": False}}}, [],
     "models.prompt 'structured' is not a prompt the workflow writes (prompts.structured.enabled is false)"),
    ({"models": {"resources": {"generator": {"gpu": 4}}}}, ["--set-resources", "train_generator:gpu=1"],
     "models.resources.generator.gpu asks for 4 GPUs, but set-resources gives train_generator gpu=1"),
    # the loop divides grad_accum over the job's processes: it refused an uneven split only once the job ran
    ({"models": {"resources": {"generator": {"gpu": 2}}},
      "model_presets": {"demo": {"generator": {"train": {"grad_accum": 3}}}}}, [],
     "model_presets.demo.generator.train.grad_accum 3 is not a multiple of the 2 processes its training job runs "
     "(gpu 2 per node x 1 nodes): make it a multiple of 2"),
    ({"models": {"resources": {"tokenizer": {"nodes": 2}}}}, [],  # CPU nodes: one process each
     "model_presets.demo.tokenizer.train.grad_accum 1 is not a multiple of the 2 processes"),
    # an encode window off the latent grid: refused at load, not by encode_latents after the autoencoder trained
    ({"model_presets": {"demo": {"autoencoder": {"model": {"encode_window": [16, 32, 32], "encode_overlap": 0.2}}}}},
     [], "model_presets.demo.autoencoder.model: encode_window [16, 32, 32] with encode_overlap 0.2 steps by"),
], ids=["preset", "shard-prompt", "structured-off", "gpus", "grad-accum", "grad-accum-cpu-nodes", "encode-window"])
def test_config_mistakes_end_in_one_line_before_any_job(tmp_path, overrides, args, needle):
    res = snakemake(make_workdir(tmp_path, overrides), "-n", *args, check=False)
    lines = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("config error")]
    assert res.returncode != 0 and len(lines) == 1 and needle in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stdout + res.stderr


def test_a_training_config_holds_only_what_its_model_reads(workdir):
    """models.prompt reaches the models trained on prompts, models.lowres_scale those trained on the low-res grid:
    an edit of either retrains no other model (a training config is its checkpoint's key)."""
    models = ("tokenizer", "generator", "superres", "clip", "classifier", "autoencoder", "latent_flow")
    snakemake(workdir, *[f"results/models/{m}.yaml" for m in models])
    data = {m: yaml.safe_load((workdir / f"results/models/{m}.yaml").read_text())["data"] for m in models}
    assert {m for m in models if "prompt" in data[m]} == {"generator", "superres", "clip", "latent_flow"}
    assert {m for m in models if "lowres_scale" in data[m]} == {"tokenizer", "superres"}
    assert all(d["hu_window"] == [-1000, 1000] for d in data.values())


@pytest.mark.parametrize("target", ["results/models/tokeniser.yaml", "results/shards/test/manifest.json",
                                    "results/prep/0a.parquet", "results/evaluation/diffusion/metrics.json",
                                    "results/evaluation/guidance/2.json"])
def test_wildcard_constraints_refuse_unknown_models_splits_and_chunks(workdir, target):
    res = snakemake(workdir, "-n", target, check=False)
    assert res.returncode != 0 and "MissingRuleException" in res.stdout + res.stderr, res.stderr[-2000:]


def subprocess_stdout(cmd: list[str]) -> str:
    import subprocess

    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout
