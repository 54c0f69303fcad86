"""Dataset labels against parsed labels: blank (unknown) dataset labels are left out, never counted as 0."""

import pandas as pd

from ctprep.ctrate import LABELS
from ctprep.labelling import PARSED, label_agreement


def test_agreement_skips_unknown_dataset_labels():
    lab = LABELS[12]  # Pleural effusion
    rows = []
    for i, (truth, parsed) in enumerate([(1, 1), (0, 0), (None, 1), (0, 1)]):
        row = {"VolumeName": f"train_{i}_a_1.nii.gz", "split": "train"}
        row.update({name: 0 for name in LABELS})
        row.update({PARSED + name: 0 for name in LABELS})
        row[lab], row[PARSED + lab] = truth, parsed
        rows.append(row)
    labels = pd.DataFrame(rows)
    labels[list(LABELS)] = labels[list(LABELS)].astype("Int8")
    table, diffs = label_agreement(labels)
    row = table.set_index("label").loc[lab]
    assert row["n"] == 3 and row["unknown"] == 1  # the blank cell is neither a negative nor a disagreement
    assert row["false_positive"] == 1 and row["false_negative"] == 0 and row["agreement"] == 2 / 3
    assert list(diffs["VolumeName"]) == ["train_3_a_1.nii.gz"]
    other = table.set_index("label").loc[LABELS[0]]
    assert other["n"] == 4 and other["unknown"] == 0 and other["agreement"] == 1.0


def test_the_labellers_tables_for_the_report(tmp_path):
    """The agreement and the radiologist-label scores as HTML tables, each naming its n."""
    import json as _json

    from ctprep.labelling import write_labeller_eval

    rows = [{"id": f"r{i}", "text": text, "labels": {**dict.fromkeys(LABELS, 0), **labels}}
            for i, (text, labels) in enumerate([("Cardiomegaly.", {"Cardiomegaly": 1}),
                                                ("No pleural effusion.", {}),
                                                ("Emphysema in both lungs.", {"Emphysema": 1})] * 4)]
    ref = tmp_path / "ref.jsonl"
    ref.write_text("\n".join(_json.dumps(r) for r in rows))
    summary = write_labeller_eval(ref, tmp_path / "t.tsv", tmp_path / "s.json", tmp_path / "t.html")
    assert summary["all"]["n_reports"] == 12 and summary["all"]["macro_f1_ci"] is not None
    page = (tmp_path / "t.html").read_text()
    assert "<table" in page and "n = 12 reports" in page and "Cardiomegaly" in page and "all_f1_ci_low" in page
