"""The config schema: the model-preset part is generated from the config dataclasses and stays so; a
misspelt or mistyped key fails on load with the key named; hand-written parts agree with their code."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from ctgen.jobs import schema as gen
from ctgen.jobs.figure_list import FIGURES, LABEL_TABLES, TABLES
from ctgen.jobs.figures import FigureConfig
from ctgen.jobs.train import VolumeData, fit_text_dims
from ctgen.models.autoencoder import MaisiAutoencoder
from ctgen.models.classifier3d import Classifier3D
from ctgen.models.clip3d import CLIP3D
from ctgen.models.ctvit import CTViT
from ctgen.models.latent_flow import LatentFlow
from ctgen.models.maskgit import MaskGIT
from ctgen.models.superres_unet import SuperResDiffusion
from ctgen.models.text_encoders import ReportEncoder, SmallTextEncoderConfig
from ctgen.pipelines.text_to_ct import SampleSettings
from ctgen.training.loop import TrainConfig
from tests.workflow.wf import REPO, make_workdir, snakemake

SCHEMAS = REPO / "workflow/schemas"
CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())
MODEL_CLASSES = {"tokenizer": CTViT, "generator": MaskGIT, "superres": SuperResDiffusion, "clip": CLIP3D,
                 "classifier": Classifier3D, "autoencoder": MaisiAutoencoder, "latent_flow": LatentFlow,
                 "report_encoder": ReportEncoder}


def check(cfg: dict) -> dict:
    """Validate as the workflow does (Snakemake's validate, defaults filled in); -> the config."""
    cfg = copy.deepcopy(cfg)
    validate(cfg, str(SCHEMAS / "config.schema.yaml"))
    return cfg


def edited(path: str, value) -> dict:
    """config.yaml with the dotted key ``path`` set to ``value`` (made where absent)."""
    cfg = copy.deepcopy(CONFIG)
    *parents, last = path.split(".")
    node = cfg
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return cfg


def test_committed_model_preset_schema_is_a_fresh_generation():
    committed = (SCHEMAS / "model_presets.schema.yaml").read_text()
    assert committed == gen.to_yaml(gen.preset_schema()), \
        "regenerate: python -m ctgen.jobs.schema > workflow/schemas/model_presets.schema.yaml"


def test_every_dataclass_field_is_described_with_its_default():
    defs = gen.preset_schema()["$defs"]
    for _, sections in gen.MODELS.values():
        for cls in {**sections, "train": TrainConfig}.values():
            props = defs[cls.__name__]["properties"]
            names = {f.name for f in dataclasses.fields(cls) if (cls, f.name) not in gen.SET_ELSEWHERE}
            assert set(props) == names, cls
            for f in dataclasses.fields(cls):
                if f.name in props and props[f.name].get("type") != "object":
                    assert props[f.name]["description"], (cls, f.name)
                    assert props[f.name]["default"] == gen.field_default(f), (cls, f.name)
            # the defaults, read back through the schema, rebuild the dataclass's own defaults
            values = {k: p["default"] for k, p in props.items() if "default" in p}
            if cls is TrainConfig:
                assert TrainConfig.from_dict(values) == TrainConfig()
            elif cls is VolumeData:
                assert values == {}  # the nested augment carries its own defaults
            elif cls not in (SmallTextEncoderConfig,) and cls.__name__.endswith("Config"):
                model = next(m for m in MODEL_CLASSES.values() if m.config_class is cls)
                assert model.config_from_dict(values) == cls()


def test_the_presets_validate_and_build_their_configs():
    cfg = check(CONFIG)
    for name, preset in cfg["model_presets"].items():
        for model, cls in MODEL_CLASSES.items():
            if model not in preset:  # a preset holds the models of its generator families (and the evaluation's)
                continue
            section = preset[model]
            if model == "latent_flow":  # its small encoder is a field of its config (the data sets its vocabulary)
                fields = {**section["model"], "text_encoder": section.get("text_encoder")}
                cls.config_from_dict(fields)
                TrainConfig.from_dict(section["train"])
                continue
            if "text_encoder" in section:  # the model's text width follows its encoder's, as in training
                section = fit_text_dims({**section, "data": {}})
            fields = dict(section["model"])
            if model in ("classifier", "report_encoder") and fields.get("pos_weight") == "auto":
                fields["pos_weight"] = [1.0] * 18  # what training computes from the labels
            if model == "clip":
                fields["text_encoder"] = section.get("text_encoder")
            cls.config_from_dict(fields)  # the model's own check of every key
            TrainConfig.from_dict(section["train"])
            if "text_encoder" in section:
                SmallTextEncoderConfig(**section["text_encoder"])


@pytest.mark.parametrize("path, value, message", [
    ("model_presets.demo.generator.model.dpeth", 2, "'dpeth' was unexpected"),
    ("model_presets.demo.tokenizer.train.learning_rate", 1e-3, "'learning_rate' was unexpected"),
    ("model_presets.mine.tokenizer", {"model": {}, "train": {}}, "'clip' is a required property"),
    ("model_presets.demo.clip.data.augment.flip", True, "'flip' was unexpected"),
    ("model_presets.demo.generator.text_encoder.vocab_size", 500, "'vocab_size' was unexpected"),  # models.text_encoder's
    ("model_presets.demo.tokenizer.data", {"slices_per_volume": 4}, "'data' was unexpected"),
    ("model_presets.demo.generator.model.depth", "two", "'two' is not of type 'integer'"),
    ("model_presets.demo.tokenizer.train.lr", "1e-4", "'1e-4' is not of type 'number'"),  # YAML 1.1 reads 1e-4 as text
    ("model_presets.demo.superres.model.channel_mult", 2, "2 is not of type 'array'"),
    ("model_presets.demo.classifier.model.pos_weight", "manual", "'manual' is not valid under any"),
    ("models.resources.clip.gpus", 1, "'gpus' was unexpected"),
    ("sampling.resources.runtime", "1h", "'1h' is not of type 'integer'"),
    ("evaluation.guidance_scale", 3.0, "'guidance_scale' was unexpected"),
    ("figures.window", "bone", "'bone' is not one of"),
    ("presets.demo.spacing", [5.0, 5.0], "is too short"),
    ("figure", {"dpi": 10}, "'figure' was unexpected"),  # a misspelt section
])
def test_a_wrong_key_or_type_is_named(path, value, message):
    with pytest.raises(WorkflowError) as err:
        check(edited(path, value))
    text = str(err.value)
    assert message in text, text[:500]
    on = ".".join(path.split(".")[:-1]) if "unexpected" in message else path
    if path.startswith("model_presets.mine"):
        on = "model_presets.mine"
    assert "On instance" + "".join(f"[{k!r}]" for k in on.split(".") if k) in text, text[-800:]


def test_snakemake_names_a_misspelt_key_in_one_line(tmp_path):
    work = make_workdir(tmp_path, {"model_presets": {"demo": {"generator": {"model": {"dpeth": 2}}}}})
    res = snakemake(work, "-n", check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "config model_presets.demo.generator.model: Additional properties are not allowed ('dpeth' was " \
           "unexpected)" in out, out[-2000:]
    assert "Failed validating" not in out  # not Snakemake's dump of the schema
    work = make_workdir(tmp_path / "b", {"models": {"preset": "tiny"}})
    res = snakemake(work, "-n", check=False)
    assert res.returncode != 0 and "models.preset 'tiny' is not among model_presets" in res.stdout + res.stderr
    work = make_workdir(tmp_path / "c", {"model_presets": {"demo": {"tokenizer": {"train": {"lr": "2e-3"}}}}})
    res = snakemake(work, "-n", check=False)  # PyYAML reads 2e-3 (no dot) as a string
    assert "config model_presets.demo.tokenizer.train.lr: '2e-3' is not of type 'number' (YAML reads 2e-3 as " \
           "text: write 0.002)" in res.stdout + res.stderr


@pytest.mark.parametrize("edit, message", [
    ({"presets": {"demo": {"clip": [1000, -1000]}}}, "presets.demo.clip: HU window [1000, -1000]: the low bound must be below"),
    ({"demo": {"slices": [40, 20]}}, "demo.slices [40, 20]: the low bound must not be above"),
    ({"model_presets": {"demo": {"tokenizer": {"train": {"max_steps": -1}}}}},
     "model_presets.demo.tokenizer.train: TrainConfig: need max_steps >= 1"),
    ({"evaluation": {"faithfulness_labels": ["Cardiomegally"]}},
     "evaluation.faithfulness_labels: not CT-RATE labels: ['Cardiomegally']"),
    ({"prompts": {"templates": {"generatect": "{agee} year old: {impression}"}}},
     "prompts.templates.generatect: prompt template '{agee} year old: {impression}' uses unknown fields ['agee']"),
    ({"dataset": {"splits": ["train"]}}, "sampling.split reads ['valid'], which dataset.splits ['train'] leaves out"),
    ({"evaluation": {"inception_weights": "/nowhere/pt_inception.pth"}},
     "evaluation.inception_weights: /nowhere/pt_inception.pth does not exist"),
    ({"models": {"text_encoder": {"kind": "hf", "path": "/nowhere/cxr-bert"}}},
     "models.text_encoder.path: /nowhere/cxr-bert does not exist"),
])
def test_values_out_of_range_are_named_before_any_job(tmp_path, edit, message):
    """An inverted HU window clipped every voxel to -1000; a negative step count or a misspelt label failed in
    its job, after the jobs before it had run."""
    res = snakemake(make_workdir(tmp_path, edit), "-n", check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and f"config error: {message}" in out, out[-2000:]
    assert "Traceback" not in out


def test_figures_schema_is_figure_config():
    props = yaml.safe_load((SCHEMAS / "config.schema.yaml").read_text())["properties"]["figures"]["properties"]
    assert set(props) == {f.name for f in dataclasses.fields(FigureConfig)}
    assert {k: p["default"] for k, p in props.items()} == {k: list(v) if isinstance(v, tuple) else v
                                                           for k, v in dataclasses.asdict(FigureConfig()).items()}
    assert FigureConfig.from_dict(check(CONFIG)["figures"])  # the filled-in section builds the config


def test_sampling_defaults_are_the_pipeline_defaults():
    props = yaml.safe_load((SCHEMAS / "config.schema.yaml").read_text())["properties"]["sampling"]["properties"]
    same = {"steps": "steps", "guidance_scale": "guidance_scale", "temperature": "temperature",
            "sr_steps": "sr_steps", "batch_size": "sr_batch_size"}
    assert {k: props[k]["default"] for k in same} == {k: getattr(SampleSettings(), v) for k, v in same.items()}


def test_every_figure_has_a_caption_and_every_caption_a_figure():
    captions = {p.stem for p in (REPO / "workflow/report").glob("*.rst")} - {"workflow"}
    assert captions == set(FIGURES) | {f"table_{name}" for name in TABLES} | set(LABEL_TABLES)
    assert all((REPO / f"workflow/report/{name}.rst").read_text().strip() for name in captions)


def test_every_config_key_is_described():
    """Each key of the hand-written sections has a description; the generated part always has."""
    top = yaml.safe_load((SCHEMAS / "config.schema.yaml").read_text())
    missing = []

    def walk(node, where):
        for key, sub in node.get("properties", {}).items():
            if "description" not in sub:
                missing.append(f"{where}.{key}")
            walk(sub, f"{where}.{key}")

    for section in ("models", "sampling", "evaluation", "figures"):
        walk(top["properties"][section], section)
    walk(top["definitions"]["preset"], "presets.<name>")
    for name in ("job_resources", "train_resources"):
        walk(top["definitions"][name], name)
    assert not missing, missing
    assert Path(SCHEMAS / "model_presets.schema.yaml").is_file()


def test_every_training_jobs_resources_are_required():
    """The rules read every models.resources entry at load: one left out was a KeyError with a stack frame."""
    for model in CONFIG["models"]["resources"]:
        cfg = copy.deepcopy(CONFIG)
        del cfg["models"]["resources"][model]
        with pytest.raises(WorkflowError, match=f"'{model}' is a required property"):
            check(cfg)


def test_settings_repr_ignores_key_order_and_jobs_get_plain_dicts():
    """Snakemake compares params by repr(): the same settings in another key order must compare equal, at every
    depth; a script rule unpickles its params, where a plain dict (no workflow class) must arrive."""
    import pickle

    from ctgen.jobs.workflow_config import Settings, canonical, number_hint

    a = canonical({"b": 1, "a": {"y": [{"q": 1, "p": 2}], "x": 2}})
    b = canonical({"a": {"x": 2, "y": [{"p": 2, "q": 1}]}, "b": 1})
    assert repr(a) == repr(b) and list(a) == ["b", "a"]  # iteration keeps the config's order
    assert repr(canonical({"a": 1})) != repr(canonical({"a": 2}))
    back = pickle.loads(pickle.dumps(a))
    assert type(back) is dict and type(back["a"]) is dict and back == a
    assert isinstance(a["a"]["y"][0], Settings)
    assert number_hint("2e-3", "number") == " (YAML reads 2e-3 as text: write 0.002)"
    assert number_hint("2", ["integer"]) == " (write 2, without quotes)"
    assert number_hint("2.5", "integer") == "" and number_hint("two", "number") == "" and number_hint("2", None) == ""


def test_local_weights_are_inputs_file_by_file(tmp_path, monkeypatch):
    """A weights file, or every file of a weights folder (a Hugging Face encoder: config, tokenizer, weights) but
    hidden ones (a .git or .cache folder), so that one replaced in place reruns the jobs that load it."""
    from ctgen.jobs.workflow_config import local_files

    folder = tmp_path / "cxr-bert"
    (folder / "sub").mkdir(parents=True)
    (folder / ".cache").mkdir()
    for name in ("config.json", "model.safetensors", "sub/vocab.txt", ".cache/lock", ".hidden"):
        (folder / name).write_text("x")
    (tmp_path / "pooling").mkdir()  # a symlinked subfolder (sentence-transformers' layout): its files too
    (tmp_path / "pooling" / "config.json").write_text("x")
    (folder / "1_Pooling").symlink_to(tmp_path / "pooling")
    names = ("1_Pooling/config.json", "config.json", "model.safetensors", "sub/vocab.txt")
    assert local_files(str(folder)) == [str(folder / n) for n in names]
    assert local_files(str(folder / "model.safetensors")) == [str(folder / "model.safetensors")]
    assert local_files(None) == [] and local_files("") == []
    # relative paths come back absolute: results/models/report_encoder would name train_report_encoder's output
    # and Snakemake would plan that rule (a pinned encoder of an earlier run crashed the DAG)
    monkeypatch.chdir(tmp_path)
    assert local_files("cxr-bert/config.json") == [str(folder / "config.json")]


@pytest.mark.parametrize("argv, filtered", [
    (["--until", "prep"], True), (["-U", "prep"], True), (["--until=prep"], True), (["--unt", "prep"], True),
    (["--omit-from", "shards"], True), (["-Oshards"], True), (["--omit-fr", "shards"], True),
    (["--omit-flags", "x"], False), (["--unlock"], False), (["-n", "--cores", "2"], False), ([], False),
    (["-nU", "prep"], True), (["-pUprep"], True), (["-nO", "x"], True), (["--config", "a=-U"], False),
    (["-n", "results/U.parquet"], False),
])
def test_until_and_omit_from_are_found_on_the_command_line(argv, filtered):
    """The cohort is a plain rule under --until/--omit-from (Snakemake loses a checkpoint's chunk jobs there): the
    options in every spelling argparse takes, and no other option."""
    from snakemake.cli import get_argument_parser

    from ctgen.jobs.workflow_config import dag_filtered

    assert dag_filtered(argv, get_argument_parser) is filtered
