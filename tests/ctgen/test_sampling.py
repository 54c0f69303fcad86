"""Report text -> synthetic CT: the pipeline on a tiny trained cascade, the CLI, its files and its errors."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from ctgen.cli import main as ctgen_main
from ctgen.pipelines.text_to_ct import SampleSettings, TextToCTPipeline, sampling_defaults, write_sampling_defaults

PROMPT = "63 years old male: Right pleural effusion."


@pytest.fixture(scope="module")
def pipe(tiny_cascade):
    return TextToCTPipeline.from_pretrained(tiny_cascade)


def test_volume_has_the_training_grid_in_hu(pipe):
    vol = pipe([PROMPT], SampleSettings(steps=3, guidance_scale=2.0))[0]
    assert vol.shape == (16, 16, 8)  # the prep grid (I, J, K), after super-resolution
    assert np.allclose(vol.spacing, [2.0, 2.0, 5.0]) and "".join(vol.orientation) == "RAS"
    assert vol.array.dtype == np.int16 and vol.array.min() >= -1000 and vol.array.max() <= 1000
    assert np.allclose(vol.affine[:3, :3] @ (np.array(vol.shape) - 1) / 2 + vol.affine[:3, 3], 0)  # centred at 0
    low = pipe([PROMPT], SampleSettings(steps=3, super_resolution=False))[0]
    assert low.shape == (8, 8, 8) and np.allclose(low.spacing, [4.0, 4.0, 5.0])  # the low-res grid, truthfully


def test_slice_count_is_chosen_at_sampling_time(pipe):
    vol = pipe([PROMPT], SampleSettings(num_slices=5, steps=2))[0]
    assert vol.shape[2] == 5
    with pytest.raises(ValueError, match="num_slices=99 is impossible"):
        pipe([PROMPT], SampleSettings(num_slices=99))


def test_sampling_is_reproducible_from_the_seed(pipe):
    def run(seed):
        return pipe([PROMPT], SampleSettings(steps=3), [torch.Generator().manual_seed(seed)])[0].array

    assert np.array_equal(run(3), run(3))
    assert not np.array_equal(run(3), run(4))


def test_bad_prompts_get_clear_errors(pipe):
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        pipe(["  "])
    long = "bilateral pleural effusion and " * 40
    with pytest.raises(ValueError, match="text tokens but the text encoder takes 32"):
        pipe([long])
    assert pipe([long], SampleSettings(steps=2, truncate_prompt=True))[0].shape == (16, 16, 8)
    for n in (1, 3):  # too few failed with an IndexError traceback after the first volume; too many were ignored
        with pytest.raises(ValueError, match=f"{n} generators for 2 prompts"):
            pipe([PROMPT, PROMPT], SampleSettings(steps=2), generators=[torch.Generator() for _ in range(n)])


def test_a_config_or_tokenizer_changed_since_the_spec_is_refused(tiny_cascade, tmp_path):
    """A sampler or step count edited in a network's config.json, or another text tokenizer, changed the volumes
    with nothing recorded; the spec hashes them and refuses them changed."""
    for rel in ("superres/config.json", "text_tokenizer.json"):
        models = tmp_path / rel.replace("/", "_")
        shutil.copytree(tiny_cascade, models)
        path = models / rel
        path.write_text(path.read_text().replace("}", " }", 1))
        with pytest.raises(ValueError, match=f"{rel} changed since cascade.json was written"):
            TextToCTPipeline.from_pretrained(models)


def test_missing_or_mismatched_checkpoints_are_named(tiny_cascade, tmp_path):
    broken = tmp_path / "models"
    shutil.copytree(tiny_cascade, broken)
    (broken / "superres" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="superres/model.safetensors"):
        TextToCTPipeline.from_pretrained(broken)
    shutil.rmtree(broken)
    shutil.copytree(tiny_cascade, broken)
    shutil.copyfile(broken / "tokenizer" / "model.safetensors", broken / "generator" / "model.safetensors")
    with pytest.raises(ValueError, match="generator/model.safetensors does not match cascade.json"):
        TextToCTPipeline.from_pretrained(broken)
    with pytest.raises(FileNotFoundError, match="not a trained cascade"):
        TextToCTPipeline.from_pretrained(tmp_path)


def test_the_ema_weights_that_sampling_loads_are_hashed_and_checked(tmp_path):
    from ctgen.pipelines.spec import read_spec, spec_weights

    for net in ("generator", "superres"):
        (tmp_path / net).mkdir()
        (tmp_path / net / "model.safetensors").write_bytes(net.encode())
    (tmp_path / "generator" / "ema").mkdir()
    (tmp_path / "generator" / "ema" / "model.safetensors").write_bytes(b"ema")
    weights = spec_weights(tmp_path, ["generator", "superres"], [])
    assert set(weights) == {"generator", "generator/ema", "superres"}
    (tmp_path / "spec.json").write_text(json.dumps({"weights": weights}))
    assert read_spec(tmp_path, "spec.json", "is not a run")["weights"] == weights
    (tmp_path / "generator" / "ema" / "model.safetensors").write_bytes(b"another run's")
    with pytest.raises(ValueError, match="generator/ema/model.safetensors does not match spec.json"):
        read_spec(tmp_path, "spec.json", "is not a run")


def test_cli_writes_nifti_sidecar_and_dicom_with_one_geometry(tiny_cascade, tmp_path):
    out = tmp_path / "ct.nii.gz"
    assert ctgen_main(["sample", "--models", str(tiny_cascade), "--prompt", PROMPT, "--out", str(out),
                       "--seed", "7", "--steps", "2", "--dicom", str(tmp_path / "dicom")]) == 0
    img = nib.load(out)
    assert b"SYNTHETIC" in img.header["descrip"].tobytes().upper()
    side = json.loads((tmp_path / "ct.json").read_text())
    assert side["prompt"] == PROMPT and side["seed"] == 7 and side["synthetic"] is True
    assert side["config_hash"] and {"tokenizer", "generator", "superres"} <= set(side["weights_sha256"])
    # the same seed gives other noise on another device: the sidecar says where it ran
    assert side["provenance"]["device"] == "cpu" and side["provenance"]["precision"] == "fp32"
    # which weights were used, what a None step count took from the model, and the files beside the weights
    for net in ("tokenizer", "generator", "superres"):
        used = "tokenizer" if net == "tokenizer" else net + ("/ema" if (tiny_cascade / net / "ema").is_dir() else "")
        assert side["weights_used"][net] == used  # the tokenizer decodes with its raw weights
    superres = json.loads((tiny_cascade / "superres" / "config.json").read_text())["config"]["core"]
    assert side["settings"]["sr_steps"] == superres["sample_steps"] and side["settings"]["sr_sampler"] == superres["sampler"]
    assert {"generator/config.json", "superres/config.json", "text_tokenizer.json"} <= set(side["files_sha256"])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "dicom")))
    dcm = sitk.DICOMOrient(reader.Execute(), "LPS")  # the same physical voxel grid, compared in one orientation
    nii = sitk.DICOMOrient(sitk.ReadImage(str(out)), "LPS")
    assert np.array_equal(sitk.GetArrayFromImage(dcm), sitk.GetArrayFromImage(nii))
    assert np.allclose(dcm.GetSpacing(), nii.GetSpacing()) and np.allclose(dcm.GetOrigin(), nii.GetOrigin(), atol=1e-3)
    assert np.allclose(dcm.GetDirection(), nii.GetDirection(), atol=1e-6)


def test_cli_samples_a_file_of_reports(tiny_cascade, tmp_path):
    reports = tmp_path / "reports.jsonl"
    reports.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "age": 70, "sex": "female", "impression": "Cardiomegaly.", "findings": "The heart is enlarged."},
        {"id": "b", "prompt": "45 years old male: No acute findings."}]) + "\n")
    assert ctgen_main(["sample", "--models", str(tiny_cascade), "--prompts", str(reports), "--out-dir",
                       str(tmp_path / "out"), "--steps", "2", "--per-prompt", "2", "--seed", "10"]) == 0
    manifest = pd.read_csv(tmp_path / "out" / "samples.csv")
    assert list(manifest["seed"]) == [10, 11, 12, 13] and list(manifest["prompt_id"]) == ["a", "a", "b", "b"]
    assert manifest["prompt"].iloc[0] == "70 years old female: Cardiomegaly."  # the cascade's template
    assert all((tmp_path / "out" / f"{p}_s{s}.nii.gz").is_file() for p, s in zip(manifest.prompt_id, manifest.seed))


def test_a_structured_cascade_renders_reports_as_its_training_prompts(tiny_cascade, tmp_path):
    """A cascade trained on the structured prompt parses a report file and a VLM3D prompts.json with the
    rendering its spec records (here negations stated), so it sees prompts in its training form."""
    import shutil

    from ctgen.jobs.sample import read_prompts, report_template, vlm3d_prompts

    models = tmp_path / "structured"
    shutil.copytree(tiny_cascade, models)
    spec = json.loads((models / "cascade.json").read_text())
    assert spec["prompt_rendering"] == {"max_chars": 0, "negated": "omit"}  # the config's defaults
    spec.update(prompt_template="structured", prompt_template_text=None,
                prompt_rendering={"max_chars": 0, "negated": "state"})
    (models / "cascade.json").write_text(json.dumps(spec))
    reports = tmp_path / "reports.csv"
    reports.write_text('id,findings,impression\na,"Small left pleural effusion.","No pericardial effusion."\n'
                       'b,,"Mild cardiomegaly."\n')
    want = [("a", "mild left pleural effusion; no pericardial effusion"), ("b", "mild cardiomegaly")]
    assert report_template(spec) == ("structured", {"max_chars": 0, "negated": "state"})
    assert report_template(spec, "generatect") == (None, {"max_chars": 0, "negated": "state"})  # text unknown
    assert read_prompts(reports, *report_template(spec)) == want
    entries = tmp_path / "prompts.json"
    entries.write_text(json.dumps([{"input_image_name": "valid_1_a_1", "report": "Small left pleural effusion. "
                                    "No pericardial effusion."}]))
    assert vlm3d_prompts(entries, *report_template(spec)) == [("valid_1_a_1", want[0][1])]
    assert ctgen_main(["sample", "--models", str(models), "--prompts", str(reports), "--out-dir",
                       str(tmp_path / "out"), "--steps", "2", "--seed", "1", "--no-superres"]) == 0
    assert list(pd.read_csv(tmp_path / "out" / "samples.csv")["prompt"]) == [p for _, p in want]
    # a prompt given as text is rendered too (a structured one reads back unchanged), so free text reaches the
    # model in its training form
    lines = tmp_path / "prompts.txt"
    lines.write_text("Small left pleural effusion. No pericardial effusion.\nmild cardiomegaly; right lower lobe nodule 5 mm\n")
    assert read_prompts(lines, *report_template(spec)) == [
        ("prompt0000", want[0][1]), ("prompt0001", "mild cardiomegaly; right lower lobe nodule 5 mm")]
    out = tmp_path / "one.nii.gz"
    assert ctgen_main(["sample", "--models", str(models), "--prompt", "The heart is enlarged (mild cardiomegaly).",
                       "--out", str(out), "--steps", "2", "--no-superres"]) == 0
    assert json.loads(out.with_name("one.json").read_text())["prompt"] == "mild cardiomegaly"


def test_every_sampling_mode_stores_the_orientation_asked_for(tiny_cascade, tmp_path):
    reports = tmp_path / "reports.jsonl"
    reports.write_text(json.dumps({"id": "a", "prompt": PROMPT}) + "\n")
    one = tmp_path / "one.nii.gz"
    for args in (["--prompt", PROMPT, "--out", str(one)], ["--prompts", str(reports), "--out-dir", str(tmp_path / "many")]):
        assert ctgen_main(["sample", "--models", str(tiny_cascade), *args, "--steps", "2", "--orientation", "PLI"]) == 0
    for path in (one, tmp_path / "many" / "a_s0.nii.gz"):
        assert "".join(nib.aff2axcodes(nib.load(path).affine)) == "PLI"


def test_the_sidecar_of_a_cascade_without_super_resolution_gives_the_low_res_spacing(tiny_cascade, tmp_path):
    folder = tmp_path / "models"
    shutil.copytree(tiny_cascade, folder)
    spec = json.loads((folder / "cascade.json").read_text())
    spec["weights"] = {k: v for k, v in spec["weights"].items() if not k.startswith("superres")}
    spec["files"] = {k: v for k, v in spec["files"].items() if not k.startswith("superres")}
    (folder / "cascade.json").write_text(json.dumps(spec))
    shutil.rmtree(folder / "superres")
    pipe = TextToCTPipeline.from_pretrained(folder)
    settings = SampleSettings(steps=2)
    vol = pipe([PROMPT], settings=settings, generators=[torch.Generator().manual_seed(0)])[0]
    side = pipe.sidecar(PROMPT, 0, settings)
    assert side["spacing"]["mm"] == pytest.approx(list(vol.spacing)) and side["settings"]["super_resolution"] is False



def test_cascade_only_settings_are_refused_for_the_latent_flow_family(tmp_path, capsys):
    code = ctgen_main(["sample", "--family", "latent_flow", "--models", str(tmp_path), "--prompt", PROMPT,
                       "--out", str(tmp_path / "x.nii.gz"), "--temperature", "0.5", "--no-superres"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--temperature, --no-superres: the cascade's settings, not the latent flow family's" in err[0]


def test_the_tokenizer_decodes_with_the_weights_that_encoded_the_training_tokens(tiny_cascade, tmp_path):
    """encode_tokens encodes with the tokenizer's raw weights: sampling decodes with them too, not its EMA's, while
    the generator is its EMA where there is one."""
    from ctgen.models.ctvit import CTViT

    folder = tmp_path / "models"
    shutil.copytree(tiny_cascade, folder)
    raw = CTViT.from_pretrained(folder / "tokenizer")
    other = CTViT(raw.config)
    for p in other.parameters():
        torch.nn.init.normal_(p)
    other.save_pretrained(folder / "tokenizer" / "ema")
    pipe = TextToCTPipeline.from_pretrained(folder)
    for name, w in raw.state_dict().items():
        assert torch.equal(pipe.tokenizer.state_dict()[name], w), name


def test_the_cascade_refuses_a_generator_trained_on_another_tokenizers_tokens(tiny_cascade, cohort, tmp_path):
    """A tokenizer retrained after the generator leaves a cascade that decodes another codebook: its spec says so."""
    import shutil

    from ctgen.data.derived import weights_id
    from ctgen.jobs.sample import write_cascade_spec

    models = tmp_path / "models"
    shutil.copytree(tiny_cascade, models)
    made_by = json.loads((models / "generator" / "config.json").read_text())["provenance"]["tokens_from"]
    assert made_by == weights_id(models / "tokenizer")  # recorded at training
    preset = {"mode": "spacing", "spacing": [2.0, 2.0, 5.0], "shape": [16, 16, 8], "clip": [-1000, 1000]}
    models_cfg = {"lowres_scale": 2, "prompt": "generatect",
                  "text_encoder": {"kind": "small", "path": None, "max_length": 32}}
    text = shutil.copyfile(models / "text_tokenizer.json", tmp_path / "text.json")
    write_cascade_spec(models, preset, models_cfg, [cohort["manifest"]], text_tokenizer=text)
    config = json.loads((models / "generator" / "config.json").read_text())
    config["provenance"]["tokens_from"] = "tokenizer@0123456789abcdef"  # tokens of an earlier tokenizer
    (models / "generator" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="generator was trained on tokens of tokenizer@0123456789abcdef"):
        write_cascade_spec(models, preset, models_cfg, [cohort["manifest"]], text_tokenizer=text)


def test_sampling_settings_out_of_range_are_refused():
    """The workflow's schema refuses a negative guidance; the CLI and the API sampled with it."""
    from ctgen.pipelines.latent_flow import LatentSampleSettings
    from ctgen.pipelines.text_to_ct import SampleSettings

    for bad in ({"guidance_scale": -3.0}, {"temperature": float("nan")}, {"steps": 0}, {"sr_batch_size": 0}):
        with pytest.raises(ValueError, match="out of range: " + next(iter(bad))):
            SampleSettings(**bad)
    for bad in ({"guidance_scale": -5.0}, {"steps": 0}, {"latent_shape": (4, 0, 4)}, {"precision": "fp16"}):
        with pytest.raises(ValueError, match="out of range: " + next(iter(bad))):
            LatentSampleSettings(**bad)
    assert SampleSettings(guidance_scale=0.0).guidance_scale == 0.0  # unconditional: allowed


