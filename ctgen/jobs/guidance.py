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

The workflow samples each scale in a job of its own (:func:`guidance_scale`: on the demo's two cores two
scales sample side by side; on a cluster each takes a GPU), which keeps what the scores need (per-volume
probabilities, CLIP scores and retrieval ranks, slice features); one more job scores and joins them
(:func:`combine_scales`), so that an edit of a scoring setting (the bootstrap, the labels) scores again without
sampling again. :func:`guidance_sweep` does all of it in one process.

``repeats``: volumes per report and scale, with seeds ``seed + k`` over the (report, repeat) pairs in
order (as ``ctgen sample`` numbers them). Each is one pair of the paired tests; where ``repeats`` > 1 the
permutation test swaps and the paired bootstrap CI resamples whole reports (their volumes share the labels;
whole patients for CT-RATE VolumeNames), as do the CIs of each scale's own numbers, the Fréchet distance's included.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
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


@dataclass
class ScaleResult:
    """One guidance scale's sampled volumes, as their scores need them: the per-volume frame (prompt_id, repeat,
    clip_score, retrieval_rank and, with a classifier, p_<label> and y_<label> for all 18 labels: the paired tests'
    pairs), the slice features of the generated volumes and of the real scans (the 2D FID's), the number of
    candidate reports of the retrieval and the networks' profiles. The scores themselves, with their CIs, come from
    :func:`scale_metrics`: a scoring setting (the bootstrap, the labels) is applied without sampling again."""

    scale: float
    per_volume: pd.DataFrame
    fake: FeatureRows            # the generated volumes' axial slice features, in per_volume's order
    real: FeatureRows            # the real scans' (each scan once)
    real_stems: list[str]        # the stem of each real scan
    n_candidates: int            # distinct prompts: the retrieval's candidates
    profiles: dict[str, str]     # network -> profile (weights hash)

    def save(self, out_json: str | Path, out_parquet: str | Path, out_features: str | Path) -> None:
        Path(out_json).write_text(json.dumps({"scale": self.scale, "n_candidates": self.n_candidates,
                                              "real_stems": self.real_stems, "profiles": self.profiles},
                                             indent=1) + "\n")
        self.per_volume.to_parquet(out_parquet, index=False)
        with open(out_features, "wb") as fh:  # a file object: np.savez would append ".npz" to a path without it
            np.savez(fh, fake=self.fake.feats, fake_owner=self.fake.owner, real=self.real.feats,
                     real_owner=self.real.owner)

    @classmethod
    def load(cls, in_json: str | Path, in_parquet: str | Path, in_features: str | Path) -> ScaleResult:
        d = json.loads(Path(in_json).read_text())
        per_volume = pd.read_parquet(in_parquet)
        with np.load(in_features) as z:
            fake = FeatureRows(z["fake"], z["fake_owner"], len(per_volume))
            real = FeatureRows(z["real"], z["real_owner"], len(d["real_stems"]))
        return cls(float(d["scale"]), per_volume, fake, real, list(d["real_stems"]), int(d["n_candidates"]),
                   d["profiles"])


@dataclass
class _Sweep:
    """What every scale shares: the prompts and their labels, the networks, the real scans' slice features."""

    cfg: EvalConfig
    sampling: dict
    device: str
    stems: list[str]
    texts: list[str]
    repeat: list[int]
    grid: Grid
    nets: FeatureNets
    y: np.ndarray | None  # (N, 18) the prompts' labels, NaN unknown; None: no faithfulness
    real: FeatureRows
    real_stems: list[str]  # the stem of each real scan's block of rows
    candidates: list[str]
    target: np.ndarray
    t_emb: np.ndarray
    pipe: object


def _prepare(models_dir: str | Path, prompts_csv: str | Path, sampling: dict, reference: list[str],
             settings: EvalConfig | dict | None, device: str | None, repeats: int) -> _Sweep:
    from ctgen.pipelines.text_to_ct import TextToCTPipeline

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
    y = np.stack([known[s] for s in stems]) if nets.classifier is not None and all(s in known for s in stems) else None
    if y is None:
        log.warning("no faithfulness in the sweep: %s", "no classifier in the models folder" if nets.classifier is None
                    else "the reference shards hold no labels for some prompts")
    real_blocks, real_stems = [], []
    for stem, hu, _ in real.read(set(stems), grid):  # each real scan once
        if isinstance(hu, BadVolume):
            raise UserError(f"the real scan {stem} cannot be read: {hu}")
        real_stems.append(stem)
        real_blocks.append(slice_outputs(nets, hu_to_unit(torch.from_numpy(hu), grid.clip), cfg.slices_per_volume,
                                         planes=("axial",))["slicenet"]["axial"])
    candidates, target = distinct_texts(texts)
    t_emb = clip_text_embedder(nets, models_dir)(candidates)  # (M, E)
    return _Sweep(cfg, sampling, device, stems, texts, repeat, grid, nets, y, FeatureRows.stacked(real_blocks),
                  real_stems, candidates, target, t_emb, TextToCTPipeline.from_pretrained(models_dir, device=device))


