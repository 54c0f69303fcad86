"""Figures of a run for the Snakemake report: PNGs drawn with matplotlib's Agg canvas.

One pure function per figure: inputs are paths or plain data, the output is one PNG. Figures are
drawn on ``matplotlib.figure.Figure`` objects (never pyplot), so no global backend state is touched
and every PNG is exactly ``WIDTH_IN * dpi`` pixels wide (no tight bounding box).

Slices are shown in the radiological convention: axial with anterior up and the patient's right
on the viewer's left; coronal and sagittal with superior up (sagittal: anterior on the left).
Voxel spacing sets the aspect ratio, so generated and real scans of different grids compare in mm.
"""

from __future__ import annotations

import json
import logging
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ctgen.data.layout import to_model_layout
from ctgen.data.shards import iter_samples
from ctgen.jobs.figure_list import FIGURES
from ctgen.metrics.hu import TISSUES
from ctprep.volume import load_nifti

logger = logging.getLogger(__name__)

WIDTH_IN = 12.0  # width of every figure in inches; pixels = WIDTH_IN * dpi
WINDOWS = {"lung": (-1350.0, 150.0), "mediastinum": (-160.0, 240.0)}  # HU (low, high) display windows
PLANES = ("axial", "coronal", "sagittal")
MODELS = ("tokenizer", "generator", "superres", "clip", "classifier")
# the logged term worth plotting beside the loss, first match wins, per model
KEY_TERMS = {
    "tokenizer": ("recon_loss", "perplexity", "codebook_usage"),
    "generator": ("accuracy_masked",),
    "superres": ("x0_mse",),
    "clip": ("accuracy_i2t", "accuracy_t2i"),
    "classifier": ("accuracy", "positive_rate"),
}
_NOT_TERMS = {"step", "epoch", "lr", "loss", "grad_norm", "steps_per_s", "samples_per_s", "elapsed_s"}
TISSUE_COLOURS = {"air": "#dddddd", "lung": "#a6cee3", "fat": "#fdbf6f", "soft_tissue": "#fb9a99", "bone": "#b2df8a"}


@dataclass(frozen=True)
class FigureConfig:
    """The workflow's ``figures:`` config block (plain data in config.yaml)."""

    prompts: tuple[str, ...] = ()  # prompt_ids for the slice figure; empty: the first max_prompts in samples.csv
    max_prompts: int = 4  # at most this many prompts in the slice figure (a block of rows each)
    window: str = "both"  # HU window of the slices: lung, mediastinum or both (one row each per prompt)
    dpi: int = 120  # resolution of every PNG

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts or ()))
        if self.window not in (*WINDOWS, "both"):
            raise ValueError(f"figures.window must be lung, mediastinum or both, got {self.window!r}")
        if not 1 <= self.max_prompts <= 8 or self.dpi < 30:
            raise ValueError(f"figures: need 1 <= max_prompts <= 8 and dpi >= 30, got {self}")

    @classmethod
    def from_dict(cls, d: Mapping | None) -> FigureConfig:
        """Build from config.yaml's dict; unknown keys are an error (a typo would pass silently)."""
        d = dict(d or {})
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown figures config keys: {sorted(unknown)}")
        return cls(**d)

    @property
    def windows(self) -> tuple[str, ...]:
        return tuple(WINDOWS) if self.window == "both" else (self.window,)


def _new_figure(height_in: float) -> Figure:
    fig = Figure(figsize=(WIDTH_IN, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_png: str | Path, dpi: int) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=dpi, facecolor="white")
    logger.info("wrote %s", out)
    return out