def test_prompt_rows_are_named_by_the_line_they_start_on(tmp_path):
    """A quoted report over several lines moved the line every later row's message named; rows without an id are
    numbered from 0 in every format."""
    from ctgen.jobs.inputs import read_rows, row_id

    csv_path = tmp_path / "r.csv"
    csv_path.write_text('findings,impression\n"Line one.\nLine two.\nLine three.",Normal.\nA.,B.\n')
    assert [n for n, _ in read_rows(csv_path)] == [2, 5]
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text('\n{"findings": "A."}\n{"findings": "B."}\n')
    rows = read_rows(jsonl)
    assert [n for n, _ in rows] == [2, 3]
    assert [row_id(r, i) for i, (_, r) in enumerate(rows)] == ["0", "1"]
    assert [row_id(r, i) for i, (_, r) in enumerate(read_rows(csv_path))] == ["0", "1"]


def test_a_csv_row_of_other_cells_than_its_header_or_an_open_quote_is_named(tmp_path):
    """An unquoted comma cut the prompt at it (DictReader kept the rest under no column), a row short of cells or a
    quote left open (every later row taken into one prompt) passed without a word: each is named with its line."""
    import re

    from ctgen.jobs.inputs import read_rows
    from ctprep.errors import UserError

    path = tmp_path / "p.csv"
    for body, needle in (("a,Cardiomegaly.\nb,Effusion, left.\n", "p.csv:3: 3 cells, the header has 2 (quote a "
                                                                      "prompt that holds commas)"),
                         ("a,Cardiomegaly.\nb\n", "p.csv:3: 1 cells, the header has 2"),
                         ('a,Cardiomegaly.\nb,"Effusion, left.\nc,Normal.\n', "p.csv:3: not CSV"),
                         ('a,"Cardio" megaly.\n', "p.csv:2: not CSV")):
        path.write_text("id,prompt\n" + body)
        with pytest.raises(UserError, match=re.escape(needle)):
            read_rows(path)
    path.write_text('id,prompt\na,"Effusion, left."\nb,""\n')  # quoted commas, an empty cell: read as they are
    assert [row for _, row in read_rows(path)] == [{"id": "a", "prompt": "Effusion, left."}, {"id": "b", "prompt": ""}]


