"""The evaluation of a sampling run: FID (2D, 2.5D), FVD-style 3D Fréchet, CLIP score, faithfulness, TSTR, HU.

Reference set: the real volumes of the evaluation split. Feature spaces: the CT-CLIP-style model and
the 18-label classifier trained in the workflow on real training volumes (or InceptionV3 weights for
2D FID, where a user has them). Every generated volume keeps a row in ``per_volume.csv`` so runs can
be compared pairwise (:func:`compare_runs`, a paired permutation test per metric).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ctgen.data.batches import load_volumes
from ctgen.data.layout import hu_to_unit, to_model_layout, unit_to_hu
from ctgen.data.text import TextConditioning
from ctgen.jobs.features import FeatureNets, embed_texts, extract_features, load_feature_nets
from ctgen.metrics import (
    TISSUES, auroc_per_label, clip_score, fid_from_features, flag_out_of_range, frechet_3d, hu_histogram,
    image_similarity, paired_permutation_test, slice_features, tissue_stats, tstr_summary,
)
from ctprep.ctrate import LABELS
from ctprep.errors import UserError
from ctprep.logs import progress

log = logging.getLogger(__name__)


def load_generated(samples_csv: str | Path, window) -> tuple[pd.DataFrame, list[dict]]:
    """The sampling run's manifest and its volumes ({key, volume (1, D, H, W) in [-1, 1], hu (D, H, W)}).

    ``window``: the prep preset's HU window, mapped to [-1, 1] as for the training volumes.
    """
    from ctprep.volume import load_nifti

    manifest = pd.read_csv(samples_csv)
    missing = {"nifti", "prompt_id"} - set(manifest.columns)
    if missing:
        raise UserError(f"{samples_csv} is not a sampling manifest (samples.csv): no {sorted(missing)} column")
    vols = []
    for row in progress(manifest.itertuples(), total=len(manifest), desc="load generated", unit="vol"):
        arr = to_model_layout(np.asarray(load_nifti(row.nifti).array[0]))  # (1, D, H, W) HU
        hu = torch.from_numpy(arr.astype(np.float32))
        vols.append({"key": str(row.prompt_id), "volume": hu_to_unit(hu, window), "hu": hu[0].numpy()})
    return manifest, vols


class SliceExtractor(torch.nn.Module):
    """2D features from a trained 3D encoder: a slice repeated through the encoder's depth stride.

    Used for FID when no InceptionV3 weights are configured: the network was trained on CT, which
    ImageNet's Inception was not, and it is available offline.
    """

    def __init__(self, features, depth: int):
        super().__init__()
        self.features, self.depth = features, depth

    def forward(self, slices: torch.Tensor) -> torch.Tensor:  # (B, 1, h, w) in [-1, 1]
        return self.features(slices[:, :, None].expand(-1, -1, self.depth, -1, -1))


def _slice_extractor(nets: FeatureNets, inception: str | None, window=None):
    if inception:
        from ctgen.metrics.inception import InceptionV3Features

        net = InceptionV3Features.from_path(inception)
        return lambda x: net(unit_to_hu(x, window))  # it windows HU itself
    net = nets.classifier
    return SliceExtractor(net.features, int(net.config.stem_stride[0])).eval()


def _nan_to_none(obj):
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not np.isfinite(obj) else float(obj)
    return obj


@torch.no_grad()
def evaluate_run(samples_csv, valid_manifests: list[str], clip_dir, classifier_dir, text: dict, out_dir,
                 cfg: dict[str, Any], window, classifier_cfg: dict | None = None, checkpoint_root=None) -> dict:
    """Every metric of one sampling run; writes metrics.json, per_volume.csv and hu_histograms.json.

    ``window``: the prep preset's HU window (its ``clip``), which maps HU to the networks' [-1, 1].
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest, gen = load_generated(samples_csv, window)
    real = load_volumes(valid_manifests, window, prompt=text.get("prompt"))
    by_key = {r["key"]: r for r in real}
    nets = load_feature_nets(clip_dir, classifier_dir)
    f_gen, f_real = extract_features(nets, gen), extract_features(nets, real)
    # 2D FID on axial, coronal, sagittal slices (2.5D: reported separately and averaged)
    extractor = _slice_extractor(nets, cfg.get("inception_weights"), window)
    n = cfg.get("slices_per_volume")
    fid = fid_from_features(slice_features([r["volume"] for r in real], extractor, n_slices=n),
                            slice_features([g["volume"] for g in gen], extractor, n_slices=n))
    fvd = {"clip": frechet_3d(f_real["clip_features"], f_gen["clip_features"]),
           "classifier": frechet_3d(f_real["classifier_features"], f_gen["classifier_features"])}
    # CLIP score: generated volume vs its prompt; ceiling: the real volume of that report vs the same prompt
    prompts = {str(r.prompt_id): r.prompt for r in manifest.itertuples()}
    prompts.update({k: by_key[k]["prompt"] for k in by_key if k not in prompts})
    cond = TextConditioning(prompts, cache_path=text.get("text_cache"), tokenizer_path=text.get("text_tokenizer"),
                            max_length=text.get("max_length", 128))
    keys = [g["key"] for g in gen]
    text_emb = embed_texts(nets.clip, cond, keys)
    paired = [k in by_key for k in keys]
    real_idx = {r["key"]: i for i, r in enumerate(real)}
    real_emb = np.stack([f_real["clip_embedding"][real_idx[k]] if k in real_idx else np.full_like(text_emb[0], np.nan)
                         for k in keys])
    cs_gen = clip_score(f_gen["clip_embedding"], text_emb)
    cs_real = clip_score(real_emb, text_emb)
    sim = image_similarity(f_gen["clip_embedding"], real_emb)
    # faithfulness: the classifier on generated volumes against the labels of their prompts' reports
    labels_gen = np.stack([by_key[k]["labels"] if k in by_key else np.full(len(LABELS), np.nan) for k in keys])
    labels_real = np.stack([r["labels"] for r in real])
    faith = {"generated": auroc_per_label(f_gen["probabilities"], labels_gen, LABELS),
             "real": auroc_per_label(f_real["probabilities"], labels_real, LABELS)}
    tstr = None
    if cfg.get("tstr") and classifier_cfg is not None:
        tstr = _train_on_synthetic(gen, labels_gen, real, f_real["probabilities"], labels_real, classifier_cfg,
                                   out_dir, checkpoint_root or out_dir / "checkpoints")
    # HU: per-tissue medians against the real range; histograms
    real_hu = [unit_to_hu(r["volume"][0], window).numpy() for r in real]  # (D, H, W) each
    real_stats = [tissue_stats(v) for v in real_hu]
    rows, flags = [], []
    for i, (g, row) in enumerate(zip(gen, manifest.itertuples())):
        stats = tissue_stats(g["hu"])
        f = flag_out_of_range(stats, real_stats, cfg.get("hu_tolerance", 20.0))
        flags += [{"sample": row.nifti, **x} for x in f]
        rows.append({"sample": row.nifti, "prompt_id": row.prompt_id, "seed": row.seed, "clip_score": cs_gen[i],
                     "clip_score_real": cs_real[i], "image_similarity": sim[i],
                     **{f"hu_{t}_median": stats[t]["median"] for t in TISSUES}, "n_hu_flags": len(f)})
    per_volume = pd.DataFrame(rows)
    per_volume.to_csv(out_dir / "per_volume.csv", index=False)
    edges = None
    dens = {}
    for name, vols in (("generated", [g["hu"] for g in gen]), ("real", real_hu)):
        hists = [hu_histogram(v) for v in vols]
        edges = hists[0][1]
        dens[name] = np.mean([h[0] for h in hists], axis=0).tolist()
    (out_dir / "hu_histograms.json").write_text(json.dumps({"edges": np.asarray(edges).tolist(), **dens}))
    from ctgen.models.base import provenance

    metrics = _nan_to_none({
        "n_generated": len(gen), "n_real": len(real), "n_paired": int(sum(paired)),
        "fid_2d": fid, "fvd": fvd,
        "clip_score": {"generated": float(np.nanmean(cs_gen)), "real": float(np.nanmean(cs_real))},
        "image_similarity": float(np.nanmean(sim)), "faithfulness": faith, "tstr": tstr, "hu_flags": flags,
        "feature_networks": {"clip": str(clip_dir), "classifier": str(classifier_dir),
                             "fid_2d": cfg.get("inception_weights") or "classifier (3D CT network, slices repeated)"},
        "provenance": provenance(),
    })
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("FID mean %.4g, FVD(clip) %.4g, CLIP score %.1f (real %.1f), macro AUROC gen %s / real %s",
             fid["mean"], fvd["clip"], metrics["clip_score"]["generated"], metrics["clip_score"]["real"],
             faith["generated"].get("macro"), faith["real"].get("macro"))
    return metrics


