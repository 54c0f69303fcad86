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
