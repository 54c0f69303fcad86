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
    assert len(truncate("averyveryverylongwordwithoutspaces and more", 10)) <= 10


def test_unknown_field_is_a_config_error():
    with pytest.raises(ValueError, match="unknown fields"):
        template_fields("{age} {diagnosis}")


def test_missing_field_rejects_that_volume_only():
    cohort = pd.DataFrame([{**ROW, "VolumeName": "train_1_a_1.nii.gz", "split": "train"},
                           {**ROW, "age": None, "VolumeName": "train_2_a_1.nii.gz", "split": "train"}])
    table, rej = build_prompts(cohort, {"generatect": "{age} years old {sex}: {impression}", "imp": "{impression}"})
    assert list(table["VolumeName"]) == ["train_1_a_1.nii.gz"]
    assert list(rej["VolumeName"]) == ["train_2_a_1.nii.gz"] and "age" in rej["reason"][0]
