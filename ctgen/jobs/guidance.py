"""The guidance sweep: the same prompts and seeds sampled at several classifier-free guidance scales, each scored.

Per scale: faithfulness (the classifier's per-label and macro AUROC of the generated volumes against
their reports' labels), the CLIP score of each volume with its prompt and text retrieval among the
sweep's prompts (with chance level), and the axial 2D FID in the slice network's space against the real
scans of the same reports; every number with its bootstrap CI, n and profile (a long table: one row per
scale and metric). Then each scale against the lowest one (1: no guidance), pair by pair on the same
reports and seeds (:func:`ctgen.jobs.compare.paired_differences`): the macro AUROC difference with its
paired bootstrap CI and paired permutation p-value, and the same for the per-volume CLIP score
(rows ``guidance.<metric>_diff`` with ``versus`` and ``p_value``). Volumes are sampled ``batch_size``
prompts at a time on the job's device and dropped once their features are taken; the real scans are
read once, one batch at a time.

``repeats``: volumes per report and scale, with seeds ``seed + k`` over the (report, repeat) pairs in
order (as ``ctgen sample`` numbers them). Each is one pair of the paired tests; the permutation test
swaps within pairs, and the paired bootstrap CI resamples whole reports (their volumes share the labels),
as do the CIs of each scale's own numbers where ``repeats`` > 1.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ctgen.data.layout import hu_to_unit, to_model_layout
from ctgen.jobs.compare import paired_differences
from ctgen.jobs.eval_config import EvalConfig
from ctgen.jobs.features import FeatureNets, clip_text_embedder, load_models_folder, slice_outputs, volume_outputs
from ctgen.jobs.pairing import BadVolume, Grid, RealSet
from ctgen.jobs.score import MACRO, label_aurocs
from ctgen.metrics.distribution import FeatureRows, frechet_value
from ctgen.metrics.retrieval import distinct_texts, retrieval_ranks, top_k_accuracy
from ctgen.metrics.summary import mean_with_ci, stems_hash
from ctprep.ctrate import LABELS, volume_key
from ctprep.errors import UserError
from ctprep.logs import progress

log = logging.getLogger(__name__)


@torch.no_grad()
def guidance_sweep(models_dir: str | Path, prompts_csv: str | Path, scales: list[float], sampling: dict,
                   reference: list[str], out_csv: str | Path, settings: EvalConfig | dict | None = None,
                   device: str | None = None, repeats: int = 1) -> pd.DataFrame:
    """Score the cascade in ``models_dir`` at each guidance scale; ``sampling``: config.yaml's ``sampling``."""
    from ctgen.pipelines.text_to_ct import SampleSettings, TextToCTPipeline

    cfg = settings if isinstance(settings, EvalConfig) else EvalConfig.from_dict(settings)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if repeats < 1:
        raise UserError(f"evaluation.guidance_repeats must be at least 1, got {repeats}")
    prompts = pd.read_csv(prompts_csv, dtype={"id": str})
    stems = [volume_key(i) for i in prompts["id"] for _ in range(repeats)]  # one per (report, repeat) pair
    texts = [t for t in prompts["prompt"] for _ in range(repeats)]
    repeat = [r for _ in range(len(prompts)) for r in range(repeats)]
    grid = Grid.from_models(models_dir)
    nets = load_models_folder(models_dir, device, window=grid.clip)
    if nets.clip is None or nets.slicenet is None:
        raise UserError(f"{models_dir}: the guidance sweep needs the clip and slicenet networks")
    nets = FeatureNets(clip=nets.clip, slicenet=nets.slicenet, classifier=nets.classifier, profiles=nets.profiles,
                       window=nets.window)
    real = RealSet(reference)
    known = real.labels()
    cols = [LABELS.index(n) for n in cfg.labels]
    y = np.stack([known[s] for s in stems])[:, cols] if nets.classifier is not None and all(s in known for s in stems) \
        else None
    if y is None:
        log.warning("no faithfulness in the sweep: %s", "no classifier in the models folder" if nets.classifier is None
                    else "the reference shards hold no labels for some prompts")
    real_blocks = []
    for stem, hu, _ in real.read(set(stems), grid):  # each real scan once
        if isinstance(hu, BadVolume):
            raise UserError(f"the real scan {stem} cannot be read: {hu}")
        real_blocks.append(slice_outputs(nets, hu_to_unit(torch.from_numpy(hu), grid.clip), cfg.slices_per_volume,
                                         planes=("axial",))["slicenet"]["axial"])
    candidates, target = distinct_texts(texts)
    t_emb = clip_text_embedder(nets, models_dir)(candidates)  # (M, E)
    pipe = TextToCTPipeline.from_pretrained(models_dir, device=device)
    kw = {"stems": stems_hash(stems), "n_boot": cfg.bootstrap, "seed": cfg.seed}
    rows, per_volume, macro_labels = [], {}, None
    for scale in scales:
        settings_ = SampleSettings(steps=sampling["steps"], guidance_scale=float(scale),
                                   temperature=sampling["temperature"], sr_steps=sampling.get("sr_steps"),
                                   sr_batch_size=sampling["batch_size"], truncate_prompt=True)
        emb, probs, blocks = [], [], []
        for start in progress(range(0, len(texts), cfg.batch_size), desc=f"guidance {scale:g}", unit="batch"):
            part = texts[start:start + cfg.batch_size]
            gens = [torch.Generator(device=device).manual_seed(sampling["seed"] + start + i) for i in range(len(part))]
            units = [hu_to_unit(torch.from_numpy(to_model_layout(v.array[0]).astype(np.float32)), grid.clip)
                     for v in pipe(part, settings_, gens)]  # (1, D, H, W) each
            out = volume_outputs(nets, torch.stack(units))
            emb.append(out["clip_embedding"])
            if y is not None:
                probs.append(out["probabilities"][:, cols])
            blocks += [slice_outputs(nets, u[0], cfg.slices_per_volume, planes=("axial",))["slicenet"]["axial"]
                       for u in units]
        emb = np.concatenate(emb)
        cos = (emb * t_emb[target]).sum(axis=1)
        frame = pd.DataFrame({"prompt_id": stems, "repeat": repeat, "clip_score": 100 * np.maximum(cos, 0)})
        metrics = []
        if y is not None:
            p = np.concatenate(probs)
            metrics += label_aurocs(p, y, cfg.labels, name="faithfulness.generated", min_positives=cfg.auroc_min_positives,
                                    min_negatives=cfg.auroc_min_negatives, profile=nets.profiles["classifier"],
                                    groups=stems, **kw)
            macro_labels = metrics[-1].extra.get("labels") or []
            frame = frame.assign(**{f"p_{n}": p[:, j] for j, n in enumerate(cfg.labels)},
                                 **{f"y_{n}": y[:, j] for j, n in enumerate(cfg.labels)})
        per_volume[float(scale)] = frame
        metrics += [mean_with_ci(frame["clip_score"].to_numpy(), "clip_score", profile=nets.profiles["clip"],
                                 groups=stems, **kw),
                   top_k_accuracy(retrieval_ranks(emb, t_emb, target), 1, len(candidates), "retrieval.top1",
                                  profile=nets.profiles["clip"], groups=stems, **kw),
                   frechet_value(FeatureRows.stacked(real_blocks), FeatureRows.stacked(blocks), "fid_2d.slicenet.axial",
                                 profile=nets.profiles["slicenet"], stems=kw["stems"], n_boot=cfg.bootstrap_frechet,
                                 seed=cfg.seed, device=device)]
        rows += [_row(scale, m) for m in metrics]
        log.info("guidance %.2f: %s", scale, ", ".join(f"{m.name} {m.value}" for m in metrics
                                                      if "." not in m.name or m.name.endswith(MACRO)))
    # each scale against the lowest (1: the conditional model alone), pair by pair on the same reports and seeds
    base = min(per_volume)
    for scale in sorted(s for s in per_volume if s != base):
        for m in paired_differences(per_volume[scale], per_volume[base], names=(f"{scale:g}", f"{base:g}"),
                                    prefix="guidance", labels=macro_labels or [], n_boot=cfg.bootstrap, seed=cfg.seed,
                                    profile=nets.profiles["classifier" if macro_labels else "clip"]):
            rows.append({**_row(scale, m), "versus": base, "p_value": m.extra.get("p_value")})
            log.info("guidance %g vs %g: %s %s, 95%% CI %s, p = %s", scale, base, m.name, m.value, m.ci,
                     m.extra.get("p_value"))
    out = pd.DataFrame(rows)
    out.to_csv(out_csv, index=False)
    return out


def _row(scale: float, m) -> dict:
    return {"guidance_scale": float(scale), "metric": m.name, "value": m.value, "ci_low": m.ci[0] if m.ci else None,
            "ci_high": m.ci[1] if m.ci else None, "n": m.n, "profile": m.profile, "stems": m.stems, "flag": m.flag,
            "chance": m.extra.get("chance"), "n_reports": m.extra.get("n_reports")}
