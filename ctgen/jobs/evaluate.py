"""Score any folder of predictions against ground truth: ``ctgen evaluate`` and the workflow's ``evaluate`` rule.

``evaluate(generated, real, models_dir, out_dir, settings)`` matches predictions to ground truth by
stem (:mod:`ctgen.jobs.pairing`), streams both in batches of ``batch_size`` ground-truth volumes
(every network on the job's device; memory: one batch of volumes plus per-volume features), and
writes to ``out_dir``:

* ``metrics.json``: every number as a MetricValue record (value, n, bootstrap 95% CI over volumes,
  the profile: backbone and weights hash, the hash of the scored stems, a flag where it is thin),
  the groups not computed and why, the counts, the inputs and the provenance;
* ``per_volume.csv``: one row per scored prediction, for ``ctgen compare`` (paired permutation test); its
  ``hu_problem`` names values that do not read as HU (normalised, raw stored values), ``extent_problem`` a field
  of view under half or over twice the grid's along some axis (an untruthful header spacing): such predictions
  are scored, counted (``n.predictions_not_hu``, ``n.predictions_off_extent``) and every metric computed on them
  is flagged;
* ``skipped.csv``: every prediction or ground-truth volume left out, and why;
* ``hu_histograms.json``: mean HU densities of the generated and the real volumes (``n``: volumes per side).

What is computed depends on what the models folder holds (clip, classifier, slicenet; see
:mod:`ctgen.jobs.features`), on the TSTR classifiers given, and on the texts and labels at hand; a group that cannot be computed is
listed in ``not_computed`` with the reason, never left out silently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ctgen.data.layout import hu_to_unit
from ctgen.jobs.eval_config import EvalConfig
from ctgen.jobs.features import FeatureNets, clip_text_embedder, load_models_folder, slice_outputs, volume_outputs
from ctgen.jobs.pairing import BadVolume, Grid, RealSet, Skip, generator_specs, pair, read_labels, read_prediction, \
    read_predictions, read_reports, skipped_table
from ctgen.jobs.score import alignment_metrics, hu_metrics, label_aurocs, tstr_metrics
from ctgen.metrics.distribution import FeatureRows, frechet_value, frechet_values
from ctgen.metrics.hu import flag_out_of_range, hu_histogram, tissue_stats
from ctgen.metrics.retrieval import distinct_texts, retrieval_ranks
from ctgen.metrics.slices import PLANES
from ctgen.metrics.summary import MetricValue, join_flags, stems_hash
from ctprep.ctrate import LABELS
from ctprep.errors import UserError
from ctprep.logs import progress

log = logging.getLogger(__name__)

class _Collected:
    """Per-volume outputs of the stream, kept until scoring (features, not volumes)."""

    def __init__(self):
        self.gen_rows: list[dict] = []  # one per scored prediction
        self.gen_real: list[int] = []  # index of each prediction's ground truth among the paired real volumes
        self.real_stems: list[str] = []  # paired ground truth, in order
        self.out: dict[str, dict[str, list]] = {"generated": {}, "real": {}}  # side -> output -> rows
        self.slices: dict[str, dict[str, dict[str, list]]] = {"generated": {}, "real": {}}  # side -> space -> plane
        self.stats: dict[str, list] = {"generated": [], "real": []}  # tissue_stats
        self.hist: dict[str, list] = {"generated": [], "real": []}  # summed densities, count
        self.tstr_stems: list[str] = []  # every ground truth read (TSTR tests on all of it)
        self.tstr: dict[str, list] = {}

    def add(self, side: str, nets: FeatureNets, hus: list[np.ndarray], window, n_slices) -> None:
        units = [hu_to_unit(torch.from_numpy(h)[None], window) for h in hus]  # (1, D, H, W) each
        for k, v in volume_outputs(nets, torch.stack(units)).items():
            if k.startswith("tstr_"):
                continue
            self.out[side].setdefault(k, []).extend(v)
        for hu, unit in zip(hus, units):
            for space, planes in slice_outputs(nets, unit[0], n_slices).items():
                for plane, rows in planes.items():
                    self.slices[side].setdefault(space, {}).setdefault(plane, []).append(rows)
            self.stats[side].append(tissue_stats(hu))
            density, edges = hu_histogram(hu)
            self.hist[side] = [self.hist[side][0] + density, self.hist[side][1] + 1] if self.hist[side] else [density, 1]
            self.edges = edges

    def add_tstr(self, nets: FeatureNets, stems: list[str], hus: list[np.ndarray], window) -> None:
        video = torch.stack([hu_to_unit(torch.from_numpy(h)[None], window) for h in hus])
        for k, v in volume_outputs(FeatureNets(tstr=nets.tstr), video).items():
            self.tstr.setdefault(k, []).extend(v)
        self.tstr_stems += stems


@torch.no_grad()
def evaluate(generated: str | Path, real: list[str | Path], models_dir: str | Path, out_dir: str | Path,
             settings: EvalConfig | dict | None = None, reports: str | Path | None = None,
             labels: str | Path | None = None, device: str | None = None,
             tstr: tuple[str | Path, str | Path] | None = None, spec: str | Path | None = None) -> dict[str, Any]:
    """Score the predictions ``generated`` against the ground truth ``real``; see the module doc.

    ``tstr``: the folders of the classifier trained on synthetic and of the one trained on real volumes.
    ``spec``: the generator spec whose grid the volumes are scored on (default: the one in ``models_dir``).
    """
    cfg = settings if isinstance(settings, EvalConfig) else EvalConfig.from_dict(settings)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = Grid.from_spec(spec) if spec else Grid.from_models(models_dir)
    nets = load_models_folder(models_dir, device, cfg.inception_weights, window=grid.clip, tstr=tstr)
    predictions, skips = read_predictions(generated)
    truth = RealSet(list(real))
    skips += truth.skipped
    pairing = pair(predictions, truth.stems)
    skips += pairing.skips(truth.paths)
    texts, known_labels = _texts_and_labels(truth, predictions, models_dir, nets, reports, labels, spec)
    col = _stream(truth, pairing, nets, grid, cfg, skips)
    n_pred, n_skipped = len(col.gen_rows), sum(1 for s in skips if s.side == "generated")
    if not n_pred:
        skipped_table(skips).to_csv(out_dir / "skipped.csv", index=False)
        first = next((f"{s.stem}: {s.reason}" for s in skips), "")
        raise UserError(f"no prediction could be scored: all {len(predictions)} were skipped (first: {first}; all in "
                        f"{out_dir}/skipped.csv)")
    log.info("scoring %d predictions against %d ground-truth volumes; %d predictions and %d ground-truth volumes skipped",
             n_pred, len(col.real_stems), n_skipped, sum(1 for s in skips if s.side == "real"))
    metrics, not_computed, per_volume = _score(col, nets, texts, known_labels, cfg, device, models_dir, spec)
    n_not_hu = sum(1 for r in col.gen_rows if r["hu_problem"])
    n_extent = sum(1 for r in col.gen_rows if r["extent_problem"])
    # values that do not read as HU were scored as HU, a chest of another size resampled as it is: no number
    # computed on them may hide it
    note = join_flags(
        f"{n_not_hu} of {n_pred} predictions hold values that do not read as HU (per_volume.csv: hu_problem)"
        if n_not_hu else None,
        f"{n_extent} of {n_pred} predictions have a field of view that does not fit the grid (per_volume.csv: "
        "extent_problem)" if n_extent else None)
    if note:
        metrics = [dataclasses.replace(m, flag=join_flags(m.flag, note)) if _uses_predictions(m.name) else m
                   for m in metrics]
    skipped_table(skips).to_csv(out_dir / "skipped.csv", index=False)
    per_volume.to_csv(out_dir / "per_volume.csv", index=False)
    hist = {"edges": col.edges.tolist(), **{s: (h[0] / h[1]).tolist() for s, h in col.hist.items()},
            "n": {s: int(h[1]) for s, h in col.hist.items()}}  # volumes averaged per side
    (out_dir / "hu_histograms.json").write_text(json.dumps(hist))
    from ctgen.models.base import provenance

    summary = {
        "metrics": [m.to_json() for m in metrics], "not_computed": not_computed,
        "n": {"predictions": len(predictions), "scored": n_pred, "predictions_not_hu": n_not_hu,
              "predictions_off_extent": n_extent,
              "ground_truth": len(truth.stems),
              "ground_truth_paired": len(col.real_stems), "skipped_predictions": n_skipped,
              "skipped_ground_truth": sum(1 for s in skips if s.side == "real")},
        "profiles": nets.profiles, "grid": asdict(grid), "settings": asdict(cfg), "device": device,
        "inputs": {"generated": str(generated), "real": [str(r) for r in real], "models": str(models_dir),
                   "spec": str(spec) if spec else None,
                   "reports": str(reports) if reports else None, "labels": str(labels) if labels else None,
                   "tstr": [str(t) for t in tstr] if tstr else None},
        "provenance": provenance(cfg.seed),
    }
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    for m in metrics:
        if m.name.endswith((".mean", ".macro", ".generated")) or m.name.startswith("fd_3d"):
            log.info("%s = %s (95%% CI %s, n = %d%s)", m.name, m.value, m.ci, m.n, f"; {m.flag}" if m.flag else "")
    return summary


def _uses_predictions(name: str) -> bool:
    """Whether a metric is computed on the predictions (not the real ceilings, not TSTR's real test set)."""
    return ".real" not in name and not name.startswith("tstr")


def _texts_and_labels(truth: RealSet, predictions, models_dir, nets: FeatureNets, reports, labels, spec=None):
    """{stem: report text} and {stem: (18,) labels}: a reports/labels file wins over the shards, the shards over
    the prompts recorded in samples.csv. A report of the reports file without a prompt is rendered as the CLIP
    model's prompt (the template it was trained on; the generator spec's rendering)."""
    template = ((getattr(nets.clip, "provenance", None) or {}).get("data") or {}).get("prompt")
    texts = {p.stem: p.prompt for p in predictions if isinstance(p.prompt, str) and p.prompt.strip()}
    texts.update(truth.texts(template))
    if reports:
        from ctgen.jobs.sample import report_template

        found = generator_specs(models_dir, spec)
        generator = json.loads(found[0].read_text()) if found else {}
        texts.update(read_reports(reports, *report_template(generator, template)))
    known = truth.labels()
    if labels:
        known.update(read_labels(labels))
    return texts, known


def _stream(truth: RealSet, pairing, nets: FeatureNets, grid: Grid, cfg: EvalConfig, skips: list[Skip]) -> _Collected:
    """Read ground truth in its order with its predictions, a batch at a time, through the networks."""
    col = _Collected()
    wanted = set(pairing.pairs) | (set(truth.stems) if len(nets.tstr) == 2 else set())
    batch: list[tuple[str, np.ndarray, list]] = []

    def flush():
        if not batch:
            return
        if len(nets.tstr) == 2:
            col.add_tstr(nets, [s for s, _, _ in batch], [h for _, h, _ in batch], grid.clip)
        paired = [(s, h, g) for s, h, g in batch if g]
        for start in range(0, len(paired), cfg.batch_size):
            part = paired[start:start + cfg.batch_size]
            col.add("real", nets, [h for _, h, _ in part], grid.clip, cfg.slices_per_volume)
            for stem, _, gens in part:
                col.real_stems.append(stem)
                for p, _, resampled, problem, extent in gens:
                    col.gen_rows.append({"prompt_id": stem, "sample": p.path, "seed": p.seed, "repeat": p.repeat,
                                         "resampled": resampled, "hu_problem": problem or "",
                                         "extent_problem": extent or ""})
                    col.gen_real.append(len(col.real_stems) - 1)
            gens = [g for _, _, gs in part for _, g, *_ in gs]
            for i in range(0, len(gens), cfg.batch_size):
                col.add("generated", nets, gens[i:i + cfg.batch_size], grid.clip, cfg.slices_per_volume)
        batch.clear()

    for stem, hu, _ in progress(truth.read(wanted, grid), total=len(wanted), desc="evaluate", unit="vol"):
        preds = pairing.pairs.get(stem, [])
        if isinstance(hu, BadVolume):
            skips.append(Skip(stem, "real", truth.paths.get(stem, ""), str(hu)))
            skips += [Skip(stem, "generated", p.path, "its ground truth was skipped") for p in preds]
            continue
        gens = []
        for p in preds:
            try:
                gens.append((p, *read_prediction(p.path, grid)))
            except BadVolume as err:
                skips.append(Skip(stem, "generated", p.path, str(err)))
                continue
            for problem in gens[-1][-2:]:
                if problem:
                    log.warning("prediction %s: %s; scored, and the metrics are flagged", p.path, problem)
        if preds and not gens:
            skips.append(Skip(stem, "real", truth.paths.get(stem, ""), "every prediction of this stem was skipped"))
        batch.append((stem, hu, gens))
        if len(batch) >= cfg.batch_size:
            flush()
    flush()
    return col


def _score(col: _Collected, nets: FeatureNets, texts, known_labels, cfg: EvalConfig, device, models_dir, spec=None):
    """Every metric group from the collected outputs -> (metrics, not_computed, per_volume table)."""
    metrics: list[MetricValue] = []
    not_computed: list[dict] = []
    gen_stems = [r["prompt_id"] for r in col.gen_rows]
    h_gen, h_real = stems_hash(gen_stems), stems_hash(col.real_stems)
    pv = pd.DataFrame(col.gen_rows)
    boot = {"n_boot": cfg.bootstrap, "seed": cfg.seed}
    gen, real = col.out["generated"], col.out["real"]
    # faithfulness: the classifier on generated volumes vs their reports' labels; the real ceiling beside it
    cols = [LABELS.index(n) for n in cfg.labels]
    if nets.classifier is None:
        not_computed.append({"group": "faithfulness", "reason": "no classifier in the models folder"})
    elif not any(s in known_labels for s in gen_stems):
        not_computed.append({"group": "faithfulness", "reason": f"no labels for the {len(gen_stems)} scored stems "
                                                                 f"(e.g. {gen_stems[:3]}): give --labels"})
    else:
        # a stem without labels counts as unknown in every label (NaN, as a blank CT-RATE cell): the rest is scored,
        # and every number says how many were left out
        unknown = np.full(len(LABELS), np.nan, np.float32)
        y_gen = np.stack([known_labels.get(s, unknown) for s in gen_stems])[:, cols]
        y_real = np.stack([known_labels.get(s, unknown) for s in col.real_stems])[:, cols]
        missing = sorted({s for s in gen_stems if s not in known_labels})
        note = (f"no labels for {len(missing)} of the {len(set(gen_stems))} scored stems (e.g. {missing[:3]}): scored "
                "on the others") if missing else None
        kw = {"min_positives": cfg.auroc_min_positives, "min_negatives": cfg.auroc_min_negatives,
              "profile": nets.profiles["classifier"], **boot}
        p_gen = np.stack(gen["probabilities"])[:, cols]
        # several volumes of one report (sampling.per_prompt > 1), or of one CT-RATE patient, share labels and
        # anatomy: their CIs resample reports or patients (the real side's too)
        faith = label_aurocs(p_gen, y_gen, cfg.labels, name="faithfulness.generated", stems=h_gen,
                             groups=gen_stems, **kw)
        for j, name in enumerate(cfg.labels):  # per volume, so that two runs compare pair by pair (ctgen.jobs.compare)
            pv[f"p_{name}"], pv[f"y_{name}"] = p_gen[:, j], y_gen[:, j]
        faith += label_aurocs(np.stack(real["probabilities"])[:, cols], y_real, cfg.labels, name="faithfulness.real",
                              stems=h_real, groups=col.real_stems, **kw)
        metrics += [dataclasses.replace(m, flag=join_flags(m.flag, note)) for m in faith] if note else faith
    # distribution: 2D FID per plane (+ mean) per slice space; Fréchet distance on each 3D network's features
    fkw = {"n_boot": cfg.bootstrap_frechet, "seed": cfg.seed, "device": device, "stems": h_gen,
           "groups_fake": gen_stems, "groups_real": col.real_stems}
    for space in col.slices["generated"]:
        fake = {p: FeatureRows.stacked(col.slices["generated"][space][p]) for p in PLANES}
        ref = {p: FeatureRows.stacked(col.slices["real"][space][p]) for p in PLANES}
        for m in frechet_values(ref, fake, f"fid_2d.{space}", profile=nets.profiles[space], mean=True, **fkw).values():
            m.extra["slices_per_volume"] = cfg.slices_per_volume
            metrics.append(m)
    if not col.slices["generated"]:
        not_computed.append({"group": "fid_2d", "reason": "no slicenet in the models folder and no inception_weights"})
    for net, key in (("clip", "clip_features"), ("classifier", "classifier_features")):
        if key in gen:
            metrics.append(frechet_value(FeatureRows.per_volume(np.stack(real[key])), FeatureRows.per_volume(
                np.stack(gen[key])), f"fd_3d.{net}", profile=nets.profiles[net], **fkw))
    # alignment: CLIP score and retrieval among the evaluation reports, each with the real ceiling
    pv["clip_score"] = pv["clip_score_real"] = pv["image_similarity"] = np.nan
    for k in cfg.retrieval_k:
        pv[f"retrieval_top{k}"] = np.nan
    have = [s in texts for s in gen_stems]
    if nets.clip is None or not any(have):
        not_computed.append({"group": "alignment", "reason": "no clip model in the models folder" if nets.clip is None
                             else "no report text for the scored stems: give --reports"})
    else:
        metrics += _alignment(col, nets, texts, have, cfg, pv, models_dir, spec)
    # TSTR: both classifiers on every real scan read
    keep = [i for i, s in enumerate(col.tstr_stems) if s in known_labels]
    if len(nets.tstr) < 2:
        not_computed.append({"group": "tstr", "reason": "no TSTR classifiers given (--tstr)"})
    elif not keep:
        not_computed.append({"group": "tstr", "reason": "no labels for the real scans: give --labels"})
    else:
        y = np.stack([known_labels[col.tstr_stems[i]] for i in keep])[:, cols]
        sizes = {k: {"volumes": n.provenance.get("n_volumes"), "steps": (n.provenance.get("train") or {}).get("max_steps")}
                 for k, n in nets.tstr.items()}
        metrics += tstr_metrics(np.stack(col.tstr["tstr_synthetic"])[keep][:, cols],
                                np.stack(col.tstr["tstr_real"])[keep][:, cols], y, list(cfg.labels),
                                min_positives=cfg.auroc_min_positives, min_negatives=cfg.auroc_min_negatives,
                                profiles=(nets.profiles["tstr_synthetic"], nets.profiles["tstr_real"]),
                                stems=stems_hash([col.tstr_stems[i] for i in keep]), train_sizes=sizes,
                                groups=[col.tstr_stems[i] for i in keep], **boot)
    # HU: per-tissue medians against the real range
    flags = [flag_out_of_range(s, col.stats["real"], cfg.hu_tolerance) for s in col.stats["generated"]]
    for tissue in col.stats["generated"][0]:
        pv[f"hu_{tissue}_median"] = [s[tissue]["median"] for s in col.stats["generated"]]
    pv["n_hu_flags"] = [len(f) for f in flags]
    pv["hu_flags"] = ["; ".join(f"{x['tissue']} {x['reason']}" for x in f) for f in flags]
    metrics += hu_metrics(col.stats["generated"], col.stats["real"], pv["n_hu_flags"].tolist(), stems=h_gen,
                          real_stems=h_real, gen_groups=gen_stems, real_groups=col.real_stems, **boot)
    return metrics, not_computed, pv


def _alignment(col: _Collected, nets: FeatureNets, texts: dict, have: list[bool], cfg: EvalConfig, pv, models_dir,
               spec=None):
    gen_stems = [r["prompt_id"] for r in col.gen_rows]
    candidates, index = distinct_texts(list(dict.fromkeys([texts[s] for s in col.real_stems if s in texts]
                                                          + [t for s, t in texts.items() if s not in col.real_stems])))
    by_text = dict(zip(candidates, range(len(candidates))))
    embed = clip_text_embedder(nets, models_dir, spec)
    t_emb = embed(candidates)  # (M, E)
    rows = np.flatnonzero(have)
    target = np.array([by_text[texts[gen_stems[i]]] for i in rows])
    e_gen = np.stack(col.out["generated"]["clip_embedding"])[rows]
    e_real = np.stack(col.out["real"]["clip_embedding"])[np.asarray(col.gen_real)[rows]]
    cos_gen = (e_gen * t_emb[target]).sum(axis=1)
    cos_real = (e_real * t_emb[target]).sum(axis=1)
    sim = (e_gen * e_real).sum(axis=1)
    ranks_gen, ranks_real = retrieval_ranks(e_gen, t_emb, target), retrieval_ranks(e_real, t_emb, target)
    pv.loc[rows, "clip_score"] = 100 * np.maximum(cos_gen, 0)
    pv.loc[rows, "clip_score_real"] = 100 * np.maximum(cos_real, 0)
    pv.loc[rows, "image_similarity"] = sim
    pv.loc[rows, "retrieval_rank"] = ranks_gen
    for k in cfg.retrieval_k:
        pv.loc[rows, f"retrieval_top{k}"] = (ranks_gen <= k).astype(float)
    return alignment_metrics(cos_gen, cos_real, sim, ranks_gen, ranks_real, len(candidates), cfg.retrieval_k,
                             profile=nets.profiles["clip"], stems=stems_hash([gen_stems[i] for i in rows]),
                             n_boot=cfg.bootstrap, seed=cfg.seed, groups=[gen_stems[i] for i in rows])
