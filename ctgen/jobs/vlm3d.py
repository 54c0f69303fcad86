"""``ctgen vlm3d-score``: score a folder of generated volumes against the real ones with the VLM3D 2026 protocols.

Predictions and ground truth are paired by case stem (a prediction without ground truth is an error; ground
truth nobody predicted is named and not scored). Each protocol runs on its published backbone where
``config.yaml: evaluation.vlm3d`` gives the local weights, else on a proxy network the caller passes in
(:func:`score_vlm3d`'s ``proxies``), else it is skipped and the output says why. Outputs in ``out_dir``:

* ``vlm3d.json``: every record (:class:`MetricValue`: value, n, CI, profile, flag), grouped by profile family,
  the pairing, the volumes whose values do not read as HU (``hu_problems``: normalised or raw stored values;
  where no prediction or no ground truth reads as HU the run stops with one line instead), the pairs left out
  because a volume is unreadable, holds NaN or has sheared voxel axes (``skipped_pairs``, ``n_skipped_pairs``;
  every record flagged), what was skipped and the settings;
* ``vlm3d_2026.csv`` and ``papers.csv``: one table per family (the SqueezeNet and RadImageNet 2.5D FIDs
  rank models differently and never share a table);
* ``leaderboard.json``: ``{"metrics": {"FVD_CTNet": ..., ...}}`` as the challenge writes it, published
  backbones only (absent when every protocol ran on a proxy); where a record is flagged (``num_images`` other
  than 100, pairs skipped, too few volumes, ...), ``"flags": {"FID_2p5D_Avg": "<its flag>", ...}`` beside it;
* ``clip_per_volume.csv``: the per-volume CLIP scores.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ctgen.metrics.summary import MetricValue, join_flags
from ctgen.training.distributed import device_option
from ctgen.metrics.vlm3d import (
    CHALLENGE,
    PAPERS,
    Extractor,
    Fid25dSettings,
    ctclip_scores,
    fid_25d,
    fvd_ctnet,
    pair_volumes,
    read_prompts_json,
)
from ctgen.metrics.vlm3d.contract import check_pairs
from ctgen.metrics.vlm3d.geometry import CLIP_SHAPE, CLIP_SPACING, FID_SHAPE, FID_SPACING, FVD_SHAPE
from ctprep.errors import UserError, positive_int
from ctprep.volume import atomic_write_bytes

log = logging.getLogger(__name__)

#: evaluation.vlm3d keys and their defaults (config.yaml documents each)
DEFAULTS: dict[str, Any] = {"ctnet_weights": None, "ctclip_weights": None, "cxr_bert": None, "squeezenet_weights": None,
                            "radimagenet_weights": None, "num_images": 100, "fid_bootstrap": 200}
#: proxy roles a caller may fill: FVD volumes, CLIP image and text sides, 2.5D FID slices
ROLES = ("fvd", "clip_image", "clip_text", "fid")


def vlm3d_settings(cfg: Mapping | None) -> dict[str, Any]:
    """evaluation.vlm3d with defaults filled in; an unknown key or a bad value is a user error naming the key.

    Checked here, before any volume is read, as the CLI options are: a count from config.yaml that is not a
    positive integer used to fail after every feature was computed (``fid_bootstrap: 0``), or silently
    (``num_images: -2`` dropped the last two pairs).
    """
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise UserError(f"evaluation.vlm3d: unknown key(s) {unknown}; known: {sorted(DEFAULTS)}")
    for key, value in cfg.items():
        if isinstance(DEFAULTS[key], int):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"evaluation.vlm3d.{key}: not a positive integer: {value!r}")
        elif value is not None and not isinstance(value, (str, os.PathLike)):
            raise UserError(f"evaluation.vlm3d.{key}: not a path: {value!r}")
    return {**DEFAULTS, **cfg}


def build_extractors(cfg: Mapping, proxies: Mapping[str, Extractor] | None = None,
                     device: str = "cpu") -> tuple[dict[str, Extractor], dict[str, str]]:
    """({role: extractor}, {role: why it is missing}) from the configured weights, else the proxies.

    Roles: ``fvd``, ``clip_image``, ``clip_text``, ``fid`` (SqueezeNet) and ``fid_papers`` (RadImageNet,
    weights only: a proxy of it would be the ``fid`` proxy again).
    """
    from ctgen.models.backbones import CTCLIP, CTNet, RadImageNetResNet50, SqueezeNet11

    proxies = dict(proxies or {})
    bad = sorted(set(proxies) - set(ROLES))
    if bad:
        raise ValueError(f"unknown proxy roles {bad}; roles: {list(ROLES)}")
    for role, ex in proxies.items():
        if not ex.proxy:
            raise ValueError(f"the {role} proxy {ex.description!r} must be marked proxy=True")
    out: dict[str, Extractor] = {}
    if cfg.get("ctnet_weights"):
        out["fvd"] = Extractor(CTNet.from_path(cfg["ctnet_weights"]).to(device), "ctnet")
    if cfg.get("ctclip_weights"):
        clip = CTCLIP.from_paths(cfg["ctclip_weights"], cfg.get("cxr_bert")).to(device)
        out["clip_image"] = Extractor(clip.encode_image, "ct-clip-v2")
        if cfg.get("cxr_bert"):
            out["clip_text"] = Extractor(clip.encode_text, "ct-clip-v2")
    if cfg.get("squeezenet_weights"):
        out["fid"] = Extractor(SqueezeNet11.from_path(cfg["squeezenet_weights"]).to(device), "squeezenet1.1")
    if cfg.get("radimagenet_weights"):
        out["fid_papers"] = Extractor(RadImageNetResNet50.from_path(cfg["radimagenet_weights"]).to(device),
                                      "radimagenet-resnet50")
    for role in ROLES:
        if role not in out and role in proxies:
            out[role] = proxies[role]
    why = {}
    for role, key in (("fvd", "ctnet_weights"), ("clip_image", "ctclip_weights"), ("clip_text", "cxr_bert"),
                      ("fid", "squeezenet_weights"), ("fid_papers", "radimagenet_weights")):
        if role not in out:
            why[role] = f"no evaluation.vlm3d.{key}" + ("" if role == "fid_papers" else " and no proxy network")
    return out, why


def _reports(reports) -> dict[str, str] | None:
    if reports is None or isinstance(reports, Mapping):
        return None if reports is None else dict(reports)
    return dict(read_prompts_json(reports))


def score_vlm3d(generated_dir: str | os.PathLike, real_dir: str | os.PathLike, reports=None,
                cfg: Mapping | None = None, proxies: Mapping[str, Extractor] | None = None,
                out_dir: str | os.PathLike | None = None, device: str = "cpu",
                grids: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run every protocol that has a backbone or a proxy; write the outputs (module doc) and return the summary.

    ``reports``: the ``prompts.json`` the volumes were generated from (or {stem: report}); without it the
    CLIP image-text score is skipped. ``cfg``: ``evaluation.vlm3d``. ``proxies``: {role: Extractor} of our
    networks (:mod:`ctgen.metrics.vlm3d.proxies`), used where no weights are configured. ``grids``: smaller
    protocol grids for quick proxy runs (``fvd_shape``, ``clip_spacing``, ``clip_shape``, ``fid_spacing``,
    ``fid_shape``); every record computed on another grid than the challenge's says so in its flag.
    """
    grids = dict(grids or {})
    unknown = sorted(set(grids) - {"fvd_shape", "clip_spacing", "clip_shape", "fid_spacing", "fid_shape"})
    if unknown:
        raise ValueError(f"unknown grid keys {unknown}")
    cfg = vlm3d_settings(cfg)
    pairing = pair_volumes(generated_dir, real_dir)
    texts = _reports(reports)
    extractors, skipped = build_extractors(cfg, proxies, device)
    if not any(r in extractors for r in ("fvd", "clip_image", "fid", "fid_papers")):
        raise UserError("nothing to score: no backbone weights in evaluation.vlm3d (ctnet_weights, ctclip_weights, "
                        "squeezenet_weights, radimagenet_weights) and no proxy networks")
    pairs, problems, unusable = _check_volumes(list(pairing.pairs))
    records: list[MetricValue] = []
    per_volume = None
    if "fvd" in extractors:
        records.append(fvd_ctnet(pairs, extractors["fvd"], shape=grids.get("fvd_shape", FVD_SHAPE), device=device))
    if "clip_image" in extractors:
        text = extractors.get("clip_text") if texts is not None else None
        if texts is None:
            skipped["clip_text"] = "no reports (prompts.json) given"
        clip_records, per_volume = ctclip_scores(pairs, extractors["clip_image"], text, texts,
                                                 grids.get("clip_spacing", CLIP_SPACING),
                                                 grids.get("clip_shape", CLIP_SHAPE), device=device)
        records += clip_records
    settings = Fid25dSettings(spacing=tuple(grids.get("fid_spacing", FID_SPACING)),
                              shape=tuple(grids.get("fid_shape", FID_SHAPE)), num_images=int(cfg["num_images"]),
                              n_bootstrap=int(cfg["fid_bootstrap"]))
    if "fid" in extractors:
        records += fid_25d(pairs, extractors["fid"], settings, device=device)
    if "fid_papers" in extractors:
        records += fid_25d(pairs, extractors["fid_papers"], settings, prefix=PAPERS, base_name="fid_2p5d_radimagenet",
                           device=device)
    notes = []
    if problems:  # scored all the same (a few bad volumes need not void a run), but no number hides it
        notes.append(f"{len(problems)} of {len(pairs)} pairs hold a volume whose values do not read as HU (hu_problems)")
    if unusable:
        notes.append(f"{len(unusable)} of {len(pairing.pairs)} pairs not scored: an unreadable, NaN or sheared "
                     "volume (skipped_pairs)")
    if notes:
        records = [dataclasses.replace(r, flag=join_flags(r.flag, *notes)) for r in records]
    summary = {
        "generated_dir": str(generated_dir), "real_dir": str(real_dir), "n_pairs": len(pairs),
        "stems": [p.stem for p in pairs], "real_without_prediction": list(pairing.real_without_prediction),
        "hu_problems": problems, "skipped_pairs": unusable, "n_skipped_pairs": len(unusable),
        "skipped": skipped, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.items()},
        "records": {family: [r.to_json() for r in records if r.profile.split(":")[0] == family]
                    for family in (CHALLENGE, PAPERS)},
    }
    published = [r for r in records if r.profile.startswith(CHALLENGE) and ":proxy:" not in r.profile
                 and r.extra.get("official_key")]
    official = {"metrics": {r.extra["official_key"]: r.value for r in published}}
    flags = {r.extra["official_key"]: r.flag for r in published if r.flag}
    if flags:  # a number that is not quite the challenge's (num_images, skipped pairs, few volumes) says so here too
        official["flags"] = flags
    if out_dir is not None:
        _write(Path(out_dir), summary, records, official if published else None, per_volume)
    return summary