@torch.no_grad()
def _sample(sw: _Sweep, scale: float) -> ScaleResult:
    """The prompts sampled at ``scale`` and passed through the networks: what :func:`scale_metrics` scores."""
    from ctgen.pipelines.text_to_ct import SampleSettings

    cfg, sampling, nets = sw.cfg, sw.sampling, sw.nets
    settings = SampleSettings(steps=sampling["steps"], guidance_scale=float(scale), temperature=sampling["temperature"],
                              sr_steps=sampling.get("sr_steps"), sr_batch_size=sampling["batch_size"],
                              truncate_prompt=True)
    emb, probs, blocks = [], [], []
    for start in progress(range(0, len(sw.texts), cfg.batch_size), desc=f"guidance {scale:g}", unit="batch"):
        part = sw.texts[start:start + cfg.batch_size]
        gens = [torch.Generator(device=sw.device).manual_seed(sampling["seed"] + start + i) for i in range(len(part))]
        units = [hu_to_unit(torch.from_numpy(to_model_layout(v.array[0]).astype(np.float32)), sw.grid.clip)
                 for v in sw.pipe(part, settings, gens)]  # (1, D, H, W) each
        out = volume_outputs(nets, torch.stack(units))
        emb.append(out["clip_embedding"])
        if sw.y is not None:
            probs.append(out["probabilities"])
        blocks += [slice_outputs(nets, u[0], cfg.slices_per_volume, planes=("axial",))["slicenet"]["axial"]
                   for u in units]
    emb = np.concatenate(emb)
    cos = (emb * sw.t_emb[sw.target]).sum(axis=1)
    frame = pd.DataFrame({"prompt_id": sw.stems, "repeat": sw.repeat, "clip_score": 100 * np.maximum(cos, 0),
                          "retrieval_rank": retrieval_ranks(emb, sw.t_emb, sw.target)})
    if sw.y is not None:
        p = np.concatenate(probs)
        frame = frame.assign(**{f"p_{n}": p[:, j] for j, n in enumerate(LABELS)},
                             **{f"y_{n}": sw.y[:, j] for j, n in enumerate(LABELS)})
    return ScaleResult(float(scale), frame, FeatureRows.stacked(blocks), sw.real, list(sw.real_stems),
                       len(sw.candidates),
                       {k: v for k, v in nets.profiles.items() if k in ("classifier", "clip", "slicenet")})


def scale_metrics(r: ScaleResult, settings: EvalConfig | dict | None = None,
                  device: str | None = None) -> tuple[list, list[str]]:
    """One scale's numbers, each with its CI, n and profile: faithfulness (per label and macro), the CLIP score,
    text retrieval and the axial 2D FID against the real scans; and the labels the macro averaged."""
    cfg = settings if isinstance(settings, EvalConfig) else EvalConfig.from_dict(settings)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    stems = list(r.per_volume["prompt_id"].astype(str))
    kw = {"stems": stems_hash(stems), "n_boot": cfg.bootstrap, "seed": cfg.seed}
    metrics, macro_labels = [], []
    if all(f"p_{n}" in r.per_volume for n in cfg.labels):
        p = r.per_volume[[f"p_{n}" for n in cfg.labels]].to_numpy(np.float64)
        y = r.per_volume[[f"y_{n}" for n in cfg.labels]].to_numpy(np.float64)
        metrics += label_aurocs(p, y, cfg.labels, name="faithfulness.generated", min_positives=cfg.auroc_min_positives,
                                min_negatives=cfg.auroc_min_negatives, profile=r.profiles["classifier"],
                                groups=stems, **kw)
        macro_labels = list(metrics[-1].extra.get("labels") or [])
    metrics += [mean_with_ci(r.per_volume["clip_score"].to_numpy(), "clip_score", profile=r.profiles["clip"],
                             groups=stems, **kw),
                top_k_accuracy(r.per_volume["retrieval_rank"].to_numpy(), 1, r.n_candidates, "retrieval.top1",
                               profile=r.profiles["clip"], groups=stems, **kw),
                frechet_value(r.real, r.fake, "fid_2d.slicenet.axial", profile=r.profiles["slicenet"],
                              stems=kw["stems"], n_boot=cfg.bootstrap_frechet, seed=cfg.seed, device=device,
                              groups_fake=stems, groups_real=r.real_stems)]
    log.info("guidance %.2f: %s", r.scale, ", ".join(f"{m.name} {m.value}" for m in metrics
                                                    if "." not in m.name or m.name.endswith(MACRO)))
    return metrics, macro_labels


