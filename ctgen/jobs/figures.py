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
from ctgen.metrics.summary import n_text
from ctprep.volume import load_nifti

logger = logging.getLogger(__name__)

WIDTH_IN = 12.0  # width of every figure in inches; pixels = WIDTH_IN * dpi
WINDOWS = {"lung": (-1350.0, 150.0), "mediastinum": (-160.0, 240.0)}  # HU (low, high) display windows
PLANES = ("axial", "coronal", "sagittal")
MODELS = ("tokenizer", "generator", "superres", "autoencoder", "latent_flow", "report_encoder", "clip", "classifier",
          "slicenet")
FAMILY_COLOURS = {"cascade": "C3", "latent_flow": "C0"}  # the generator families; real scans are black
REAL_COLOUR = "black"
# the logged term worth plotting beside the loss, first match wins, per model
KEY_TERMS = {
    "tokenizer": ("recon_loss", "perplexity", "codebook_usage"),
    "generator": ("accuracy_masked",),
    "superres": ("x0_mse",),
    "clip": ("accuracy_i2t", "accuracy_t2i"),
    "classifier": ("accuracy", "positive_rate"),
    "slicenet": ("plane_accuracy", "position_loss"),
    "autoencoder": ("recon_loss",),
    "latent_flow": ("x0_mse",),
    "report_encoder": ("accuracy",),
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


def _colour(family: str) -> str:
    return FAMILY_COLOURS.get(family, "C2")


def plot_samples(samples_csvs: Mapping[str, str | Path], valid_manifest, out_png,
                 cfg: FigureConfig = FigureConfig()) -> Path:
    """Per chosen prompt, the real scan of the report and each family's volume of it (first repeat: the same
    seed in every family) as axial/coronal/sagittal mid slices, one row per HU window, the prompt as the title.
    ``samples_csvs``: {family: samples.csv}; the prompts are chosen from the first family's."""
    tables = {f: pd.read_csv(p, dtype={"prompt_id": str}) for f, p in samples_csvs.items()}
    chosen = choose_prompts(next(iter(tables.values())), cfg)
    real = {}  # key -> sample, only the chosen volumes are kept (a full-size scan is ~150 MB)
    # only the shards holding a chosen key are read, and only the chosen volumes decoded: the split's every
    # volume decoded on the way made this job's time grow with the validation set
    for s in iter_samples(valid_manifest, keys=chosen):
        real[s["key"]] = s
        if len(real) == len(chosen):
            break
    windows = cfg.windows
    sources = ["real", *tables]
    n_rows = len(chosen) * len(windows)
    row_in = 0.1 + 11.4 / (len(sources) * len(PLANES))  # a row of roughly square panels across the 12 inches
    fig = _new_figure(0.5 + len(chosen) * 0.6 + n_rows * row_in)
    for sub, pid in zip(np.atleast_1d(fig.subfigures(len(chosen), 1)), chosen):
        panels, row = {}, None
        for family, samples in tables.items():
            rows = samples[samples["prompt_id"] == pid].sort_values("repeat")
            if rows.empty:
                logger.warning("%s did not sample prompt %s", family, pid)
                continue
            row = rows.iloc[0]
            vol = load_nifti(_resolve(row["nifti"], Path(samples_csvs[family]).resolve()))
            panels[family] = mid_slices(to_model_layout(vol.array[0])[0], vol.spacing)
        if pid in real:
            r = real[pid]
            panels["real"] = mid_slices(to_model_layout(r["volume"])[0], _spacing(r["affine"]))
        else:
            logger.warning("no real scan with key %s in %s", pid, valid_manifest)
        title = textwrap.shorten(str(row["prompt"]), width=330, placeholder=" ...")
        sub.suptitle(f"{pid} (seed {row['seed']}): " + "\n".join(textwrap.wrap(title, 110)), fontsize=9)
        axes = np.atleast_2d(sub.subplots(len(windows), len(sources) * len(PLANES)))
        for wi, window in enumerate(windows):
            for ci, (source, plane) in enumerate((s, p) for s in sources for p in PLANES):
                ax = axes[wi, ci]
                ax.set_xticks([]), ax.set_yticks([])
                if wi == 0:
                    ax.set_title(f"{source.replace('_', ' ')}\n{plane}", fontsize=8,
                                 color=REAL_COLOUR if source == "real" else _colour(source))
                if ci == 0:
                    ax.set_ylabel(f"{window}\n[{WINDOWS[window][0]:.0f}, {WINDOWS[window][1]:.0f}] HU", fontsize=8)
                if source not in panels:
                    ax.text(0.5, 0.5, f"no {source.replace('_', ' ')}\nvolume", ha="center", va="center",
                            transform=ax.transAxes, fontsize=7)
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
    ncols = 3 if n > 6 else 2 if n > 1 else 1
    nrows = math.ceil(n / ncols)
    fig = _new_figure(0.3 + 6.0 / ncols * nrows)
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


# --- (3) metrics with their CIs ---------------------------------------------------------------------
def _records(metrics_json) -> dict[str, dict]:
    """metrics.json -> {name: record}."""
    return {r["name"]: r for r in json.loads(Path(metrics_json).read_text()).get("metrics", [])}


#: How a flagged value (too few samples for a result, with the reason in its record) is drawn: a hollow marker
FLAGGED_NOTE = "hollow: flagged, too few samples to read as a result"


def _err(v: float, ci) -> list[list[float]] | None:
    """Error bar lengths of ``ci`` around ``v`` (None without a CI; never negative, should a CI miss its point)."""
    return [[max(v - ci[0], 0.0)], [max(ci[1] - v, 0.0)]] if ci else None


def _point(ax, y: float, record: dict | None, colour: str, label: str | None, dy: float = 0.0) -> None:
    """One value with its CI as a horizontal bar at row ``y`` (nothing where the value is missing); a flagged value
    is drawn hollow, a value without a CI says so rather than showing a bar of no width."""
    if not record or record.get("value") is None:
        return
    v, ci = record["value"], record.get("ci")
    hollow = {"mfc": "white"} if record.get("flag") else {}
    ax.errorbar([v], [y + dy], xerr=_err(v, ci), fmt="o", color=colour, ms=5, capsize=3, lw=1.2, label=label, **hollow)
    if not ci:
        ax.annotate("no CI", (v, y + dy), xytext=(6, 0), textcoords="offset points", va="center", fontsize=6,
                    color=colour)


def _series_handles(series, extra=()) -> list:
    """Legend entries for ``(records, prefix, colour, name)`` series, whatever rows have values (a legend taken from
    the first row lost every series when that row was flagged), plus the hollow-marker note where one is drawn."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", ls="", color=colour, label=name) for _, _, colour, name in series]
    if any(r.get("flag") and r.get("value") is not None
           for rec, prefix, *_ in series for n, r in rec.items() if n.startswith(prefix + ".")):
        handles.append(Line2D([], [], marker="o", ls="", color="grey", mfc="white", label=FLAGGED_NOTE))
    return [*extra, *handles]


def _named_sizes(named) -> str:
    """"n = <name> <n> (<units>), ..." of (name, record or None) pairs, each series with its own n."""
    parts = [f"{name} {n_text(r)}" for name, r in named if r and r.get("n") is not None]
    return "n = " + ", ".join(parts) if parts else ""


def _sizes(series) -> str:
    """Each series' n (volumes, and reports or patients where the CIs resample them), from its macro or first
    valued record."""
    return _named_sizes((name.removeprefix("generated: "), rec.get(f"{prefix}.macro") or next(
        (r for n, r in rec.items() if n.startswith(prefix + ".") and r.get("value") is not None), None))
        for rec, prefix, _, name in series)


def _per_label_plot(series: Sequence[tuple[dict, str, str, str]], out_png, dpi: int, title: str, xlabel: str) -> Path:
    """Per label (and macro): one point with its CI per series (records, name prefix, colour, legend label);
    a label the first series flags says why it has no value."""
    rec0, prefix = series[0][0], series[0][1]
    labels = [n[len(prefix) + 1:] for n in rec0 if n.startswith(prefix + ".") and not n.endswith(".macro")]
    rows = [*labels, "macro"]
    fig = _new_figure(1.2 + 0.3 * len(rows) * max(1.0, len(series) / 2.5))
    ax = fig.subplots()
    ax.axvline(0.5, color="grey", ls="--", lw=1, label="chance (0.5)")
    step = 0.6 / max(len(series) - 1, 1)
    for i, label in enumerate(rows):
        y = len(rows) - 1 - i
        for j, (rec, side, colour, name) in enumerate(series):
            _point(ax, y, rec.get(f"{side}.{label}"), colour, None, dy=(0.3 - step * j) if len(series) > 1 else 0.0)
        first = rec0.get(f"{prefix}.{label}") or {}
        if first.get("value") is None and first.get("flag"):
            ax.text(0.02, y, textwrap.shorten("n/a: " + first["flag"], 90), va="center", fontsize=7, color="#777777")
    ax.set_yticks(range(len(rows)), rows[::-1], fontsize=8)
    ax.set(xlim=(0, 1), ylim=(-0.7, len(rows) - 0.3), xlabel=xlabel)
    first = next((r for n, r in rec0.items() if n.startswith(prefix + ".") and r.get("value") is not None), None)
    sub = f"{_sizes(series)} volumes, profile {first['profile']}" if first else \
        "no label has enough positives and negatives"
    ax.set_title(f"{title}\n{sub}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.legend(handles=_series_handles(series, ax.get_legend_handles_labels()[0]), loc="outside lower center",
               ncols=3, fontsize=8)
    return _save(fig, out_png, dpi)


def _family_records(metrics_jsons: Mapping[str, str | Path]) -> dict[str, dict[str, dict]]:
    return {family: _records(path) for family, path in metrics_jsons.items()}


def plot_faithfulness(metrics_jsons: Mapping[str, str | Path], out_png, dpi: int = 120) -> Path:
    """The classifier's AUROC per abnormality label on each family's generated volumes (against the labels of
    their reports) beside the real ceiling (the real scans of the same reports), with 95% CIs; labels with too
    few positives or negatives say so instead of showing a number. ``metrics_jsons``: {family: metrics.json}."""
    recs = _family_records(metrics_jsons)
    series = [(rec, "faithfulness.generated", _colour(f), f"generated: {f.replace('_', ' ')}") for f, rec in recs.items()]
    series.append((next(iter(recs.values())), "faithfulness.real", REAL_COLOUR, "real scans (ceiling)"))
    # the headline: each series' macro AUROC with its CI, in the title
    macros = []
    for rec, side, _, name in series:
        m = rec.get(f"{side}.macro") or {}
        if m.get("value") is not None:
            ci = f" [{m['ci'][0]:.2f}, {m['ci'][1]:.2f}]" if m.get("ci") else " (no CI)"
            macros.append(f"{name.removeprefix('generated: ')} {m['value']:.2f}{ci}"
                          + (" (flagged)" if m.get("flag") else ""))
    title = "Abnormality faithfulness (classifier AUROC, 95% CI)"
    if macros:
        title += "\nmacro: " + "; ".join(macros)
    return _per_label_plot(series, out_png, dpi, title, "AUROC")


def _not_computed(out_png, dpi: int, text: str) -> Path:
    fig = _new_figure(1.5)
    fig.text(0.5, 0.5, text, ha="center", va="center")
    return _save(fig, out_png, dpi)


def plot_tstr(metrics_json, out_png, dpi: int = 120) -> Path:
    """Train on synthetic, test on real: per-label AUROC of the classifier trained on generated volumes beside
    the one trained on as many real volumes, both tested on the real evaluation scans (the cascade's samples)."""
    rec = _records(metrics_json) if metrics_json else {}
    if not any(n.startswith("tstr.") for n in rec):
        return _not_computed(out_png, dpi, "Train on synthetic, test on real: not computed "
                                           "(evaluation.tstr is off, or no cascade in models.generators)")
    series = [(rec, "tstr.synthetic", FAMILY_COLOURS["cascade"], "trained on synthetic (cascade)"),
              (rec, "tstr.real", REAL_COLOUR, "trained on real")]
    return _per_label_plot(series, out_png, dpi, "Train on synthetic, test on real (AUROC, 95% CI)", "AUROC")


def _bar(ax, x: float, record: dict | None, colour: str, width: float, label: str | None) -> None:
    """A value with its CI as a bar; a flagged value hatched and faint, a value without a CI says so."""
    if not record or record.get("value") is None:
        return
    v, ci = record["value"], record.get("ci")
    flagged = {"hatch": "//", "alpha": 0.25, "edgecolor": colour} if record.get("flag") else {"alpha": 0.6}
    ax.bar(x, v, width=width, color=colour, yerr=_err(v, ci), capsize=4, label=label, **flagged)
    if not ci:
        ax.annotate("no CI", (x, v), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=6)


def plot_alignment(metrics_jsons: Mapping[str, str | Path], out_png, dpi: int = 120) -> Path:
    """CLIP score (an uncalibrated cosine x 100) and text retrieval top-k with its chance level, each family's
    generated volumes beside the real scans, with 95% CIs."""
    recs = _family_records(metrics_jsons)
    first = next(iter(recs.values()))
    sides = [(rec, "{}.generated", _colour(f), f.replace("_", " ")) for f, rec in recs.items()]
    sides.append((first, "{}.real", REAL_COLOUR, "real"))
    fig = _new_figure(4.0)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=(1, 2))
    for x, (rec, pattern, colour, name) in enumerate(sides):
        _bar(ax1, x, rec.get(pattern.format("clip_score")), colour, 0.8, None)
    ax1.set_xticks(range(len(sides)), [name for *_, name in sides], fontsize=8)

    def sizes(metric: str) -> str:  # each series' own n: a family may have scored fewer volumes than another
        return textwrap.fill(_named_sizes((name, rec.get(pattern.format(metric))) for rec, pattern, _, name in sides), 60)

    ax1.set_ylabel("CLIP score")
    ax1.set_title(f"CLIP score (uncalibrated)\n{sizes('clip_score')}", fontsize=9)
    ks = sorted({int(n.split(".")[1][3:]) for n in first if n.startswith("retrieval.top")})
    width = 0.8 / len(sides)
    for j, k in enumerate(ks):
        for i, (rec, pattern, colour, name) in enumerate(sides):
            r = rec.get(pattern.format(f"retrieval.top{k}"))
            x = j + (i - (len(sides) - 1) / 2) * width
            _bar(ax2, x, r, colour, width, name if j == 0 else None)
            if r and r.get("value") is not None:
                ax2.hlines(r["extra"]["chance"], x - width / 2, x + width / 2, color="grey", ls="--",
                           label="chance" if i + j == 0 else None)
    n = next((r for name, r in first.items() if name.startswith("retrieval.")), {})
    ax2.set_xticks(range(len(ks)), [f"top-{k}" for k in ks])
    ax2.set(ylim=(0, 1.05), ylabel="accuracy")
    ax2.set_title(f"Report retrieval among {n.get('extra', {}).get('n_candidates', '?')} reports\n"
                  f"{sizes(f'retrieval.top{ks[0]}') if ks else 'n = ?'}", fontsize=9)
    if any(r.get("flag") and r.get("value") is not None
           for rec, *_ in sides for name, r in rec.items() if name.startswith(("retrieval.", "clip_score"))):
        fig.text(0.5, 0.005, "hatched: flagged, too few samples to read as a result", ha="center", fontsize=7)
    if ks:
        ax2.legend(fontsize=8)
    return _save(fig, out_png, dpi)


# --- (4) HU ---------------------------------------------------------------------------------------
def _shade_tissues(ax, lo: float, hi: float, vertical: bool = True) -> None:
    for tissue, (a, b) in TISSUES.items():
        a, b = max(lo, a if a is not None else lo), min(hi, b if b is not None else hi)
        span = ax.axvspan if vertical else ax.axhspan
        span(a, b, color=TISSUE_COLOURS[tissue], alpha=0.35, lw=0, label=tissue.replace("_", " "))


def plot_hu_histograms(histograms_jsons: Mapping[str, str | Path], out_png, dpi: int = 120) -> Path:
    """HU histograms of all generated voxels of each family against all real voxels (log density), with the
    tissue intervals of the HU checks shaded. ``histograms_jsons``: {family: hu_histograms.json}."""
    curves, edges, sizes = {}, None, {}
    for family, path in histograms_jsons.items():
        h = json.loads(Path(path).read_text())
        sizes.setdefault("real", h.get("n", {}).get("real"))
        sizes[family] = h.get("n", {}).get("generated")
        e = np.asarray(h["edges"], dtype=np.float64)
        gen, real = np.asarray(h["generated"], dtype=np.float64), np.asarray(h["real"], dtype=np.float64)
        if not (len(e) == len(gen) + 1 == len(real) + 1):
            raise ValueError(f"{path}: need len(edges) == len(densities) + 1")
        if edges is not None and not np.array_equal(e, edges):
            raise ValueError(f"{path}: other HU bins than the first family's")
        edges = e
        curves.setdefault("real", real)
        curves[family] = gen
    used = np.flatnonzero(np.any([c > 0 for c in curves.values()], axis=0))
    hi = min(edges[-1], edges[used[-1] + 1] + 200.0) if used.size else edges[-1]
    fig = _new_figure(4.5)
    ax = fig.subplots()
    _shade_tissues(ax, edges[0], hi)
    for name, density in curves.items():
        n = f" (n = {sizes[name]})" if sizes.get(name) is not None else ""
        ax.stairs(np.where(density > 0, density, np.nan), edges, lw=1.5, label=name.replace("_", " ") + n,
                  color=REAL_COLOUR if name == "real" else _colour(name))
    ax.set_yscale("log")
    ax.set(xlim=(edges[0], hi), xlabel="HU", ylabel="density (1/HU, log scale)",
           title="HU histograms: generated vs real")
    ax.legend(fontsize=8, ncols=2, loc="upper right")
    return _save(fig, out_png, dpi)


MISSING_Y = 0.03  # where a volume without a tissue is drawn, as a fraction of the axis height from its foot


def _mark_missing(ax, x: np.ndarray, median: pd.Series, colour: str) -> int:
    """Volumes with no voxel of a tissue (a NaN median, flagged "missing" by the HU checks) as triangles at the foot
    of the tissue's column: at y = NaN they would not be drawn at all. Returns how many."""
    none = median.isna().to_numpy()
    if none.any():
        ax.scatter(x[none], np.full(int(none.sum()), MISSING_Y), c=colour, marker="v", s=16, zorder=3,
                   transform=ax.get_xaxis_transform())
    return int(none.sum())


def plot_per_volume(per_volume_csvs: Mapping[str, str | Path], out_png, dpi: int = 120) -> Path:
    """Per generated volume of each family: its CLIP score against the real scan's (the ceiling), and its
    per-tissue median HU against the tissue intervals (volumes with HU flags drawn as crosses, volumes with no
    voxel of a tissue as triangles at the foot of its column, counted)."""
    fig = _new_figure(4.5)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=(1, 1.4))
    _shade_tissues(ax2, -1100.0, 1500.0, vertical=False)
    rng = np.random.default_rng(0)  # jitter only, so that the figure is reproducible
    values, medians, missing, counted = [], [], dict.fromkeys(TISSUES, 0), dict.fromkeys(TISSUES, 0)
    sizes = []  # "<family> <n>": each family's own number of volumes (one may have scored fewer than another)
    shift = 0.3 / max(len(per_volume_csvs), 1)
    for fi, (family, path) in enumerate(per_volume_csvs.items()):
        pv = pd.read_csv(path)
        flagged = (pv.get("n_hu_flags", pd.Series(0, index=pv.index)).fillna(0) > 0).to_numpy()
        colour, name = _colour(family), family.replace("_", " ")
        sizes.append(f"{name} {len(pv)}")
        for mask, marker in ((~flagged, "o"), (flagged, "x")):
            what = f": {int(flagged.sum())} of {len(pv)} HU flagged" if marker == "x" else f" ({len(pv)} volumes)"
            ax1.scatter(pv["clip_score_real"][mask], pv["clip_score"][mask], c=colour, marker=marker, s=18,
                        label=name + what if mask.any() else None)
        values += [pv["clip_score"], pv["clip_score_real"]]
        medians.append(pv.filter(regex=r"^hu_.*_median$").stack())
        for i, tissue in enumerate(TISSUES):
            col = f"hu_{tissue}_median"
            if col in pv:
                x = i + (fi - (len(per_volume_csvs) - 1) / 2) * shift + rng.uniform(-0.06, 0.06, len(pv))
                for mask, marker in ((~flagged, "o"), (flagged, "x")):
                    ax2.scatter(x[mask], pv[col][mask], c=colour, marker=marker, s=12, zorder=3)
                missing[tissue] += _mark_missing(ax2, x, pv[col], colour)
                counted[tissue] += len(pv)
    both = pd.concat(values).dropna() if values else pd.Series(dtype=float)
    if len(both):
        lo, hi = float(both.min()), float(both.max())
        ax1.plot([lo, hi], [lo, hi], color="grey", ls="--", lw=1, label="generated = real")
    ax1.legend(fontsize=7)
    ax1.set(xlabel="CLIP score of the real scan", ylabel="CLIP score of the generated volume",
            title="CLIP score per volume")
    ax2.set_xticks(range(len(TISSUES)), [t.replace("_", " ") for t in TISSUES])
    medians = pd.concat(medians) if medians else pd.Series(dtype=float)
    lo, hi = (float(medians.min()), float(medians.max())) if len(medians) else (-1100.0, 1500.0)
    # the tissue bands' range, widened to every median (an external prediction's -3024 or 3071 stays in view)
    ax2.set(ylim=(min(-1100.0, lo - 50.0), max(1500.0, hi + 50.0)), ylabel="median HU")
    for i, tissue in enumerate(TISSUES):
        if missing[tissue]:
            ax2.text(i, MISSING_Y + 0.04, f"{missing[tissue]} of {counted[tissue]} without\n{tissue.replace('_', ' ')}",
                     ha="center", va="bottom", fontsize=6, transform=ax2.get_xaxis_transform())
    ax2.set_title(f"Tissue median HU per generated volume, n = {', '.join(sizes)}\n(x: flagged"
                  + ("; triangles at the foot: no voxel of that tissue)" if any(missing.values()) else ")"))
    return _save(fig, out_png, dpi)


