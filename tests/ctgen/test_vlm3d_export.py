"""The VLM3D 2026 submission contract: prompts.json validation and ``ctgen sample --vlm3d`` round trip."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from ctgen.cli import main as ctgen_main
from ctgen.metrics.vlm3d.contract import case_stem, pair_volumes, read_prompts_json

REPORT = "Findings: Right pleural effusion. Impression: Right pleural effusion."


def _write(tmp_path, data, name="prompts.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_prompts_json_is_read_in_order_and_names_become_stems(tmp_path):
    path = _write(tmp_path, [{"input_image_name": "valid_3_a_1.nii.gz", "report": REPORT},
                             {"input_image_name": "valid_1_b_2", "report": "Cardiomegaly."}])
    assert read_prompts_json(path) == [("valid_3_a_1", REPORT), ("valid_1_b_2", "Cardiomegaly.")]
    assert case_stem("A.NII.GZ") == "A" and case_stem("x.mha") == "x" and case_stem("y.nii") == "y"
    # a dot that starts no volume extension is part of the name: case.001.nii.gz pairs with case.001
    assert case_stem("case.001") == "case.001" and case_stem("scan_v1.5.nii.gz") == "scan_v1.5"
    dotted = _write(tmp_path, [{"input_image_name": "case.001", "report": REPORT},
                               {"input_image_name": "case.002", "report": REPORT}], name="dotted.json")
    assert [stem for stem, _ in read_prompts_json(dotted)] == ["case.001", "case.002"]
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # saved by Notepad or PowerShell: a byte-order mark
    assert read_prompts_json(path)[1] == ("valid_1_b_2", "Cardiomegaly.")
    path.write_bytes(b'[{"input_image_name": "a", "report": "caf\xe9"}]')  # latin-1
    with pytest.raises(ValueError, match=rf"{path} is not UTF-8 text"):
        read_prompts_json(path)


@pytest.mark.parametrize("data, message", [
    ("{not json", r"not JSON .*line 1.*JSON list"),
    ({"input_image_name": "a", "report": "r"}, "a JSON list .* not a dict"),
    ([], "the prompts list is empty"),
    ([{"input_image_name": "a", "report": "r"}, "b"], "entry 1 is a str"),
    ([{"input_image_name": "a"}], "entry 0 has no report"),
    ([{"name": "a", "text": "r"}], r"entry 0 has no input_image_name or report \(it has \['name', 'text'\]\)"),
    ([{"input_image_name": 3, "report": "r"}], "entry 0: input_image_name and report must be strings"),
    ([{"input_image_name": "../etc/x", "report": "r"}], "entry 0: input_image_name '../etc/x' is not a safe file name"),
    ([{"input_image_name": "a b", "report": "r"}], "is not a safe file name"),
    ([{"input_image_name": "a", "report": "  "}], r"entry 0 \(a\): the report is empty"),
    ([{"input_image_name": "a", "report": "r"}, {"input_image_name": "a.nii.gz", "report": "s"}],
     "entry 1: input_image_name 'a' repeats entry 0"),
])
def test_malformed_prompts_files_are_refused_naming_the_entry(tmp_path, data, message):
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=message) as err:
        read_prompts_json(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_cli_refuses_a_malformed_prompts_file_in_one_line_before_loading_models(tmp_path, capsys):
    path = _write(tmp_path, [{"input_image_name": "a", "report": ""}])
    code = ctgen_main(["sample", "--models", str(tmp_path / "no_models"), "--vlm3d", str(path),
                       "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("ctgen: error:") and "entry 0 (a): the report is empty" in err[0]
    with pytest.raises(SystemExit) as exit_:  # argparse: no --out-dir
        ctgen_main(["sample", "--models", str(tmp_path), "--vlm3d", str(path)])
    assert exit_.value.code == 2 and "--vlm3d needs --out-dir" in capsys.readouterr().err


def test_sample_vlm3d_writes_one_int16_nifti_per_entry_with_truthful_spacing(tiny_cascade, tmp_path):
    entries = [{"input_image_name": "valid_2_a_1", "report": "Right pleural effusion."},
               {"input_image_name": "valid_10_b_1.nii.gz", "report": "Cardiomegaly. Bilateral pleural effusion."}]
    prompts = _write(tmp_path, entries)
    out = tmp_path / "output"
    assert ctgen_main(["sample", "--models", str(tiny_cascade), "--vlm3d", str(prompts), "--out-dir", str(out),
                       "--steps", "2", "--seed", "3"]) == 0
    volumes = sorted(p.name for p in out.glob("*.nii.gz"))
    assert volumes == ["valid_10_b_1.nii.gz", "valid_2_a_1.nii.gz"]  # exactly one per entry, named by stem
    for name in volumes:
        img = nib.load(out / name)
        assert img.get_data_dtype() == np.int16 and np.allclose(img.header.get_zooms(), [2.0, 2.0, 5.0])
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
        itk = sitk.ReadImage(str(out / name))  # what the challenge's evaluation reads
        assert np.allclose(itk.GetSpacing(), [2.0, 2.0, 5.0])
        data = np.asarray(img.dataobj)
        assert data.min() >= -1000 and data.max() <= 1000
        side = json.loads((out / name.replace(".nii.gz", ".json")).read_text())
        assert side["prompt_id"] == name[: -len(".nii.gz")]
    # the evaluation's stem matching pairs them with ground truth of the same names
    real = tmp_path / "real"
    real.mkdir()
    for name in volumes:
        (real / name.replace(".nii.gz", ".mha")).write_bytes(b"")
    assert pair_volumes(out, real).stems == ["valid_10_b_1", "valid_2_a_1"]
    # the voxels are stored in CT-RATE's order (the challenge's FVD and CLIP read file order), the affine true:
    # the same sample written in RAS is the same image
    assert nib.aff2axcodes(nib.load(out / volumes[0]).affine) == ("P", "L", "I")
    ras = tmp_path / "ras"
    assert ctgen_main(["sample", "--models", str(tiny_cascade), "--vlm3d", str(prompts), "--out-dir", str(ras),
                       "--steps", "2", "--seed", "3", "--orientation", "RAS"]) == 0
    a, b = nib.load(out / volumes[0]), nib.load(ras / volumes[0])
    assert nib.aff2axcodes(b.affine) == ("R", "A", "S")
    back = nib.orientations.apply_orientation(np.asarray(a.dataobj), nib.orientations.ornt_transform(
        nib.orientations.io_orientation(a.affine), nib.orientations.axcodes2ornt(("R", "A", "S"))))
    assert np.array_equal(back, np.asarray(b.dataobj))
    centre = lambda img: img.affine @ [*((np.array(img.shape) - 1) / 2), 1]  # noqa: E731
    assert np.allclose(centre(a), centre(b))
    assert ctgen_main(["sample", "--models", str(tiny_cascade), "--vlm3d", str(prompts), "--out-dir", str(ras),
                       "--orientation", "PLX"]) == 2


def test_sample_vlm3d_refuses_several_volumes_per_entry(tmp_path):
    path = _write(tmp_path, [{"input_image_name": "a", "report": "r"}])
    with pytest.raises(SystemExit) as exit_:
        ctgen_main(["sample", "--models", str(tmp_path), "--vlm3d", str(path), "--out-dir", str(tmp_path / "o"),
                    "--per-prompt", "2"])
    assert exit_.value.code == 2
