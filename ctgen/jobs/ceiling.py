"""Where a generator family loses a finding: the faithfulness classifier on each stage of the family, applied to
real scans (the cascade's stages, or the latent flow family's autoencoder reconstruction: ``latent_ceiling``).

For each real evaluation scan (matched to the prompts' reports): the scan itself (the real ceiling that
``evaluate`` reports too), its low-res stage (in-plane area downsampling by ``lowres_scale``, back to the
full grid trilinearly), the tokenizer's reconstruction of that stage (encode -> decode, back trilinearly)
and that reconstruction after the super-resolution model with the report's prompt, which is what the
cascade would output for a generator that produced exactly the scan's tokens. The classifier's per-label
and macro AUROC at each stage (bootstrap CIs and the guards of ``evaluate``) say which stage loses a
finding: a drop from ``real`` to ``lowres`` is the grid, to ``reconstruction`` the tokenizer, to
``super_resolution`` the 2D super-resolution; what is left between ``super_resolution`` and the generated
volumes' AUROC (``evaluate``) is the generator's.

    ctgen cascade-ceiling --models results/models --prompts results/samples/prompts.csv \\
        --real results/shards/valid/manifest.json --out results/evaluation/cascade_ceiling.csv
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ctgen.data.layout import downsample, hu_to_unit
from ctgen.jobs.eval_config import EvalConfig
from ctgen.jobs.features import load_models_folder, volume_outputs
from ctgen.jobs.pairing import BadVolume, Grid, RealSet, read_labels
from ctgen.jobs.score import label_aurocs
from ctgen.metrics.summary import stems_hash
from ctprep.ctrate import LABELS, volume_key
from ctprep.errors import UserError, describe
from ctprep.logs import progress

log = logging.getLogger(__name__)

STAGES = ("real", "lowres", "reconstruction", "super_resolution")
LATENT_STAGES = ("real", "autoencoder")

StageFn = Callable[[torch.Tensor, str, int], Sequence[torch.Tensor]]  # (scan (1,1,D,H,W), stem, index) -> stages


def _prompts_table(path: str | Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """A prompts CSV (``id`` and ``prompt``, as the sample_prompts rule writes it), each needed cell filled."""
    try:
        table = pd.read_csv(path, dtype={"id": str}, keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise UserError(f"{path} is not a prompts CSV: {describe(err)}") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise UserError(f"{path} is not a prompts CSV (id, prompt): it has no {', '.join(missing)} column")
    for c in columns:
        blank = table.index[table[c].astype(str).str.strip() == ""]
        if len(blank):
            raise UserError(f"{path}:{int(blank[0]) + 2}: empty {c}")
    return table


@torch.no_grad()
def cascade_ceiling(models_dir: str | Path, prompts_csv: str | Path, reference: list[str], out_csv: str | Path,
                    settings: EvalConfig | dict | None = None, device: str | None = None, sr_steps: int | None = None,
                    seed: int = 0, labels: str | Path | None = None) -> pd.DataFrame:
    """Score each stage of the cascade on the real scans of the prompts' reports; write and return the table.

    ``labels``: a CT-RATE-style label table (as ``evaluate --labels``); default: the labels in the shards.
    """
    from ctgen.pipelines.text_to_ct import TextToCTPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    prompts = _prompts_table(prompts_csv, ("id", "prompt"))
    text = {volume_key(i): p for i, p in zip(prompts["id"], prompts["prompt"])}
    pipe = TextToCTPipeline.from_pretrained(models_dir, device=device)
    scale = int(pipe.spec["grid"]["lowres_scale"])

    def stages(x: torch.Tensor, stem: str, k: int) -> tuple[torch.Tensor, ...]:
        low = downsample(x, scale)  # (1, 1, D, h, w)
        recon = pipe.tokenizer.decode(pipe.tokenizer.encode(low), num_slices=x.shape[2])  # (1, 1, D, h, w)
        sr_text = pipe.encode_text(pipe.superres, [text[stem]])
        d = x.shape[2]
        high = pipe.superres.core.sample(recon[0].transpose(0, 1), sr_text["text"].expand(d, -1, -1),
                                         sr_text["text_mask"].expand(d, -1), steps=sr_steps,
                                         generator=torch.Generator(device=device).manual_seed(seed + k),
                                         batch_size=64).transpose(0, 1)[None]  # (1, 1, D, H, W)
        return x, _back(low, x), _back(recon, x), high

    return _stage_table(STAGES, stages, models_dir, set(text), reference, out_csv, settings, device, labels)


@torch.no_grad()
def latent_ceiling(models_dir: str | Path, prompts_csv: str | Path, reference: list[str], out_csv: str | Path,
                   settings: EvalConfig | dict | None = None, device: str | None = None,
                   labels: str | Path | None = None) -> pd.DataFrame:
    """The latent flow family's ceiling: the classifier on each real scan and on its autoencoder
    reconstruction (decoded posterior mean), which is what the family would output for a flow network
    that produced exactly the scan's latent. A drop from ``real`` to ``autoencoder`` is the autoencoder's;
    what is left between ``autoencoder`` and the generated volumes' AUROC (``evaluate``) is the flow network's."""
    from ctgen.models.autoencoder import MaisiAutoencoder
    from ctgen.pipelines.spec import load_network

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    stems = {volume_key(i) for i in _prompts_table(prompts_csv, ("id",))["id"]}
    if not (Path(models_dir) / "autoencoder" / "config.json").is_file():
        raise UserError(f"{models_dir}: the latent ceiling needs the trained autoencoder (autoencoder/)")
    ae = load_network(Path(models_dir) / "autoencoder", MaisiAutoencoder, torch.device(device), use_ema=False)  # as encode_latents

    def stages(x: torch.Tensor, stem: str, k: int) -> tuple[torch.Tensor, ...]:
        mu, _ = ae.encode(x)
        return x, _back(ae.decode(mu), x)

    return _stage_table(LATENT_STAGES, stages, models_dir, stems, reference, out_csv, settings, device, labels)


def _back(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``v`` trilinearly on ``like``'s grid (a stage made on a coarser grid; the same grid is left as it is)."""
    if v.shape[-3:] == like.shape[-3:]:
        return v
    return F.interpolate(v, size=like.shape[-3:], mode="trilinear", align_corners=False)


