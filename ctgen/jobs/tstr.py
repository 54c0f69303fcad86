"""Train on synthetic, test on real: the two training sets, as shards the one training loop streams.

The workflow samples one volume for each of ``evaluation.tstr_reports`` *training* reports (never an
evaluation report: the test scans' own reports must not reach the classifier).
:func:`tstr_synthetic_shards` writes those synthetic volumes, each with the labels of the report that
produced it, and :func:`tstr_real_shards` the real training scans of the very same reports (the
train-on-real reference: same reports, same count), as two shard sets. The classifier recipe of
``model_presets.<preset>.classifier`` then trains on each for the same number of steps (``ctgen train
classifier``), and ``ctgen evaluate`` tests both on the real evaluation scans. Memory: one volume at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from ctgen.data.shards import labels_of, volume_of
from ctgen.data.stream import iter_raw_samples, load_shards
from ctprep.ctrate import volume_key
from ctprep.errors import UserError
from ctprep.shards import write_shards
from ctprep.volume import Volume, load_nifti

log = logging.getLogger(__name__)


def _real_samples(manifests: list[str], stems: list[str]) -> Iterator[dict]:
    """The training shards' samples of ``stems``, in the manifests' order, as write_shards takes them."""
    for key, raw in iter_raw_samples(list(manifests), set(stems)):
        yield {"key": key, "volume": Volume.from_3d(volume_of(raw), raw["affine.npy"]),
               "prompt": raw["prompt.txt"], "prompts": raw.get("prompts.json") or {},
               "meta": {"tstr": "real"}, "labels": labels_of(raw)}


def _tstr_stems(table_csv: str | Path, id_column: str, train_manifests: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """The rows of a TSTR table (the prompts, or the sampled volumes) whose reports are training volumes, with
    their volume keys: both training sets leave out the same reports, so they keep the same size."""
    table = pd.read_csv(table_csv, dtype={id_column: str})
    stems = [volume_key(s) for s in table[id_column]]
    if len(set(stems)) != len(stems):
        raise UserError(f"{table_csv}: TSTR needs one synthetic volume per report (sample with --per-prompt 1), "
                        "so that both training sets have the same size")
    known = {k for s in load_shards(train_manifests) for k in s.keys}
    missing = sorted(set(stems) - known)
    if len(missing) == len(stems):
        raise UserError(f"{table_csv}: none of its reports is a training volume of {train_manifests}: TSTR samples "
                        "from training reports only")
    if missing:  # e.g. a report whose scan was rejected in preparation: left out of both sets, named
        log.warning("left out of both TSTR training sets, not in the training shards: %s", missing)
        keep = [s not in missing for s in stems]
        table, stems = table[keep], [s for s in stems if s not in missing]
    return table, stems


def _write(name: str, samples: Iterator[dict], folder: str | Path, shard_size: int) -> Path:
    manifest = write_shards(samples, folder, prefix=f"tstr-{name}", shard_size=shard_size, split="train")
    log.info("TSTR %s training set: %d volumes", name, manifest["n_samples"])
    return Path(folder) / f"tstr-{name}.manifest.json"


def tstr_synthetic_shards(samples_csv: str | Path, train_manifests: list[str], out_dir: str | Path,
                          shard_size: int) -> Path:
    """The synthetic TSTR training set (the sampled volumes, each with its report's labels); returns its manifest."""
    samples, stems = _tstr_stems(samples_csv, "prompt_id", train_manifests)
    labels = {s["key"]: s["labels"] for s in _real_samples_labels(train_manifests, stems)}

    def synthetic() -> Iterator[dict]:
        for row, stem in zip(samples.itertuples(index=False), stems):
            vol = load_nifti(row.nifti)
            yield {"key": f"{stem}_s{int(row.seed)}", "volume": vol, "prompt": str(row.prompt), "prompts": {},
                   "meta": {"tstr": "synthetic", "report": stem, "seed": int(row.seed)}, "labels": labels[stem]}

    return _write("synthetic", synthetic(), out_dir, shard_size)


def tstr_real_shards(prompts_csv: str | Path, train_manifests: list[str], out_dir: str | Path, shard_size: int) -> Path:
    """The real TSTR training set: the training scans of the TSTR prompts' reports; returns its manifest.

    Made from the prompts, not from the sampled volumes (a job of its own): an edit of the cascade samples the
    synthetic set again but leaves this one, and the classifier trained on it, as they are.
    """
    _, stems = _tstr_stems(prompts_csv, "id", train_manifests)
    return _write("real", _real_samples(train_manifests, stems), out_dir, shard_size)


def _real_samples_labels(manifests: list[str], stems: list[str]) -> Iterator[dict]:
    """Labels only (no volume decoded) of the training samples of ``stems``."""
    from ctgen.data.stream import member_values

    wanted = set(stems)
    for key, value in member_values(load_shards(manifests), "labels.npy"):
        if key in wanted:
            yield {"key": key, "labels": labels_of({"labels.npy": value})}