def test_non_finite_network_output_is_not_written_as_water(pipe, tmp_path, monkeypatch, caplog):
    """A diverged network's NaN was cast to 0 HU (water) with nothing said, the export's NaN guard seeing only int16:
    NaN becomes the window's lower bound and inf its bounds, warned about and counted in the sidecar."""
    from ctgen.data.layout import unit_to_hu, unit_to_int16_hu
    from ctgen.export.samples import write_samples

    finite = torch.linspace(-1.5, 1.5, 1001)
    assert torch.equal(unit_to_int16_hu(finite, (-1000, 1000))[0], unit_to_hu(finite, (-1000, 1000)).round().to(torch.int16))
    sample = pipe.superres.core.sample

    def diverged(*args, **kwargs):
        x = sample(*args, **kwargs)  # (D, 1, H, W): H is the array's j axis
        x[..., :4, :] = float("nan")
        x[..., 4:6, :] = float("inf")
        x[..., 6:7, :] = float("-inf")
        return x

    monkeypatch.setattr(pipe.superres.core, "sample", diverged)
    with caplog.at_level("WARNING", logger="ctgen.pipelines.text_to_ct"):
        vol = pipe([PROMPT], SampleSettings(steps=2))[0]
    a = vol.data  # (I, J, K)
    assert (a[:, :4] == -1000).all() and (a[:, 4:6] == 1000).all() and (a[:, 6] == -1000).all()
    n = 16 * 7 * 8
    assert vol.meta["n_nonfinite"] == n and f"gave {n} non-finite voxels" in caplog.text
    manifest = write_samples([("p", PROMPT)], lambda r, s: (vol, {"seed": s}, r), tmp_path / "out")
    assert json.loads(open(manifest["sidecar"][0]).read())["n_nonfinite"] == n
    monkeypatch.undo()
    assert pipe([PROMPT], SampleSettings(steps=2))[0].meta["n_nonfinite"] == 0


