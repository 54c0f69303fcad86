"""The VLM3D CLIP scores: CT-CLIP image-text (CLIPScore) and image-image (CLIPScore_I2I), per volume, averaged.

Source: forithmus/VLM3D-Dockers, ``ct_challenges/ctgen_evaluation/evaluate_clip.py``: for each prediction
(sorted file names) and its ground truth of the same stem, both volumes go through the CT-CLIP
preprocessing (:func:`ctgen.metrics.vlm3d.geometry.ctclip_volume`) and image encoder; the report goes
through the text side; ``score = max(0, 100 * cos)`` for (generated, report) and (generated, real);
``CLIPScore`` and ``CLIPScore_I2I`` are plain means over volumes and ``CLIPScore_mean`` their average.
The code looks reports up in a spreadsheet by stem and silently scores a missing one against the empty
string; here a missing report is an error.

Streaming: one pair of volumes at a time (a 240 x 480 x 480 float32 grid is 221 MB). CIs: bootstrap over
volumes, or over patients where CT-RATE stems give several volumes of one (:func:`mean_with_ci`'s groups).
The per-volume rows' score columns are named as the records (``clip_score_i2i_proxy`` for a proxy).
Beside the protocol's numbers, ``extra`` holds the real scan's own image-text score (the ceiling
a generator can reach with this encoder).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ctgen.metrics.summary import MetricValue, join_flags, mean_with_ci, stems_hash
from ctgen.metrics.vlm3d.contract import Pair, load_volume
from ctgen.metrics.vlm3d.geometry import CLIP_SHAPE, CLIP_SPACING, ctclip_volume
from ctgen.metrics.vlm3d.protocol import CHALLENGE, Extractor, features, metric_name, profile
from ctprep.logs import progress

log = logging.getLogger(__name__)


def score(a: np.ndarray, b: np.ndarray) -> float:
    """``max(0, 100 * cos(a, b))`` (torchmetrics' pairwise cosine of the two latents)."""
    cos = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
    return max(100.0 * cos, 0.0)


def ctclip_scores(pairs: Sequence[Pair], image: Extractor, text: Extractor | None = None,
                  reports: Mapping[str, str] | None = None, spacing: Sequence[float] = CLIP_SPACING,
                  shape: Sequence[int] = CLIP_SHAPE, device=None) -> tuple[list[MetricValue], list[dict]]:
    """(records, per-volume rows: ``stem`` and the scores, named as the records) of the CLIP scores.

    ``image.fn`` takes (1, 240, 480, 480) float32 HU (pad -1 HU; CT-CLIP divides by 1000 itself) and returns
    (1, L) latents; ``text.fn`` takes a list of reports and returns (B, L). Without ``text``/``reports`` only
    the image-image score is computed (and the records say so).
    """
    if not pairs:
        raise ValueError("CLIP score: no volume pairs")
    with_text = text is not None and reports is not None
    if with_text:
        missing = [p.stem for p in pairs if not str(reports.get(p.stem) or "").strip()]
        if missing:
            raise ValueError(f"CLIP score: no report for {len(missing)} generated volume(s): {', '.join(missing[:5])}")
    rows = []
    with progress(total=len(pairs), desc="ctclip", unit="pair") as bar:
        for pair in pairs:
            g = features(image, ctclip_volume(load_volume(pair.generated), spacing, shape)[None], device)[0].numpy()
            r = features(image, ctclip_volume(load_volume(pair.real), spacing, shape)[None], device)[0].numpy()
            row = {"stem": pair.stem, "clip_score_i2i": score(g, r)}
            if with_text:
                with torch.no_grad():
                    t = text.fn([reports[pair.stem]])
                t = t.detach().to("cpu", torch.float64).numpy()[0]
                row.update(clip_score=score(g, t), clip_score_real=score(r, t))
                row["clip_score_mean"] = (row["clip_score"] + row["clip_score_i2i"]) / 2
            rows.append(row)
            bar.update(1)
    described = image if text is None else Extractor(image.fn, image.description, image.proxy or text.proxy)
    prof = profile(CHALLENGE, "ctclip", described)
    # groups: the CIs resample CT-RATE patients, not their reconstructions one by one (as ctgen's own CLIP score)
    kw = dict(profile=prof, stems=stems_hash(p.stem for p in pairs), groups=[p.stem for p in pairs])
    key = (lambda k: None) if described.proxy else (lambda k: k)  # a proxy's number is never a leaderboard key
    records = [mean_with_ci([r["clip_score_i2i"] for r in rows], metric_name("clip_score_i2i", described), **kw)]
    records[0].extra["official_key"] = key("CLIPScore_I2I")
    if with_text:
        i2t = mean_with_ci([r["clip_score"] for r in rows], metric_name("clip_score", described), **kw)
        i2t.extra.update(official_key=key("CLIPScore"),
                         real_i2t_mean=float(np.mean([r["clip_score_real"] for r in rows])))
        both = mean_with_ci([r["clip_score_mean"] for r in rows], metric_name("clip_score_mean", described), **kw)
        both.extra["official_key"] = key("CLIPScore_mean")
        records = [i2t, records[0], both]
    else:
        records[0].flag = join_flags(("no reports given" if reports is None else
                                      "no text encoder (evaluation.vlm3d.cxr_bert)") + ": only the image-image score",
                                     records[0].flag)
    for rec in records:  # mean_with_ci flags too few volumes
        if tuple(spacing) != CLIP_SPACING or tuple(shape) != CLIP_SHAPE:
            rec.flag = "; ".join(filter(None, [rec.flag, f"grid {tuple(shape)} at {tuple(spacing)} mm, not the challenge's"]))
        rec.extra.update(spacing=list(spacing), shape=list(shape))
        log.info("%s %.4g over %d volumes (%s)", rec.name, rec.value, rec.n, prof)
    # the per-volume columns carry the records' names: a proxy's column says _proxy too
    rows = [{k if k == "stem" else metric_name(k, described): v for k, v in row.items()} for row in rows]
    return records, rows