# --- (5) guidance sweep ---------------------------------------------------------------------------
SWEEP = (("faithfulness.generated.macro", "faithfulness macro AUROC (higher is better)", "C1"),
         ("clip_score", "CLIP score (higher is better)", "C0"), ("retrieval.top1", "retrieval top-1 (higher is better)", "C2"),
         ("fid_2d.slicenet.axial", "axial FID, slice network (lower is better)", "C3"))
#: the sweep's paired comparison (each scale against the lowest) that a panel's title quotes
SWEEP_TESTS = {"faithfulness.generated.macro": "guidance.faithfulness.macro_auroc_diff",
               "clip_score": "guidance.clip_score_diff"}


def _sweep_flags(rows: pd.DataFrame) -> pd.Series:
    """The flags of sweep rows (empty cells and blank strings are no flags)."""
    if "flag" not in rows:
        return pd.Series(dtype=object)
    flags = rows["flag"].dropna().astype(str)
    return flags[flags.str.strip() != ""]


def _span(values: pd.Series) -> str:
    v = values.dropna().astype(int)
    return "?" if v.empty else f"{v.min()}" if v.min() == v.max() else f"{v.min()}-{v.max()}"


def _sweep_n(rows: pd.DataFrame, what: str = "") -> str:
    """The n of sweep rows, as a range where the scales differ (a scale may have scored fewer volumes than the lowest),
    with the reports or patients that the CIs resample: "1-3 (2 patients)"."""
    extra = {}
    if "n_resampled" in rows and rows["n_resampled"].notna().any():
        extra["n_resampled"] = _span(rows["n_resampled"])
        if "resampled" in rows and rows["resampled"].notna().any():
            extra["resampled"] = rows["resampled"].dropna().iloc[0]
    return n_text({"n": _span(rows["n"]), "extra": extra}, what)  # the records' own wording