def _stage_table(names: Sequence[str], stages: StageFn, models_dir: str | Path, wanted: set[str],
                 reference: list[str], out_csv: str | Path, settings: EvalConfig | dict | None, device: str,
                 labels: str | Path | None) -> pd.DataFrame:
    """The classifier's per-label and macro AUROC on each stage of the ``wanted`` real scans (one row each)."""
    cfg = settings if isinstance(settings, EvalConfig) else EvalConfig.from_dict(settings)
    grid = Grid.from_models(models_dir)
    nets = load_models_folder(models_dir, device, window=grid.clip)
    if nets.classifier is None:
        raise UserError(f"{models_dir}: the ceiling needs the classifier")
    real = RealSet(reference)
    known = read_labels(labels) if labels else real.labels()
    missing = sorted(s for s in wanted if s not in known)
    if missing:
        raise UserError(f"no labels in the reference shards for {len(missing)} prompts (first: {missing[0]})")
    cols = [LABELS.index(n) for n in cfg.labels]
    probs: dict[str, list[np.ndarray]] = {s: [] for s in names}
    stems, ys = [], []
    for k, (stem, hu, _) in enumerate(progress(real.read(wanted, grid), total=len(wanted), desc="ceiling",
                                               unit="vol")):
        if isinstance(hu, BadVolume):
            raise UserError(f"the real scan {stem} cannot be read: {hu}")
        x = hu_to_unit(torch.from_numpy(hu), grid.clip).float().reshape(1, 1, *hu.shape[-3:]).to(device)  # (1,1,D,H,W)
        for name, v in zip(names, stages(x, stem, k), strict=True):
            probs[name].append(volume_outputs(nets, v.clamp(-1, 1))["probabilities"][0, cols])
        stems.append(stem)
        ys.append(known[stem][cols])
    unread = sorted(wanted - set(stems))
    if unread:  # never a table on fewer scans than the prompts name
        raise UserError(f"{len(unread)} prompted scans are not in the reference shards (first: {unread[0]})")
    y = np.stack(ys)
    # the scans' stems as groups, as evaluate's real ceiling: a CT-RATE patient's scans and reconstructions share
    # anatomy and labels, so the CIs resample patients (the same numbers as faithfulness.real)
    kw = {"stems": stems_hash(stems), "n_boot": cfg.bootstrap, "seed": cfg.seed, "groups": stems}
    rows = []
    for stage in names:
        for m in label_aurocs(np.stack(probs[stage]), y, cfg.labels, name=f"ceiling.{stage}",
                              min_positives=cfg.auroc_min_positives, min_negatives=cfg.auroc_min_negatives,
                              profile=nets.profiles["classifier"], **kw):
            rows.append({"stage": stage, **m.row()})
        macro = rows[-1]
        log.info("%s: macro AUROC %s [%s, %s] (n = %d)", stage, macro["value"], macro["ci_low"], macro["ci_high"],
                 macro["n"])
    out = pd.DataFrame(rows)
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(out_csv, index=False)
    return out