def guidance_scale(models_dir: str | Path, prompts_csv: str | Path, scale: float, sampling: dict, reference: list[str],
                   settings: EvalConfig | dict | None = None, device: str | None = None,
                   repeats: int = 1) -> ScaleResult:
    """One scale of the sweep sampled (a job of its own: the scales run side by side); ``sampling``: config.yaml's
    ``sampling``. :func:`combine_scales` scores the scales and tests them against each other."""
    return _sample(_prepare(models_dir, prompts_csv, sampling, reference, settings, device, repeats), scale)


def combine_scales(results: list[ScaleResult], out_csv: str | Path,
                   settings: EvalConfig | dict | None = None, device: str | None = None) -> pd.DataFrame:
    """The sweep table: every scale's rows (:func:`scale_metrics`), then each scale against the lowest (1: the
    conditional model alone), pair by pair on the same reports and seeds."""
    cfg = settings if isinstance(settings, EvalConfig) else EvalConfig.from_dict(settings)
    results = sorted(results, key=lambda r: r.scale)
    if len({r.scale for r in results}) != len(results):
        raise ValueError(f"a guidance scale is given twice: {[r.scale for r in results]}")
    rows, base_labels = [], None
    for r in results:
        metrics, labels = scale_metrics(r, cfg, device)
        rows += [_row(r.scale, m) for m in metrics]
        base_labels = labels if base_labels is None else base_labels
    base = results[0]
    for r in results[1:]:
        for m in paired_differences(r.per_volume, base.per_volume, names=(f"{r.scale:g}", f"{base.scale:g}"),
                                    prefix="guidance", labels=base_labels, n_boot=cfg.bootstrap, seed=cfg.seed):
            m.profile = base.profiles.get(_network(m.name), "")
            rows.append({**_row(r.scale, m), "versus": base.scale, "p_value": m.extra.get("p_value")})
            log.info("guidance %g vs %g: %s %s, 95%% CI %s, p = %s", r.scale, base.scale, m.name, m.value, m.ci,
                     m.extra.get("p_value"))
    out = pd.DataFrame(rows)
    out.to_csv(out_csv, index=False)
    return out


def guidance_sweep(models_dir: str | Path, prompts_csv: str | Path, scales: list[float], sampling: dict,
                   reference: list[str], out_csv: str | Path, settings: EvalConfig | dict | None = None,
                   device: str | None = None, repeats: int = 1) -> pd.DataFrame:
    """The whole sweep in one process (the networks and real scans loaded once): every scale, then
    :func:`combine_scales`. The workflow runs each scale as a job of its own instead."""
    sw = _prepare(models_dir, prompts_csv, sampling, reference, settings, device, repeats)
    return combine_scales([_sample(sw, float(s)) for s in scales], out_csv, sw.cfg, sw.device)


def _network(difference: str) -> str:
    """The network whose outputs a paired difference compares: the classifier's probabilities for faithfulness,
    CLIP's embeddings for the rest (the CLIP score), as each scale's own rows name them in :func:`scale_metrics`."""
    return "classifier" if difference.startswith("guidance.faithfulness.") else "clip"


def _plain(value):
    """JSON for numpy scalars in the metric rows."""
    return value.item() if isinstance(value, np.generic) else str(value)


def _row(scale: float, m) -> dict:
    return {"guidance_scale": float(scale), "metric": m.name, "value": m.value, "ci_low": m.ci[0] if m.ci else None,
            "ci_high": m.ci[1] if m.ci else None, "n": m.n, "profile": m.profile, "stems": m.stems, "flag": m.flag,
            "chance": m.extra.get("chance"), "resampled": m.extra.get("resampled"),
            "n_resampled": m.extra.get("n_resampled")}