def _check_volumes(pairs: list) -> tuple[list, dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """(the pairs to score, {stem: {side: why not HU}}, {stem: {side: why unusable}}).

    Every volume is read once before scoring (:func:`~ctgen.metrics.vlm3d.contract.check_pairs`): a broken file
    (corrupt, truncated, not 3D, NaN voxels) or a sheared affine (stopped the 2.5D FID after FVD and CLIP were
    done) used to stop the whole run in the middle of a protocol, with a traceback for a bad gzip stream; now its
    pair is left out, named and counted, and the rest is scored. No usable pair, or a side where no volume reads
    as HU, is a user error (one line, the first case named); single volumes are logged.
    """
    problems, unusable = check_pairs(pairs)
    problems = {s: w for s, w in problems.items() if s not in unusable}  # a pair left out is not scored: not counted
    for stem, why in unusable.items():
        log.warning("pair %s not scored: %s", stem, "; ".join(f"{side} {w}" for side, w in why.items()))
    usable = [p for p in pairs if p.stem not in unusable]
    if not usable:
        stem = next(iter(unusable))
        side, why = next(iter(unusable[stem].items()))
        raise UserError(f"no pair can be scored: each of the {len(pairs)} holds an unreadable volume; "
                        f"{stem} ({side}): {why}")
    for side in ("generated", "real"):
        bad = [stem for stem, why in problems.items() if side in why]
        if bad and len(bad) == len(usable):
            raise UserError(f"no {side} volume reads as HU ({len(bad)} of {len(usable)}); {bad[0]}: "
                            f"{problems[bad[0]][side]}")
        for stem in bad:
            log.warning("%s volume %s: %s; scored, and every record is flagged", side, stem, problems[stem][side])
    return usable, problems, unusable


def _write(out: Path, summary: dict, records: list[MetricValue], official: dict | None, per_volume) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "vlm3d.json", json.dumps(summary, indent=2).encode())
    for family, name in ((CHALLENGE, "vlm3d_2026.csv"), (PAPERS, "papers.csv")):
        rows = [_row(r) for r in records if r.profile.split(":")[0] == family]
        if rows:
            atomic_write_bytes(out / name, pd.DataFrame(rows).to_csv(index=False).encode())
    if official:
        atomic_write_bytes(out / "leaderboard.json", json.dumps(official, indent=2).encode())
    if per_volume:
        atomic_write_bytes(out / "clip_per_volume.csv", pd.DataFrame(per_volume).to_csv(index=False).encode())
    log.info("wrote %s", out / "vlm3d.json")


