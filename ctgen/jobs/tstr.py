"""Train on synthetic, test on real: the two training sets, as shards the one training loop streams.

The workflow samples one volume for each of ``evaluation.tstr_reports`` *training* reports (never an
evaluation report: the test scans' own reports must not reach the classifier). :func:`tstr_shards`
writes those synthetic volumes, each with the labels of the report that produced it, and the real
training scans of the very same reports (the train-on-real reference: same reports, same count),
as two shard sets. The classifier recipe of ``model_presets.<preset>.classifier`` then trains on
each for the same number of steps (``ctgen train classifier``), and ``ctgen evaluate`` tests both on
the real evaluation scans. Memory: one volume at a time.
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


def tstr_shards(samples_csv: str | Path, train_manifests: list[str], synthetic_dir: str | Path, real_dir: str | Path,
                shard_size: int) -> tuple[Path, Path]:
    """The synthetic and the real TSTR training sets as shards; returns their two manifests."""
    samples = pd.read_csv(samples_csv, dtype={"prompt_id": str})
    stems = [volume_key(s) for s in samples["prompt_id"]]
    if len(set(stems)) != len(stems):
        raise UserError(f"{samples_csv}: TSTR needs one synthetic volume per report (sample with --per-prompt 1), "
                        "so that both training sets have the same size")
    known = {k for s in load_shards(train_manifests) for k in s.keys}
    missing = sorted(set(stems) - known)
    if len(missing) == len(stems):
        raise UserError(f"{samples_csv}: none of its reports is a training volume of {train_manifests}: TSTR samples "
                        "from training reports only")
    if missing:  # e.g. a report whose scan was rejected in preparation: left out of both sets, named
        log.warning("left out of both TSTR training sets, not in the training shards: %s", missing)
        keep = [s not in missing for s in stems]
        samples, stems = samples[keep], [s for s in stems if s not in missing]
    labels = {s["key"]: s["labels"] for s in _real_samples_labels(train_manifests, stems)}

    def synthetic() -> Iterator[dict]:
        for row, stem in zip(samples.itertuples(index=False), stems):
            vol = load_nifti(row.nifti)
            yield {"key": f"{stem}_s{int(row.seed)}", "volume": vol, "prompt": str(row.prompt), "prompts": {},
                   "meta": {"tstr": "synthetic", "report": stem, "seed": int(row.seed)}, "labels": labels[stem]}

    out = []
    for name, source, folder in (("synthetic", synthetic(), synthetic_dir), ("real", _real_samples(train_manifests, stems),
                                                                            real_dir)):
        manifest = write_shards(source, folder, prefix=f"tstr-{name}", shard_size=shard_size, split="train")
        log.info("TSTR %s training set: %d volumes", name, manifest["n_samples"])
        out.append(Path(folder) / f"tstr-{name}.manifest.json")
    return out[0], out[1]


def _real_samples_labels(manifests: list[str], stems: list[str]) -> Iterator[dict]:
    """Labels only (no volume decoded) of the training samples of ``stems``."""
    from ctgen.data.stream import member_values

    wanted = set(stems)
    for key, value in member_values(load_shards(manifests), "labels.npy"):
        if key in wanted:
            yield {"key": key, "labels": labels_of({"labels.npy": value})}