def plot_guidance_sweep(sweep_csv, out_png, dpi: int = 120) -> Path:
    """Classifier-free guidance scale against faithfulness (macro AUROC), CLIP score, retrieval top-1 (with chance)
    and axial FID, with 95% CIs (the cascade's; not computed without it); the faithfulness and CLIP panels quote the
    highest scale's paired difference to the lowest with its permutation p-value."""
    if not sweep_csv:
        return _not_computed(out_png, dpi, "Guidance sweep: not computed (no cascade in models.generators)")
    sw = pd.read_csv(sweep_csv).sort_values("guidance_scale")
    if sw.empty:
        raise ValueError(f"{sweep_csv}: no guidance scales")
    fig = _new_figure(4.0)
    for ax, (metric, label, colour) in zip(fig.subplots(1, len(SWEEP)), SWEEP):
        m = sw[sw["metric"] == metric]
        ax.plot(m["guidance_scale"], m["value"], color=colour, lw=1)
        for row in m.itertuples():  # per scale: a flagged value hollow, one without a CI with no bar
            ci = (row.ci_low, row.ci_high) if pd.notna(row.ci_low) and pd.notna(row.ci_high) else None
            if pd.notna(row.value):
                ax.errorbar([row.guidance_scale], [row.value], yerr=_err(row.value, ci), marker="o", color=colour,
                            capsize=3, **({"mfc": "white"} if isinstance(row.flag, str) and row.flag else {}))
        if metric.startswith("retrieval") and m["chance"].notna().any():
            ax.axhline(float(m["chance"].iloc[0]), color="grey", ls="--", lw=1, label="chance")
            ax.legend(fontsize=8)
        title = f"{label.split(' (')[0]}\nn = {_sweep_n(m)}"  # a panel is ~45 characters wide
        flags = _sweep_flags(m)
        if len(flags):  # any scale's flag, not only the first row's; the first reason, with how many scales have one
            many = f" ({len(flags)} of {len(m)} scales)" if len(flags) > 1 else ""
            title += "\n" + textwrap.shorten(("hollow" + many + ": " if m["value"].notna().any() else "")
                                              + str(flags.iloc[0]), 45)
        elif m["value"].notna().any() and m["ci_low"].isna().any():
            title += "\n(a scale without a CI has no bar)"
        test = sw[sw["metric"] == SWEEP_TESTS.get(metric, "")]
        if len(test) and pd.notna(test["value"].iloc[-1]):
            t = test.iloc[-1]
            ci = f"[{t['ci_low']:.3g}, {t['ci_high']:.3g}]" if pd.notna(t["ci_low"]) and pd.notna(t["ci_high"]) \
                else "(no CI)"
            p = f"{t['p_value']:.2g}" if pd.notna(t.get("p_value")) else "n/a"
            # the test's own n pairs and flag: a difference of 3 pairs read as a result beside a scale of 50 volumes
            title += f"\n{t['guidance_scale']:g} vs {t['versus']:g}: {t['value']:+.3g} {ci}, p = {p},\n" \
                     f"n = {_sweep_n(test.iloc[[-1]], 'pairs')}"
            test_flag = _sweep_flags(test.iloc[[-1]])
            if len(test_flag):
                title += "\n" + textwrap.shorten("flagged: " + str(test_flag.iloc[0]), 45)
        ax.set_title(title, fontsize=8)
        ax.set(xlabel="guidance scale")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, out_png, dpi)


