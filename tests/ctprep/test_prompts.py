import pandas as pd
import pytest

from ctprep.prompts import build_prompts, render, template_fields, truncate

ROW = {"age": 36, "sex": "male", "impression": "Right lower lobe nodule.  Left pleural effusion.",
       "findings": "A 9 mm nodule.\nNo pericardial effusion.", "clinical_information": "", "technique": "x"}


def test_generatect_template():
    assert render("{age} years old {sex}: {impression}", ROW) == "36 years old male: Right lower lobe nodule. Left pleural effusion."


def test_findings_impression_template_cleans_whitespace():
    out = render("Findings: {findings} Impression: {impression}", ROW)
    assert out == "Findings: A 9 mm nodule. No pericardial effusion. Impression: Right lower lobe nodule. Left pleural effusion."


def test_truncate_at_sentence_boundary():
    text = "First sentence here. Second one is longer. Third."
    assert truncate(text, 45) == "First sentence here. Second one is longer."
    assert truncate(text, 25) == "First sentence here."
    assert truncate("• Coronary stents • Emphysema in both lungs", 20) == "Coronary stents"
    assert truncate(text, 0) == text
    # a sentence is never cut: the first is kept whole even over the budget
    assert truncate("averyveryverylongwordwithoutspaces and more", 10) == "averyveryverylongwordwithoutspaces and more"
    assert truncate(text, 10) == "First sentence here."


@pytest.mark.parametrize("max_chars", [40, 60, 80, 100])
def test_truncate_keeps_a_trailing_negation(max_chars, caplog):
    from ctprep.reports import parse_report

    row = {"age": 70, "sex": "male", "impression": "Pleural effusion and pericardial effusion in the examined "
                                                   "sections were not observed. Emphysema."}
    prompt = render("{age} years old {sex}: {impression}", row, max_chars=max_chars)
    assert prompt.startswith("70 years old male: Pleural effusion") and prompt.endswith("were not observed.")
    labels = parse_report(prompt).labels
    assert labels["Pleural effusion"] == labels["Pericardial effusion"] == 0
    cohort = pd.DataFrame([{**row, "VolumeName": "v", "split": "train"}])
    with caplog.at_level("WARNING", logger="ctprep.prompts"):
        build_prompts(cohort, {"generatect": "{age} years old {sex}: {impression}"}, max_chars)
    assert "1 prompts keep a first sentence longer than prompts.max_chars" in caplog.text


def test_unknown_field_is_a_config_error():
    with pytest.raises(ValueError, match="unknown fields"):
        template_fields("{age} {diagnosis}")


@pytest.mark.parametrize(("template", "match"), [
    ("{age} {sex}: {}", "positional field"),
    ("{age} {sex}: {0}", "positional field"),
    ("{impression!x}", "takes no conversion or format spec"),
    ("{impression!r}", "takes no conversion or format spec"),
    ("{age:d} years", "takes no conversion or format spec"),
    ("{impression:{age}}", "takes no conversion or format spec"),
    ("{age years", "expected '}'"),
])
def test_a_template_the_prompts_job_cannot_fill_is_a_config_error(template, match):
    with pytest.raises(ValueError, match=match) as err:
        template_fields(template)
    assert "\n" not in str(err.value)


def test_a_missing_field_empties_only_its_templates_cell_and_a_required_one_rejects_the_volume(caplog, tmp_path):
    """A volume without PatientSex kept its structured prompt and its impression-only prompt: only the template that
    needs {sex} has no prompt for it (the whole row was rejected, the structured prompt with it)."""
    from ctgen.jobs.sample import select_prompts
    from ctgen.jobs.text import prompt_texts

    cohort = pd.DataFrame([{**ROW, "VolumeName": "train_1_a_1.nii.gz", "split": "train"},
                           {**ROW, "sex": None, "VolumeName": "train_2_a_1.nii.gz", "split": "train"},
                           {**ROW, "age": None, "VolumeName": "train_3_a_1.nii.gz", "split": "train"}])
    templates = {"generatect": "{age} years old {sex}: {impression}", "imp": "{impression}"}
    structured = {"train_1_a_1.nii.gz": "nodule", "train_2_a_1.nii.gz": "cardiomegaly", "train_3_a_1.nii.gz": "effusion"}
    with caplog.at_level("WARNING", logger="ctprep.prompts"):
        table, rej = build_prompts(cohort, templates, structured=structured)
    assert len(rej) == 0 and list(table["structured"]) == ["nodule", "cardiomegaly", "effusion"]
    assert list(table["generatect"].isna()) == [False, True, True] and table["imp"].notna().all()
    assert "template 'generatect' left empty for 2 volume(s)" in caplog.text and "train_2_a_1.nii.gz lacks sex" in caplog.text
    # the prompts the models are trained on are required: a row that cannot fill one is rejected, naming it
    table, rej = build_prompts(cohort, templates, structured=structured, required=["generatect"])
    assert list(table["VolumeName"]) == ["train_1_a_1.nii.gz"]
    assert list(rej["VolumeName"]) == ["train_2_a_1.nii.gz", "train_3_a_1.nii.gz"]
    assert "'generatect' needs sex" in rej["reason"][0] and "needs age" in rej["reason"][1]
    with pytest.raises(ValueError, match="required prompts"):
        build_prompts(cohort, templates, required=["structured"])  # not written
    # the readers of the table: an empty cell is no text of that prompt, and no sampling prompt
    table, _ = build_prompts(cohort, templates, structured=structured)
    table.to_parquet(tmp_path / "prompts.parquet", index=False)
    assert sorted(prompt_texts(tmp_path / "prompts.parquet", "generatect")) == ["train_1_a_1"]
    assert len(prompt_texts(tmp_path / "prompts.parquet", "structured")) == 3
    got = select_prompts(tmp_path / "prompts.parquet", "generatect", "train", [], 5, tmp_path / "p.csv")
    assert list(got["VolumeName"]) == ["train_1_a_1.nii.gz"]
    with pytest.raises(ValueError, match=r"without a 'generatect' prompt.*train_2_a_1.nii.gz"):
        select_prompts(tmp_path / "prompts.parquet", "generatect", "train", ["train_2_a_1.nii.gz"], 5, tmp_path / "q.csv")


def test_training_on_a_prompt_a_volume_has_not_names_the_volume_and_the_missing_field_as_a_cause():
    from ctgen.data.batches import _prompt

    raw = {"__key__": "train_2_a_1", "__url__": "train-000000.tar", "prompts.json": {"structured": "cardiomegaly"},
           "prompt.txt": "cardiomegaly"}
    assert _prompt(raw, "structured") == "cardiomegaly"
    with pytest.raises(ValueError, match=r"sample train_2_a_1 has no prompt 'generatect'.*needs a field") as err:
        _prompt(raw, "generatect")
    assert "\n" not in str(err.value)