# --- (1) generated vs real slices ---------------------------------------------------------------
def mid_slices(volume_dhw: np.ndarray, spacing_whd: Sequence[float]) -> dict[str, tuple[np.ndarray, tuple]]:
    """(D, H, W) volume and voxel spacing (W, H, D) in mm -> {plane: (2D image, imshow extent in mm)}
    of the middle slices, in display orientation (see the module docstring)."""
    d, h, w = volume_dhw.shape
    sw, sh, sd = (float(s) for s in spacing_whd)
    axial = volume_dhw[d // 2][::-1, ::-1]  # (H, W): anterior up, patient's right on the left
    coronal = volume_dhw[:, h // 2, :][::-1, ::-1]  # (D, W): superior up, patient's right on the left
    sagittal = volume_dhw[:, :, w // 2][::-1, ::-1]  # (D, H): superior up, anterior on the left
    return {
        "axial": (axial, (0, w * sw, 0, h * sh)),
        "coronal": (coronal, (0, w * sw, 0, d * sd)),
        "sagittal": (sagittal, (0, h * sh, 0, d * sd)),
    }


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))  # (i, j, k) = (W, H, D)


def _resolve(path: str, base: Path) -> Path:
    """Paths in samples.csv are relative to the workflow's working directory; fall back to the
    folder holding ``results/`` so that a results tree moved elsewhere still draws."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    for parent in base.parents:
        if (parent / p).exists():
            return parent / p
    return p


def choose_prompts(samples: pd.DataFrame, cfg: FigureConfig) -> list[str]:
    """The prompt_ids to draw: the configured ones (those that were sampled), else the first ones."""
    ids = list(dict.fromkeys(samples["prompt_id"].astype(str)))
    if cfg.prompts:
        missing = [p for p in cfg.prompts if p not in ids]
        if missing:
            logger.warning("figures.prompts not among the samples, skipped: %s", missing)
        ids = [p for p in cfg.prompts if p in ids]
    if not ids:
        raise ValueError("no sampled prompt to draw (samples.csv empty or figures.prompts all unknown)")
    return ids[: cfg.max_prompts]


def plot_samples(samples_csv, valid_manifest, out_png, cfg: FigureConfig = FigureConfig()) -> Path:
    """Per chosen prompt, generated axial/coronal/sagittal mid slices beside the real scan of the
    same report (first repeat of each prompt), one row per HU window, the prompt as the title."""
    samples = pd.read_csv(samples_csv, dtype={"prompt_id": str})
    chosen = choose_prompts(samples, cfg)
    real = {}  # key -> sample, only the chosen volumes are kept (a full-size scan is ~150 MB)
    for s in iter_samples(valid_manifest):
        if s["key"] in chosen:
            real[s["key"]] = s
            if len(real) == len(chosen):
                break
    windows = cfg.windows
    n_rows = len(chosen) * len(windows)
    fig = _new_figure(0.5 + len(chosen) * 0.5 + n_rows * 1.9)
    for sub, pid in zip(np.atleast_1d(fig.subfigures(len(chosen), 1)), chosen):
        row = samples[samples["prompt_id"] == pid].sort_values("repeat").iloc[0]
        vol = load_nifti(_resolve(row["nifti"], Path(samples_csv).resolve()))
        panels = {"generated": mid_slices(to_model_layout(vol.array[0])[0], vol.spacing)}
        if pid in real:
            r = real[pid]
            panels["real"] = mid_slices(to_model_layout(r["volume"])[0], _spacing(r["affine"]))
        else:
            logger.warning("no real scan with key %s in %s", pid, valid_manifest)
        title = textwrap.shorten(str(row["prompt"]), width=330, placeholder=" ...")
        sub.suptitle(f"{pid} (seed {row['seed']}): " + "\n".join(textwrap.wrap(title, 110)), fontsize=9)
        axes = np.atleast_2d(sub.subplots(len(windows), 2 * len(PLANES)))
        for wi, window in enumerate(windows):
            for ci, (source, plane) in enumerate((s, p) for s in ("generated", "real") for p in PLANES):
                ax = axes[wi, ci]
                ax.set_xticks([]), ax.set_yticks([])
                if wi == 0:
                    ax.set_title(f"{source} {plane}", fontsize=9)
                if ci == 0:
                    ax.set_ylabel(f"{window}\n[{WINDOWS[window][0]:.0f}, {WINDOWS[window][1]:.0f}] HU", fontsize=8)
                if source not in panels:
                    ax.text(0.5, 0.5, "no real scan", ha="center", va="center", transform=ax.transAxes)
                    continue
                img, extent = panels[source][plane]
                lo, hi = WINDOWS[window]
                ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, extent=extent, interpolation="nearest")
    return _save(fig, out_png, cfg.dpi)


# --- (2) training curves ------------------------------------------------------------------------
def key_term(model: str, metrics: pd.DataFrame) -> str | None:
    """The logged term plotted beside a model's loss (KEY_TERMS, else the first other numeric one)."""
    for name in KEY_TERMS.get(model, ()):
        if name in metrics and metrics[name].notna().any():
            return name
    others = [c for c in metrics.select_dtypes("number") if c not in _NOT_TERMS and metrics[c].notna().any()]
    return others[0] if others else None


def _log_if_wide(ax, values: pd.Series) -> None:
    v = values.dropna()
    if len(v) and (v > 0).all() and v.max() / v.min() > 10:
        ax.set_yscale("log")


def plot_training_curves(metrics_csvs: Mapping[str, str | Path], out_png, dpi: int = 120) -> Path:
    """One panel per model: loss (left axis, log scale when it spans a decade) and its key term
    (right axis) against the step."""
    n = len(metrics_csvs)
    ncols = 2 if n > 1 else 1
    nrows = math.ceil(n / ncols)
    fig = _new_figure(0.3 + 3.0 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for ax, (model, path) in zip(axes, metrics_csvs.items()):
        m = pd.read_csv(path)
        if m.empty or "loss" not in m:
            raise ValueError(f"{path}: no loss rows to plot")
        ax.plot(m["step"], m["loss"], color="C0", label="loss")
        _log_if_wide(ax, m["loss"])
        ax.set(title=model, xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
        term = key_term(model, m)
        if term is not None:
            ax2 = ax.twinx()
            ax2.plot(m["step"], m[term], color="C1", label=term)
            _log_if_wide(ax2, m[term])
            ax2.set_ylabel(term, color="C1")
            ax.legend(handles=ax.lines + ax2.lines, fontsize=8, loc="upper right")
    for ax in axes[n:]:
        ax.set_visible(False)
    return _save(fig, out_png, dpi)


# --- (3) metric tables --------------------------------------------------------------------------
def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    return f"{float(x):.4g}"


def _table(ax, header: Sequence[str], rows: list[list[str]], title: str, bold_last: bool = False) -> None:
    ax.axis("off")
    ax.set_title(title, fontsize=11, loc="left")
    t = ax.table(cellText=rows, colLabels=list(header), loc="upper center", cellLoc="center")
    t.auto_set_font_size(False)
    t.set_fontsize(9)
    t.scale(1.0, 1.3)
    for (r, c), cell in t.get_celld().items():
        if r == 0 or (bold_last and r == len(rows)):
            cell.set_text_props(weight="bold")
        if r == 0:
            cell.set_facecolor("#e8e8e8")


def _table_figure(sections: list[tuple[Sequence[str], list[list[str]], str, bool]], out_png, dpi: int,
                  footer: str = "") -> Path:
    heights = [0.7 + 0.3 * max(len(rows), 1) for _, rows, _, _ in sections]
    fig = _new_figure(sum(heights) + (0.4 if footer else 0.1))
    axes = np.atleast_1d(fig.subplots(len(sections), 1, height_ratios=heights))
    for ax, (header, rows, title, bold_last) in zip(axes, sections):
        _table(ax, header, rows or [["n/a"] * len(header)], title, bold_last)
    if footer:
        fig.text(0.01, 0.005, footer, fontsize=7, color="#555555", va="bottom")
    return _save(fig, out_png, dpi)


def plot_metrics_summary(metrics_json, out_png, dpi: int = 120) -> Path:
    """The headline metrics (FID per plane, FVD per feature net, CLIP score generated vs real,
    image similarity) as a table, with the HU flags listed below it."""
    m = json.loads(Path(metrics_json).read_text())
    fid, fvd, clip = m.get("fid_2d") or {}, m.get("fvd") or {}, m.get("clip_score") or {}
    rows = [["volumes", _fmt(m.get("n_generated")), _fmt(m.get("n_real"))]]
    rows += [[f"FID 2D {p} (lower is better)", _fmt(fid.get(p)), "-"] for p in (*PLANES, "mean")]
    rows += [[f"FVD, {net} features (lower is better)", _fmt(v), "-"] for net, v in fvd.items()]
    rows += [["CLIP score (higher is better)", _fmt(clip.get("generated")), _fmt(clip.get("real"))],
             ["image similarity to the real scan", _fmt(m.get("image_similarity")), "-"],
             ["HU flags", _fmt(len(m.get("hu_flags") or [])), "-"]]
    sections = [(["metric", "generated", "real (ceiling)"], rows, "Evaluation metrics", False)]
    flags = m.get("hu_flags") or []
    if flags:
        frows = [[str(f.get("sample")), str(f.get("tissue")), _fmt(f.get("value")),
                  f"[{_fmt(f.get('low'))}, {_fmt(f.get('high'))}]", textwrap.shorten(str(f.get("reason")), 50)]
                 for f in flags[:12]]
        title = f"HU flags ({len(flags)}{', first 12' if len(flags) > 12 else ''})"
        sections.append((["sample", "tissue", "value (HU)", "real range", "reason"], frows, title, False))
    prov = m.get("provenance") or {}
    footer = "; ".join(f"{k}: {v}" for k, v in prov.items() if isinstance(v, (str, int, float)))
    return _table_figure(sections, out_png, dpi, textwrap.shorten(footer, 200))


def plot_faithfulness(metrics_json, out_png, dpi: int = 120) -> Path:
    """The classifier's AUROC per abnormality label on generated volumes (against their prompts'
    labels) beside its AUROC on the real volumes; n/a where a label has one class only."""
    faith = json.loads(Path(metrics_json).read_text()).get("faithfulness") or {}
    gen, real = faith.get("generated") or {}, faith.get("real") or {}
    labels = [k for k in dict.fromkeys([*gen, *real]) if k != "macro"]
    rows = [[k, _fmt(gen.get(k)), _fmt(real.get(k))] for k in labels]
    rows.append(["macro", _fmt(gen.get("macro")), _fmt(real.get("macro"))])
    return _table_figure([(["label", "AUROC generated", "AUROC real"], rows,
                           "Abnormality faithfulness (classifier AUROC)", True)], out_png, dpi)


def plot_tstr(metrics_json, out_png, dpi: int = 120) -> Path:
    """Train-on-synthetic, test-on-real against train-on-real, test-on-real, per label."""
    tstr = json.loads(Path(metrics_json).read_text()).get("tstr")
    if not tstr:
        rows, title = [], "Train on synthetic, test on real: not computed (tstr is null)"
    else:
        keys = [k for k in tstr if k != "macro"] + (["macro"] if "macro" in tstr else [])
        rows = [[k, _fmt(tstr[k].get("trtr")), _fmt(tstr[k].get("tstr")), _fmt(tstr[k].get("gap"))] for k in keys]
        title = "Train on synthetic, test on real (AUROC)"
    return _table_figure([(["label", "train real", "train synthetic", "gap"], rows, title,
                           bool(tstr) and "macro" in tstr)], out_png, dpi)


# --- (4) HU ---------------------------------------------------------------------------------------
def _shade_tissues(ax, lo: float, hi: float, vertical: bool = True) -> None:
    for tissue, (a, b) in TISSUES.items():
        a, b = max(lo, a if a is not None else lo), min(hi, b if b is not None else hi)
        span = ax.axvspan if vertical else ax.axhspan
        span(a, b, color=TISSUE_COLOURS[tissue], alpha=0.35, lw=0, label=tissue.replace("_", " "))


def plot_hu_histograms(histograms_json, out_png, dpi: int = 120) -> Path:
    """HU histograms of all generated against all real voxels (log density), with the tissue
    intervals of the HU checks shaded."""
    h = json.loads(Path(histograms_json).read_text())
    edges = np.asarray(h["edges"], dtype=np.float64)
    gen, real = np.asarray(h["generated"], dtype=np.float64), np.asarray(h["real"], dtype=np.float64)
    if not (len(edges) == len(gen) + 1 == len(real) + 1):
        raise ValueError(f"{histograms_json}: need len(edges) == len(densities) + 1")
    used = np.flatnonzero((gen > 0) | (real > 0))
    hi = min(edges[-1], edges[used[-1] + 1] + 200.0) if used.size else edges[-1]
    fig = _new_figure(4.5)
    ax = fig.subplots()
    _shade_tissues(ax, edges[0], hi)
    ax.stairs(np.where(real > 0, real, np.nan), edges, color="black", lw=1.5, label="real")
    ax.stairs(np.where(gen > 0, gen, np.nan), edges, color="C3", lw=1.5, label="generated")
    ax.set_yscale("log")
    ax.set(xlim=(edges[0], hi), xlabel="HU", ylabel="density (1/HU, log scale)",
           title="HU histograms: generated vs real")
    ax.legend(fontsize=8, ncols=2, loc="upper right")
    return _save(fig, out_png, dpi)


def plot_per_volume(per_volume_csv, out_png, dpi: int = 120) -> Path:
    """Per generated volume: its CLIP score against the real scan's (the ceiling), and its
    per-tissue median HU against the tissue intervals (volumes with HU flags in red)."""
    pv = pd.read_csv(per_volume_csv)
    fig = _new_figure(4.5)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=(1, 1.4))
    flagged = pv.get("n_hu_flags", pd.Series(0, index=pv.index)).fillna(0) > 0
    ax1.scatter(pv["clip_score_real"], pv["clip_score"], c=np.where(flagged, "C3", "C0"), s=18)
    both = pd.concat([pv["clip_score"], pv["clip_score_real"]]).dropna()
    if len(both):
        lo, hi = float(both.min()), float(both.max())
        ax1.plot([lo, hi], [lo, hi], color="grey", ls="--", lw=1, label="generated = real")
        ax1.legend(fontsize=8)
    ax1.set(xlabel="CLIP score of the real scan", ylabel="CLIP score of the generated volume",
            title="CLIP score per volume")
    _shade_tissues(ax2, -1100.0, 1500.0, vertical=False)
    rng = np.random.default_rng(0)  # jitter only, so that the figure is reproducible
    for i, tissue in enumerate(TISSUES):
        col = f"hu_{tissue}_median"
        if col in pv:
            x = i + rng.uniform(-0.15, 0.15, len(pv))
            ax2.scatter(x, pv[col], c=np.where(flagged, "C3", "black"), s=12, zorder=3)
    ax2.set_xticks(range(len(TISSUES)), [t.replace("_", " ") for t in TISSUES])
    ax2.set(ylim=(-1100, 1500), ylabel="median HU", title="Tissue median HU per generated volume (red: flagged)")
    return _save(fig, out_png, dpi)


# --- (5) guidance sweep ---------------------------------------------------------------------------
def plot_guidance_sweep(sweep_csv, out_png, dpi: int = 120) -> Path:
    """Classifier-free guidance scale against CLIP score (higher is better) and axial FID (lower)."""
    sw = pd.read_csv(sweep_csv).sort_values("guidance_scale")
    if sw.empty:
        raise ValueError(f"{sweep_csv}: no guidance scales")
    fig = _new_figure(4.0)
    for ax, col, label, colour in zip(fig.subplots(1, 2), ("clip_score", "fid_axial"),
                                      ("CLIP score (higher is better)", "FID axial (lower is better)"), ("C0", "C3")):
        ax.plot(sw["guidance_scale"], sw[col], marker="o", color=colour)
        ax.set(xlabel="guidance scale", ylabel=label, title=label.split(" (")[0] + " vs guidance")
        ax.grid(alpha=0.3)
    return _save(fig, out_png, dpi)


# --- the rule -------------------------------------------------------------------------------------


def make_figures(inputs: Mapping[str, str], outputs: Mapping[str, str], cfg: FigureConfig) -> list[Path]:
    """Every figure of the report. inputs: samples, valid, metrics, per_volume, histograms, sweep
    and one metrics.csv per model in MODELS; outputs: one PNG path per name in FIGURES."""
    missing = set(FIGURES) - set(outputs)
    if missing:
        raise ValueError(f"no output path for figures {sorted(missing)}")
    curves = {m: inputs[m] for m in MODELS if m in inputs}
    return [
        plot_samples(inputs["samples"], inputs["valid"], outputs["samples"], cfg),
        plot_training_curves(curves, outputs["training_curves"], cfg.dpi),
        plot_metrics_summary(inputs["metrics"], outputs["metrics_summary"], cfg.dpi),
        plot_faithfulness(inputs["metrics"], outputs["faithfulness"], cfg.dpi),
        plot_tstr(inputs["metrics"], outputs["tstr"], cfg.dpi),
        plot_hu_histograms(inputs["histograms"], outputs["hu_histograms"], cfg.dpi),
        plot_per_volume(inputs["per_volume"], outputs["per_volume"], cfg.dpi),
        plot_guidance_sweep(inputs["sweep"], outputs["guidance_sweep"], cfg.dpi),
    ]