# --- (6) the families side by side ----------------------------------------------------------------
def plot_families(families_json, out_png, dpi: int = 120) -> Path:
    """The paired differences between the generator families (first minus second) on the same reports and seeds:
    each with its bootstrap 95% CI and the paired permutation test's p-value, both families' values beside."""
    summary = json.loads(Path(families_json).read_text())
    recs = [r for r in summary.get("metrics", [])]
    if not recs:
        reason = "; ".join(m["reason"] for m in summary.get("not_computed", [])) or "no comparison"
        return _not_computed(out_png, dpi, f"Generator families side by side: {reason}")
    first = recs[0]["extra"]
    fig = _new_figure(1.0 + 0.75 * len(recs))
    fig.suptitle("Generator families on the same reports and seeds: paired differences with 95% CIs "
                 "(red: paired permutation p < 0.05, unless flagged)", fontsize=10)
    axes = np.atleast_1d(fig.subplots(len(recs), 1))
    for ax, r in zip(axes, recs):  # a row per quantity, each on its own scale (AUROC, CLIP score, accuracy)
        e = r["extra"]
        ax.axvline(0.0, color="grey", ls="--", lw=1)
        ax.set_yticks([])
        ax.set_ylabel(r["name"].split(".", 2)[2].removesuffix("_diff").replace("_", " "), rotation=0, ha="right",
                      va="center", fontsize=8)
        if r.get("value") is None:
            ax.text(0.5, 0.5, "n/a: " + (r.get("flag") or ""), ha="center", va="center", transform=ax.transAxes,
                    fontsize=8, color="#777777")
            continue
        # a flagged difference (too few pairs, or a CI over the kept resamples only) is not coloured as a result
        significant = e.get("p_value") is not None and e["p_value"] < 0.05 and not r.get("flag")
        _point(ax, 0.0, r, "C3" if significant else "#555555", None)
        lo, hi = r["ci"] if r.get("ci") else (r["value"], r["value"])
        span = max(abs(lo), abs(hi), abs(r["value"]), 1e-6) * 1.15
        ax.set_xlim(-span, span)
        ax.text(1.01, 0.5, f"{e['value_a']:.3g} vs {e['value_b']:.3g}\np = {e['p_value']:.3g}, n = {n_text(r, 'pairs')}"
                + ("\n" + textwrap.shorten("flagged: " + r["flag"], 60) if r.get("flag") else ""),
                transform=ax.transAxes, va="center", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    axes[-1].set_xlabel(f"{first['a'].replace('_', ' ')} minus {first['b'].replace('_', ' ')} "
                        "(paired by report and seed)")
    return _save(fig, out_png, dpi)


# --- the rule -------------------------------------------------------------------------------------


def make_figures(runs: Mapping[str, Mapping[str, str]], shared: Mapping[str, str], outputs: Mapping[str, str],
                 cfg: FigureConfig) -> list[Path]:
    """Every figure of the report, in :data:`FIGURES` order.

    ``runs``: {family: {samples, metrics, per_volume, histograms}} per generator family (in the order of
    ``models.generators``); ``shared``: valid (the shard manifest of the real scans), families (the comparison),
    sweep and tstr (the cascade's, absent without it) and one metrics.csv per trained model of MODELS;
    ``outputs``: one PNG path per name in FIGURES.
    """
    missing = set(FIGURES) - set(outputs)
    if missing:
        raise ValueError(f"no output path for figures {sorted(missing)}")
    if not runs:
        raise ValueError("no generator family to draw")
    of = lambda key: {family: run[key] for family, run in runs.items()}  # noqa: E731
    curves = {m: shared[m] for m in MODELS if shared.get(m)}
    cascade_metrics = runs.get("cascade", {}).get("metrics")
    draw = {
        "faithfulness": lambda out: plot_faithfulness(of("metrics"), out, cfg.dpi),
        "families": lambda out: plot_families(shared["families"], out, cfg.dpi),
        "tstr": lambda out: plot_tstr(cascade_metrics, out, cfg.dpi),
        "alignment": lambda out: plot_alignment(of("metrics"), out, cfg.dpi),
        "hu_histograms": lambda out: plot_hu_histograms(of("histograms"), out, cfg.dpi),
        "per_volume": lambda out: plot_per_volume(of("per_volume"), out, cfg.dpi),
        "guidance_sweep": lambda out: plot_guidance_sweep(shared.get("sweep"), out, cfg.dpi),
        "samples": lambda out: plot_samples(of("samples"), shared["valid"], out, cfg),
        "training_curves": lambda out: plot_training_curves(curves, out, cfg.dpi),
    }
    return [draw[name](outputs[name]) for name in FIGURES]