def _row(r: MetricValue) -> dict:
    """One table row: the record's fields with the CI as two columns and the leaderboard key."""
    return {**r.row(), "official_key": r.extra.get("official_key")}


def vlm3d_score_main(argv: list[str] | None = None) -> int:
    """``ctgen vlm3d-score``: the published backbones from config/options; proxies are the Python API's."""
    import argparse

    import yaml

    ap = argparse.ArgumentParser(prog="ctgen vlm3d-score",
                                 description="score generated CTs with the VLM3D 2026 protocols (local weights only)")
    ap.add_argument("--generated", required=True, help="folder of generated volumes (<case>.nii.gz)")
    ap.add_argument("--real", required=True, help="folder of the real volumes, same case stems")
    ap.add_argument("--prompts", help="the prompts.json the volumes were generated from (for the image-text score)")
    ap.add_argument("--config", help="config.yaml whose evaluation.vlm3d gives the weights and settings")
    for key in DEFAULTS:
        ap.add_argument(f"--{key.replace('_', '-')}", dest=key, help=f"overrides evaluation.vlm3d.{key}",
                        type=positive_int if isinstance(DEFAULTS[key], int) else None)
    ap.add_argument("--out", required=True, help="output folder (vlm3d.json, vlm3d_2026.csv, papers.csv, ...)")
    ap.add_argument("--device", default=None, type=device_option, help="torch device (default: cuda when available, else cpu)")
    args = ap.parse_args(argv)
    cfg: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UserError(f"--config: {path} does not exist")
        whole = yaml.safe_load(path.read_text()) or {}
        evaluation = (whole.get("evaluation") or {}) if isinstance(whole, dict) else None
        section = (evaluation.get("vlm3d") or {}) if isinstance(evaluation, dict) else None
        if not isinstance(section, dict):
            raise UserError(f"--config: {path} is not a config.yaml with an evaluation.vlm3d mapping")
        cfg = dict(section)
    cfg.update({key: getattr(args, key) for key in DEFAULTS if getattr(args, key) is not None})
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    summary = score_vlm3d(args.generated, args.real, args.prompts, cfg, out_dir=args.out, device=device)
    for family, recs in summary["records"].items():
        for r in recs:
            ci = f" [{r['ci'][0]:.4g}, {r['ci'][1]:.4g}]" if r["ci"] else ""
            value = "undefined" if r["value"] is None else f"{r['value']:.4g}"
            log.info("%s %s = %s%s (n=%d)%s", r["profile"], r["name"], value, ci, r["n"],
                     f" -- {r['flag']}" if r["flag"] else "")
    return 0
