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


def test_missing_field_rejects_that_volume_only():
    cohort = pd.DataFrame([{**ROW, "VolumeName": "train_1_a_1.nii.gz", "split": "train"},
                           {**ROW, "age": None, "VolumeName": "train_2_a_1.nii.gz", "split": "train"}])
    table, rej = build_prompts(cohort, {"generatect": "{age} years old {sex}: {impression}", "imp": "{impression}"})
    assert list(table["VolumeName"]) == ["train_1_a_1.nii.gz"]
    assert list(rej["VolumeName"]) == ["train_2_a_1.nii.gz"] and "age" in rej["reason"][0]