def _train_on_synthetic(gen, labels_gen, real, probs_real_trained, labels_real, classifier_cfg, out_dir, ckpt):
    """Train-on-synthetic, test-on-real: the classifier recipe on generated volumes, scored on the real ones."""
    from ctgen.jobs.train import train_classifier
    from ctgen.models.classifier3d import Classifier3D

    keep = ~np.isnan(labels_gen).any(axis=1)
    vols = [{"key": g["key"] + f"_{i}", "volume": g["volume"], "labels": torch.as_tensor(labels_gen[i], dtype=torch.float32)}
            for i, g in enumerate(gen) if keep[i]]
    cfg = json.loads(json.dumps(classifier_cfg))
    cfg["train"]["batch_size"] = min(cfg["train"]["batch_size"], len(vols))
    with torch.enable_grad():  # the rest of the evaluation runs under no_grad
        folder = train_classifier(cfg, out_dir / "tstr_classifier", ckpt, volumes=vols)
    synth = Classifier3D.from_pretrained(folder).eval()
    probs_synth = extract_features(FeatureNets(classifier=synth), real)["probabilities"]
    return tstr_summary(probs_real_trained, probs_synth, labels_real, LABELS)


METRICS = ("clip_score", "image_similarity")


def compare_runs(a_csv, b_csv, out_csv=None, n_permutations: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """Paired permutation test per metric between two runs' per-volume rows (paired by prompt and repeat order)."""
    a, b = pd.read_csv(a_csv), pd.read_csv(b_csv)
    key = ["prompt_id"]
    for path, table in ((a_csv, a), (b_csv, b)):
        missing = sorted({*key, *METRICS} - set(table.columns))
        if missing:
            raise UserError(f"{path} is not an evaluation's per_volume.csv: no {missing} column")
    a = a.assign(_n=a.groupby(key).cumcount())
    b = b.assign(_n=b.groupby(key).cumcount())
    m = a.merge(b, on=[*key, "_n"], suffixes=("_a", "_b"))
    if m.empty:
        raise ValueError("the two runs share no prompts: nothing to pair")
    rows = []
    for metric in METRICS:
        res = paired_permutation_test(m[f"{metric}_a"].to_numpy(float), m[f"{metric}_b"].to_numpy(float),
                                      n_permutations=n_permutations, seed=seed)
        rows.append({"metric": metric, "n_pairs": len(m), "mean_a": m[f"{metric}_a"].mean(),
                     "mean_b": m[f"{metric}_b"].mean(), **res})
    out = pd.DataFrame(rows)
    if out_csv:
        out.to_csv(out_csv, index=False)
    return out


@torch.no_grad()
def guidance_sweep(models_dir, prompts_csv, scales: list[float], sampling: dict, clip_dir, classifier_dir,
                   valid_manifests: list[str], text: dict, out_csv, window,
                   slices_per_volume: int | None = None) -> pd.DataFrame:
    """Guidance scale against CLIP score and axial FID: the same prompts and seeds at every scale."""
    from ctgen.pipelines.text_to_ct import SampleSettings, TextToCTPipeline

    prompts = pd.read_csv(prompts_csv)
    pipe = TextToCTPipeline.from_pretrained(models_dir)
    nets = load_feature_nets(clip_dir, classifier_dir)
    real = load_volumes(valid_manifests, window, prompt=text.get("prompt"))
    extractor = _slice_extractor(nets, None)
    real_axial = slice_features([r["volume"] for r in real], extractor, planes=("axial",), n_slices=slices_per_volume)
    cond = TextConditioning(dict(zip(prompts["id"], prompts["prompt"])), cache_path=text.get("text_cache"),
                            tokenizer_path=text.get("text_tokenizer"), max_length=text.get("max_length", 128))
    text_emb = embed_texts(nets.clip, cond, list(prompts["id"]))
    rows = []
    for scale in scales:
        settings = SampleSettings(steps=sampling["steps"], guidance_scale=float(scale), temperature=sampling["temperature"],
                                  sr_steps=sampling.get("sr_steps"), sr_batch_size=sampling["batch_size"],
                                  truncate_prompt=True)
        vols = []
        for i, prompt in enumerate(progress(prompts["prompt"], desc=f"guidance {scale:g}", unit="vol")):
            g = torch.Generator().manual_seed(sampling["seed"] + i)
            hu = torch.from_numpy(to_model_layout(pipe([prompt], settings, [g])[0].array[0]).astype(np.float32))
            vols.append({"volume": hu_to_unit(hu, window)})
        feats = extract_features(FeatureNets(clip=nets.clip), vols)
        fake_axial = slice_features([v["volume"] for v in vols], extractor, planes=("axial",), n_slices=slices_per_volume)
        rows.append({"guidance_scale": float(scale), "clip_score": float(np.mean(clip_score(feats["clip_embedding"], text_emb))),
                     "fid_axial": fid_from_features(real_axial, fake_axial)["axial"]})
        log.info("guidance %.2f: CLIP score %.2f, axial FID %.4g", scale, rows[-1]["clip_score"], rows[-1]["fid_axial"])
    out = pd.DataFrame(rows)
    out.to_csv(out_csv, index=False)
    return out
