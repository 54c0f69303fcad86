"""The guidance sweep's scoring (:func:`ctgen.jobs.guidance.combine_scales`) on made-up scales: no sampling, no
networks, so that what the sweep table says of each number (profile, independent units) is checked in seconds."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ctgen.jobs.guidance import ScaleResult, combine_scales
from ctgen.metrics.distribution import FeatureRows
from ctprep.ctrate import LABELS

PROFILES = {"classifier": "classifier3d@aa", "clip": "clip3d@bb", "slicenet": "slicenet2d@cc"}
SETTINGS = {"bootstrap": 50, "bootstrap_frechet": 10, "auroc_min_positives": 2, "auroc_min_negatives": 2,
            "faithfulness_labels": list(LABELS[:3])}  # the paired tests' permutations cost per label


def scales(n_reports: int, repeats: int, classifier: bool = True) -> list[ScaleResult]:
    """Scales 1 and 3 of ``n_reports`` CT-RATE reports, ``repeats`` volumes each (with the classifier's columns)."""
    rng = np.random.default_rng(0)
    stems = [f"valid_{i}_a_1" for i in range(n_reports) for _ in range(repeats)]
    n = len(stems)
    y = np.repeat(rng.integers(0, 2, (n_reports, len(LABELS))).astype(float), repeats, axis=0)
    out = []
    for scale in (1.0, 3.0):
        frame = pd.DataFrame({"prompt_id": stems, "repeat": [r for _ in range(n_reports) for r in range(repeats)],
                              "clip_score": rng.normal(20 + scale, 1, n), "retrieval_rank": rng.integers(0, n_reports, n)})
        if classifier:
            frame = frame.assign(**{f"p_{x}": np.clip(0.3 * y[:, j] + rng.uniform(0, 0.7, n), 0, 1) for j, x in enumerate(LABELS)},
                                 **{f"y_{x}": y[:, j] for j, x in enumerate(LABELS)})
        fake = FeatureRows.stacked([rng.normal(size=(2, 4)) for _ in range(n)])
        real = FeatureRows.stacked([rng.normal(size=(2, 4)) for _ in range(n_reports)])
        out.append(ScaleResult(scale, frame, fake, real, [f"valid_{i}_a_1" for i in range(n_reports)], n_reports,
                               dict(PROFILES)))
    return out


def test_each_difference_row_carries_its_own_networks_profile(tmp_path):
    """The CLIP score difference used to carry the classifier's profile (one profile for every difference row)."""
    out = combine_scales(scales(12, 1), tmp_path / "sweep.csv", SETTINGS, device="cpu")
    out = out.set_index(["guidance_scale", "metric"])
    assert out.loc[(3.0, "guidance.clip_score_diff"), "profile"] == PROFILES["clip"]
    assert out.loc[(3.0, "guidance.faithfulness.macro_auroc_diff"), "profile"] == PROFILES["classifier"]
    assert out.loc[(3.0, "guidance.faithfulness.agreement_diff"), "profile"] == PROFILES["classifier"]
    assert out.loc[(3.0, "clip_score"), "profile"] == PROFILES["clip"]  # as the scale's own row


def test_the_fid_row_keeps_its_independent_units(tmp_path):
    """With repeats the Fréchet distance's CI resamples whole patients; the sweep row lost that count (the metric
    stored it under other keys than every other record)."""
    out = combine_scales(scales(12, 2, classifier=False), tmp_path / "sweep.csv", SETTINGS, device="cpu")
    out = out.set_index(["guidance_scale", "metric"])
    fid = out.loc[(3.0, "fid_2d.slicenet.axial")]
    assert fid["n"] == 24 and fid["n_resampled"] == 12 and fid["resampled"] == "patients"
    clip = out.loc[(3.0, "clip_score")]
    assert clip["n_resampled"] == 12 and clip["resampled"] == "patients"  # as the other rows already said