def test_a_rerun_with_dicom_replaces_its_series_and_a_foreign_folder_is_refused_before_sampling(tiny_cascade, tmp_path,
                                                                                                 capsys):
    """``--prompt ... --dicom DIR`` run twice replaced the NIfTI, then refused the DICOM, leaving a mismatched pair:
    ctgen's own series is replaced with the NIfTI, any other folder refused before a volume is sampled."""
    import pydicom

    out, dcm = tmp_path / "ct.nii.gz", tmp_path / "dcm"
    for seed in ("1", "2"):
        assert ctgen_main(["sample", "--models", str(tiny_cascade), "--prompt", PROMPT, "--out", str(out), "--seed",
                           seed, "--steps", "2", "--no-superres", "--dicom", str(dcm)]) == 0
    series = [pydicom.dcmread(f) for f in sorted(dcm.glob("*.dcm"))]
    assert json.loads(series[0][0x0011, 0x1010].value)["seed"] == 2 == json.loads(out.with_name("ct.json").read_text())["seed"]
    stack = np.stack([ds.pixel_array for ds in series])  # (k, j, i) on the display axes: L, P, S
    assert np.array_equal(stack.transpose(2, 1, 0)[::-1, ::-1], np.asarray(nib.load(out).dataobj))  # the RAS NIfTI
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    del series[0][0x0011, 0x1010], series[0][0x0011, 0x0010]  # a series another program wrote
    series[0].save_as(foreign / "IM1.dcm")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    capsys.readouterr()
    for folder, why in ((foreign, "DICOM files ctgen did not write"), (notes, "files other than a DICOM series")):
        out.unlink(missing_ok=True)
        assert ctgen_main(["sample", "--models", str(tiny_cascade), "--prompt", PROMPT, "--out", str(out),
                           "--steps", "2", "--dicom", str(folder)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--dicom: {folder} holds {why}" in err[0], err
        assert not out.exists()  # refused before sampling
    assert (foreign / "IM1.dcm").is_file() and (notes / "notes.txt").is_file()


def test_ids_that_name_a_path_outside_the_out_dir_are_refused_with_their_line(tiny_cascade, tmp_path, capsys):
    """An id "site1/p3" or "../../escaped" wrote its volume outside --out-dir (in either family): refused, naming the
    id and the line, before anything is sampled; an id with a space still names its files."""
    from ctgen.export.samples import write_samples
    from ctgen.jobs.sample_latent import read_sections

    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    for n, bad in ((1, "site1/p3"), (2, "../../escaped")):
        rows = [{"id": "ok", "prompt": PROMPT}] * (n - 1) + [{"id": bad, "prompt": PROMPT}]
        path = work / "ids.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert ctgen_main(["sample", "--models", str(tiny_cascade), "--prompts", str(path), "--out-dir",
                           str(work / "out"), "--steps", "2"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"ids.jsonl:{n}: id {bad!r} cannot name a file in the output folder" in err[0], err
        with pytest.raises(ValueError, match=f"ids.jsonl:{n}: id "):
            read_sections(path)  # the latent flow family's reader
    assert not list(tmp_path.rglob("*.nii.gz"))
    with pytest.raises(ValueError, match="id '../x' cannot name a file"):  # the API alike
        write_samples([("../x", "p")], lambda r, s: None, tmp_path / "api")
    spaced = work / "spaced.csv"
    spaced.write_text(f"id,prompt\ncase 7,{PROMPT}\n")
    assert ctgen_main(["sample", "--models", str(tiny_cascade), "--prompts", str(spaced), "--out-dir",
                       str(work / "out"), "--steps", "2", "--no-superres"]) == 0
    assert (work / "out" / "case 7_s0.nii.gz").is_file()


def test_a_structured_cascade_warns_of_text_its_parser_finds_nothing_in_and_keeps_the_given_text(tiny_cascade,
                                                                                                  tmp_path, caplog):
    """A finding outside the parser's vocabulary, or a report not in English, was sampled as "no acute findings" (a
    normal chest) without a word, and the given text was lost: a WARNING names the prompt, the sidecar and
    samples.csv keep the text as prompt_given. A report stating findings absent was understood: no warning."""
    from ctgen.jobs.sample import read_prompts, report_template

    models = tmp_path / "structured"
    shutil.copytree(tiny_cascade, models)
    spec = json.loads((models / "cascade.json").read_text())
    spec.update(prompt_template="structured", prompt_template_text=None)
    (models / "cascade.json").write_text(json.dumps(spec))
    pe = "72 years old female: Massive pulmonary embolism in the right main pulmonary artery."
    reports = tmp_path / "reports.csv"
    reports.write_text('id,findings,impression\nde,"Pleuraerguss rechts, Kardiomegalie.",\nneg,No pleural effusion.,\n'
                       'ok,Small left pleural effusion.,\nnormal,,No acute findings.\n')
    with caplog.at_level("WARNING", logger="ctgen.jobs.inputs"):
        got = read_prompts(reports, *report_template(spec), given=True)
    assert [p for _, p, _ in got] == ["no acute findings", "no acute findings", "mild left pleural effusion",
                                      "no acute findings"]
    assert got[0][2] == "Findings: Pleuraerguss rechts, Kardiomegalie."
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and warned[0].startswith("prompt de: the report parser found none of the findings")
    caplog.clear()
    out = tmp_path / "pe.nii.gz"
    with caplog.at_level("WARNING", logger="ctgen.jobs.inputs"):
        assert ctgen_main(["sample", "--models", str(models), "--prompt", pe, "--out", str(out), "--steps", "2",
                           "--no-superres"]) == 0
    assert "prompt prompt: the report parser found none" in caplog.text and "Massive pulmonary embolism" in caplog.text
    side = json.loads(out.with_name("pe.json").read_text())
    assert side["prompt"] == "no acute findings" and side["prompt_given"] == pe
    assert ctgen_main(["sample", "--models", str(models), "--prompts", str(reports), "--out-dir", str(tmp_path / "o"),
                       "--steps", "2", "--no-superres"]) == 0
    manifest = pd.read_csv(tmp_path / "o" / "samples.csv")
    assert list(manifest["prompt_given"])[:3] == ["Findings: Pleuraerguss rechts, Kardiomegalie.",
                                                  "Findings: No pleural effusion.", "Findings: Small left pleural effusion."]
    plain = tmp_path / "plain"  # a template that uses the text as written records nothing beside it
    assert ctgen_main(["sample", "--models", str(tiny_cascade), "--prompt", PROMPT, "--out", str(plain / "x.nii.gz"),
                       "--steps", "2", "--no-superres"]) == 0
    assert "prompt_given" not in json.loads((plain / "x.json").read_text())


def test_prompt_files_as_users_write_them(tiny_cascade, tmp_path, capsys):
    """Excel's "CSV UTF-8" (a byte-order mark hid the first column's name), an empty prompt cell (reported as the
    template's missing 'age'), a misspelt column (the accepted ones unnamed), a list for a prompt (sampled as its
    repr), a latin-1 text file (the latent family's error named no file): in both families' readers."""
    from ctgen.jobs.sample import read_prompts, report_template
    from ctgen.jobs.sample_latent import read_sections

    spec = json.loads((tiny_cascade / "cascade.json").read_text())
    template = report_template(spec)
    excel = tmp_path / "excel.csv"
    excel.write_bytes(b"\xef\xbb\xbfprompt,id\n60 years old male: effusion.,case7\n")
    assert read_prompts(excel, *template) == [("case7", "60 years old male: effusion.")]
    assert read_sections(excel) == [("case7", {"report": "60 years old male: effusion."})]
    empty = tmp_path / "empty.csv"
    empty.write_text(f"id,prompt\na,{PROMPT}\nb,\n")
    assert ctgen_main(["sample", "--models", str(tiny_cascade), "--prompts", str(empty), "--out-dir",
                       str(tmp_path / "out"), "--steps", "2"]) == 2
    assert capsys.readouterr().err.strip() == f"ctgen: error: {empty}: empty prompt for b"
    with pytest.raises(ValueError, match=r"empty.csv:3: empty prompt for b"):
        read_sections(empty)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text(f"id,promt\na,{PROMPT}\n")
    with pytest.raises(ValueError, match=r"wrong.csv:2: no `prompt` or `text` column.*the columns read are prompt, text "
                                         r"or the template's age, impression, sex \(this row has id, promt\)"):
        read_prompts(wrong, *template)
    with pytest.raises(ValueError, match=r"wrong.csv:2: no report text: the columns read are findings, impression, "
                                         r"structured, prompt, text \(this row has id, promt\)"):
        read_sections(wrong)
    listed = tmp_path / "list.jsonl"
    listed.write_text('{"id": "lst", "prompt": ["60 years old", "male"]}\n')
    for read in (lambda p: read_prompts(p, *template), read_sections):
        with pytest.raises(ValueError, match="list.jsonl:1: `prompt` must be a text, not a list"):
            read(listed)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Kardiomegalie, Pleuraerguss (geringgradig) \u2013 caf\u00e9\n".encode("latin-1", "replace"))
    with pytest.raises(ValueError, match="latin.txt is not UTF-8 text"):
        read_sections(latin)


def test_ids_are_the_same_in_both_families_and_unique(tiny_cascade, tmp_path, capsys):
    """An id 0 fell back to the row's index (`or`), so two reports shared an id; a text file's blank line numbered
    the latent family's prompts apart from the cascade's, and `ctgen compare` pairs the families by id; a repeated
    id wrote one output for two reports."""
    from ctgen.jobs.sample import read_prompts, report_template
    from ctgen.jobs.sample_latent import read_sections

    template = report_template(json.loads((tiny_cascade / "cascade.json").read_text()))
    zero = tmp_path / "zero.jsonl"
    zero.write_text('{"id": 1, "prompt": "Cardiomegaly."}\n{"id": 0, "prompt": "Effusion."}\n'
                    '{"id": " ", "VolumeName": "v.nii.gz", "prompt": "Nodule."}\n')
    assert [pid for pid, _ in read_prompts(zero, *template)] == ["1", "0", "v.nii.gz"]
    assert [pid for pid, _ in read_sections(zero)] == ["1", "0", "v.nii.gz"]
    lines = tmp_path / "lines.txt"
    lines.write_text(f"{PROMPT}\n\n  \n{PROMPT} Cardiomegaly.\n")
    want = ["prompt0000", "prompt0003"]
    assert [pid for pid, _ in read_prompts(lines, *template)] == want
    assert [pid for pid, _ in read_sections(lines)] == want
    twice = tmp_path / "twice.csv"
    twice.write_text(f"id,prompt\na,{PROMPT}\nb,{PROMPT}\na,Cardiomegaly.\n")
    for read in (lambda p: read_prompts(p, *template), read_sections):
        with pytest.raises(ValueError, match=r"twice.csv: the id 'a' is given to more than one row"):
            read(twice)
    for seed in ("-1", str(2**63), "x"):
        with pytest.raises(SystemExit) as exit_:
            ctgen_main(["sample", "--models", str(tiny_cascade), "--prompt", PROMPT, "--out",
                        str(tmp_path / "x.nii.gz"), "--seed", seed])
        assert exit_.value.code == 2 and "not a seed" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()


def test_options_of_another_mode_are_refused_not_ignored(tmp_path, capsys):
    """--per-prompt 3 and --out-dir given with --prompt were accepted and ignored (one volume, in --out)."""
    one = ["sample", "--models", str(tmp_path), "--prompt", PROMPT, "--out", str(tmp_path / "x.nii.gz")]
    for extra, why in ((["--per-prompt", "3"], "--per-prompt needs --prompts"),
                       (["--out-dir", str(tmp_path / "many")], "not --out-dir"),
                       (None, "--out is for --prompt")):
        argv = one + extra if extra else ["sample", "--models", str(tmp_path), "--prompts", str(tmp_path / "p.txt"),
                                          "--out-dir", str(tmp_path / "d"), "--out", str(tmp_path / "x.nii.gz")]
        with pytest.raises(SystemExit) as exit_:
            ctgen_main(argv)
        assert exit_.value.code == 2 and why in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_sampling_defaults_come_from_their_own_file_or_an_older_spec(tmp_path, caplog):
    """`ctgen sample`'s defaults: cascade_sampling.json (the workflow's cascade_sampling rule), else the `sampling`
    section that cascade.json held before that file existed (a models folder trained by an earlier version)."""
    older = {"grid": {}, "sampling": {"steps": 4, "guidance_scale": 2.0}}
    assert sampling_defaults(tmp_path, older) == {"steps": 4, "guidance_scale": 2.0}
    with caplog.at_level("WARNING"):
        assert sampling_defaults(tmp_path, {"grid": {}}) == {}
    assert "has no cascade_sampling.json" in caplog.text  # ctgen's own defaults, said
    write_sampling_defaults(tmp_path, {"steps": 6, "guidance_scale": 3.0, "seed": 7})
    assert sampling_defaults(tmp_path, older) == {"steps": 6, "guidance_scale": 3.0, "seed": 7}


def test_a_lone_surrogate_in_a_prompt_is_replaced_as_in_the_latent_family(tiny_cascade, tmp_path):
    """A non-UTF-8 byte on the command line (decoded as a lone surrogate) or "\\ud800" in a JSON row crashed the
    cascade with the tokenizers' TypeError; it becomes U+FFFD, as ctprep.reports.normalise makes it for the latent
    family's reports."""
    out = tmp_path / "one.nii.gz"
    assert ctgen_main(["sample", "--models", str(tiny_cascade), "--prompt", "caf\udce9 effusion", "--out", str(out),
                       "--steps", "2", "--no-superres"]) == 0
    assert json.loads((tmp_path / "one.json").read_text(encoding="utf-8"))["prompt"] == "caf\ufffd effusion"
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": "a", "prompt": "caf\\ud800 effusion"}\n')
    assert ctgen_main(["sample", "--models", str(tiny_cascade), "--prompts", str(rows), "--out-dir",
                       str(tmp_path / "many"), "--steps", "2", "--no-superres"]) == 0
    side = json.loads((tmp_path / "many" / "a_s0.json").read_text(encoding="utf-8"))
    assert side["prompt"] == "caf\ufffd effusion"
    assert pd.read_csv(tmp_path / "many" / "samples.csv")["prompt"].tolist() == ["caf\ufffd effusion"]


def test_one_slice_is_refused_before_sampling(tiny_cascade, tmp_path, capsys):
    """--num-slices 1 wrote a NIfTI that ctprep's own reader refuses (>= 2 voxels per axis), and with --dicom failed
    after sampling."""
    with pytest.raises(ValueError, match="out of range: num_slices 1"):
        SampleSettings(num_slices=1)
    assert SampleSettings(num_slices=2).num_slices == 2
    out = tmp_path / "one.nii.gz"
    assert ctgen_main(["sample", "--models", str(tiny_cascade), "--prompt", PROMPT, "--out", str(out),
                       "--num-slices", "1", "--steps", "2", "--dicom", str(tmp_path / "dcm")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_slices 1" in err[0], err
    assert not out.exists() and not (tmp_path / "dcm").exists()


def test_a_dicom_folder_holding_the_nifti_is_refused_before_sampling(tiny_cascade, tmp_path, capsys):
    """--dicom equal to (or above) the folder of --out passed the check (still empty), then failed after sampling:
    the NIfTI was in the series' folder."""
    out = tmp_path / "run" / "ct.nii.gz"
    for dicom in (tmp_path / "run", tmp_path):
        assert ctgen_main(["sample", "--models", str(tiny_cascade), "--prompt", PROMPT, "--out", str(out),
                           "--steps", "2", "--no-superres", "--dicom", str(dicom)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--dicom {dicom} holds the --out file" in err[0], err
        assert not out.exists()


def test_the_dicom_of_one_prompt_has_the_geometry_of_a_prompts_files(tiny_cascade, tmp_path):
    """--prompt --dicom built the series from the NIfTI re-read, whose float32 affine wrote PixelSpacing 1.39999997615814
    where --prompts wrote 1.4: both write it from the volume in memory."""
    import pydicom

    models = tmp_path / "models"
    shutil.copytree(tiny_cascade, models)
    spec = json.loads((models / "cascade.json").read_text())
    spec["grid"]["spacing"] = [0.7, 0.7, 1.3]  # not float32 numbers
    (models / "cascade.json").write_text(json.dumps(spec))
    common = ["--models", str(models), "--seed", "3", "--steps", "2", "--no-superres"]
    assert ctgen_main(["sample", *common, "--prompt", PROMPT, "--out", str(tmp_path / "one" / "ct.nii.gz"),
                       "--dicom", str(tmp_path / "one_dcm")]) == 0
    (tmp_path / "p.csv").write_text(f"id,prompt\nct,{PROMPT}\n")
    assert ctgen_main(["sample", *common, "--prompts", str(tmp_path / "p.csv"), "--out-dir", str(tmp_path / "many"),
                       "--dicom", str(tmp_path / "many_dcm")]) == 0

    def geometry(folder):
        series = [pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm"))]
        return [(list(ds.PixelSpacing), list(ds.ImagePositionPatient), ds.SliceThickness) for ds in series]

    one = geometry(tmp_path / "one_dcm")
    assert one == geometry(tmp_path / "many_dcm" / "ct_s3") and len(one) == 8
    assert [str(v) for v in one[0][0]] == ["1.4", "1.4"]


def test_a_prompt_too_long_is_named_by_its_id(tiny_cascade, tmp_path, capsys):
    """In --prompts mode the error named a 0-based index ("prompt 1 has 122 text tokens"), every other error of a
    prompts file its id or line."""
    rows = tmp_path / "p.csv"
    rows.write_text(f"id,prompt\nshort,{PROMPT}\ncase7,{'bilateral pleural effusion and ' * 40}\n")
    assert ctgen_main(["sample", "--models", str(tiny_cascade), "--prompts", str(rows), "--out-dir",
                       str(tmp_path / "out"), "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prompt 'case7' has" in err[0] and "text tokens" in err[0], err
    assert ctgen_main(["sample", "--models", str(tiny_cascade), "--prompt", "effusion and " * 40, "--out",
                       str(tmp_path / "x.nii.gz"), "--steps", "2"]) == 2
    assert "the prompt has" in capsys.readouterr().err


def test_seeds_past_what_seed_takes_are_refused_before_sampling(tiny_cascade, tmp_path, capsys):
    """Two prompts and --seed 2**63 - 1 recorded the seed 2**63 in the second sidecar, which --seed refuses: a sample
    that could not be rerun from its sidecar."""
    rows = tmp_path / "p.csv"
    rows.write_text(f"id,prompt\na,{PROMPT}\nb,{PROMPT}\n")
    argv = ["sample", "--models", str(tiny_cascade), "--prompts", str(rows), "--out-dir", str(tmp_path / "out"),
            "--steps", "2", "--no-superres", "--seed"]
    assert ctgen_main([*argv, str(2**63 - 1)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"gives seeds up to {2**63}" in err[0] and f"at most {2**63 - 2}" in err[0], err
    assert not list(tmp_path.glob("out/*.nii.gz"))  # refused before sampling
    assert ctgen_main([*argv, str(2**63 - 2)]) == 0
    assert json.loads((tmp_path / "out" / f"b_s{2**63 - 1}.json").read_text())["seed"] == 2**63 - 1


def test_a_hand_edited_spec_or_defaults_file_is_named_not_a_traceback(tiny_cascade, tmp_path, capsys):
    """cascade.json without "grid" was a KeyError, cascade_sampling.json with "steps": "many" a TypeError: one line
    naming the file and the key."""
    models = tmp_path / "models"
    shutil.copytree(tiny_cascade, models)
    argv = ["sample", "--models", str(models), "--prompt", PROMPT, "--out", str(tmp_path / "x.nii.gz"), "--steps", "2"]
    good = (models / "cascade_sampling.json").read_text()
    for bad, key in (({"steps": "many"}, "`steps` must be int, not str 'many'"),
                     ({"guidance_scale": True}, "`guidance_scale` must be int or float, not bool")):
        (models / "cascade_sampling.json").write_text(json.dumps(bad))
        assert ctgen_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"cascade_sampling.json: {key}" in err[0], err
    (models / "cascade_sampling.json").write_text(good)
    spec = json.loads((models / "cascade.json").read_text())
    for edit, key in ((lambda s: s.pop("grid"), "`grid` is missing"),
                      (lambda s: s["grid"].update(spacing="2mm"), "`grid.spacing` must be list, not str"),
                      (lambda s: s["text_encoder"].pop("max_length"), "`text_encoder.max_length` is missing")):
        broken = json.loads(json.dumps(spec))
        edit(broken)
        (models / "cascade.json").write_text(json.dumps(broken))
        assert ctgen_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"cascade.json: {key}" in err[0], err
    assert not (tmp_path / "x.nii.gz").exists()


def test_the_sidecar_records_the_window_the_volume_was_clipped_to(tiny_cascade, tmp_path):
    """The sidecar gave export.hu_range [-1024, 3071] alone, while unit_to_hu had clipped the volume to the preset's
    window: the window is recorded, with the voxels at each of its bounds."""
    out = tmp_path / "ct.nii.gz"
    assert ctgen_main(["sample", "--models", str(tiny_cascade), "--prompt", PROMPT, "--out", str(out),
                       "--steps", "2", "--no-superres"]) == 0
    side = json.loads((tmp_path / "ct.json").read_text())
    data = np.asarray(nib.load(out).dataobj)
    assert side["hu_window"] == {"hu": [-1000, 1000], "n_low": int((data == -1000).sum()),
                                 "n_high": int((data == 1000).sum())}
    assert side["export"]["hu_range"] == [-1024, 3071]  # the export's own clip, unchanged


def test_the_sidecar_names_the_models_folder_from_anywhere(tiny_cascade, tmp_path, monkeypatch):
    """--models given relative was recorded as typed: a rerun from the sidecar in another folder found no models."""
    monkeypatch.chdir(tiny_cascade.parent)
    out = tmp_path / "ct.nii.gz"
    assert ctgen_main(["sample", "--models", tiny_cascade.name, "--prompt", PROMPT, "--out", str(out),
                       "--steps", "2", "--no-superres"]) == 0
    assert json.loads((tmp_path / "ct.json").read_text())["models_dir"] == str(tiny_cascade.resolve())
