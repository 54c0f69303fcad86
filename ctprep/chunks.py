"""Per-chunk work: preprocess a chunk's volumes, then pack them into webdataset shards.

A chunk is a fixed slice of the cohort (patients hashed into ``n_chunks``), so at 50k volumes
each chunk is an independent job that Slurm can place anywhere.

Each volume is read once, preprocessed once and encoded once: ``prep`` writes its lossless
payload (``<key>.b2nd``, see :mod:`ctprep.codec`) and its geometry and history go into the chunk
table; ``shards`` packs those bytes as they are beside prompts, labels and meta (no decode, no
re-encode), so a prompt edit reruns the cheap packing, not ``prep``. The shards it rewrites hold the
prompts, though: their checksums change, and every model trained on them retrains (the tokenizer and
autoencoder too, although they read no prompt).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ctprep import ctrate, rejects
from ctprep.cohort import SECTIONS, metadata_row, prep_rows, rows_for_chunk
from ctprep.preprocess import preprocess_volume
from ctprep.prompts import STRUCTURED
from ctprep.codec import EncodedVolume, encode_volume
from ctprep.shards import merge_manifests, write_shards
from ctprep.volume import VolumeError, atomic_write_bytes, load_nifti

#: The prep table's columns (one row per prepared volume).
PREP_COLUMNS = ["VolumeName", "split", "prep_path", "shape", "dtype", "spacing", "affine", "orientation",
                "stored_convention", "meta", "bytes", "seconds"]

logger = logging.getLogger(__name__)



def prep_chunk(
    cohort_path: str | Path,
    chunk: int,
    preset: Mapping,
    dataset: Mapping,
    out_dir: str | Path,
    out_table: str | Path,
    out_rejects: str | Path,
    strict: bool = False,
) -> pd.DataFrame:
    """Preprocess every volume of ``chunk`` into ``out_dir/<key>.b2nd`` (int16 HU, lossless).

    The chunk table (``out_table``) holds each volume's geometry and meta (history included).
    """
    rows = prep_rows(cohort_path, chunk)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done, bad = [], []
    for rec in tqdm(rows.to_dict("records"), desc=f"prep chunk {chunk}", mininterval=5):
        name = rec["VolumeName"]
        t0 = time.perf_counter()
        try:
            # int16 HU straight out of the resampler: the float32 grid never exists
            vol = preprocess_volume(load_nifti(rec["path"]), metadata_row(rec), preset, dataset, dtype="int16")
        except VolumeError as err:
            bad.append({"VolumeName": name, "split": rec["split"], "stage": "preprocess", "reason": str(err)})
            continue
        enc = encode_volume(vol, "int16")
        del vol  # the grid goes before the next volume is read
        path = out_dir / f"{ctrate.volume_key(name)}.b2nd"
        atomic_write_bytes(path, enc.payload)
        done.append({
            "VolumeName": name,
            "split": rec["split"],
            "prep_path": str(path),
            "shape": list(enc.shape),
            "dtype": enc.dtype,
            "spacing": np.sqrt((enc.affine[:3, :3] ** 2).sum(axis=0)).round(6).tolist(),
            "affine": enc.affine.tolist(),
            "orientation": "".join(enc.orientation),
            "stored_convention": enc.meta["stored_convention"],
            "meta": enc.meta_json(),
            "bytes": len(enc.payload),
            "seconds": round(time.perf_counter() - t0, 3),
        })
        logger.info("%s: %s, %.1f MB (%.2fs)", name, "".join(enc.orientation), len(enc.payload) / 1e6,
                    done[-1]["seconds"])
    rej = rejects.frame(bad)
    rejects.check(rej, strict, f"preprocessing chunk {chunk}")
    table = pd.DataFrame(done, columns=PREP_COLUMNS)
    table.to_parquet(out_table, index=False)
    rej.to_parquet(out_rejects, index=False)
    return table


def _label(value) -> float:
    """A label cell as 0.0, 1.0 or NaN (blank: unknown); the shard writer refuses anything else."""
    return float("nan") if value is None or pd.isna(value) else float(value)


def _filled(value) -> bool:
    """A prompt cell the prompts rule could fill (an empty one is null: its template needs a field the row lacks)."""
    return isinstance(value, str)


def _samples(prep: pd.DataFrame, cohort: pd.DataFrame, prompts: pd.DataFrame, prompt_key: str,
             fallback_key: str | None = None) -> Iterator[dict]:
    by_name = cohort.set_index("VolumeName")
    prompt_cols = [c for c in prompts.columns if c not in ("VolumeName", "split")]
    prompt_rows = prompts.set_index("VolumeName")
    fallback = []
    for rec in prep.to_dict("records"):
        name = rec["VolumeName"]
        if name not in prompt_rows.index:  # rejected at the prompts stage
            continue
        main = prompt_rows.at[name, prompt_key]
        if not _filled(main) and fallback_key:
            main = prompt_rows.at[name, fallback_key]
            fallback.append(name)
        c = by_name.loc[name]
        # the prepared payload as it is: packed, not decoded
        vol = EncodedVolume(Path(rec["prep_path"]).read_bytes(), np.array(rec["affine"].tolist(), dtype=np.float64),
                            tuple(int(n) for n in rec["shape"]), rec["dtype"], json.loads(rec["meta"]))
        labels = [_label(c[lab]) for lab in ctrate.LABELS]
        yield {
            "key": ctrate.volume_key(name),
            "volume": vol,
            "prompt": main,
            "prompts": {k: prompt_rows.at[name, k] for k in prompt_cols if _filled(prompt_rows.at[name, k])},
            "labels": labels,
            "meta": {
                "VolumeName": name,
                "split": c["split"],
                "patient": c["patient"],
                "age": None if pd.isna(c["age"]) else int(c["age"]),
                "sex": c["sex"],
                "stored_convention": rec["stored_convention"],
                "report": {v: c[v] for v in SECTIONS.values()},
                "metadata": metadata_row(c),
                "labels": {lab: None if math.isnan(v) else int(v) for lab, v in zip(ctrate.LABELS, labels)},
                "source": c["path"],
            },
        }
    if fallback:
        logger.warning("shards: %d volume(s) have no %r prompt (its template needs a field their report/metadata "
                       "lacks; first: %s): their main prompt is their %r prompt", len(fallback), prompt_key,
                       fallback[0], fallback_key)


def shard_chunk(
    prep_table: str | Path,
    cohort_path: str | Path,
    prompts_path: str | Path,
    split: str,
    chunk: int,
    out_dir: str | Path,
    shard_size: int,
    prompt_key: str,
    fallback_key: str | None = STRUCTURED,
) -> dict:
    """Pack one chunk's preprocessed volumes of ``split`` into tar shards under ``out_dir``.

    Each sample's main prompt (``prompt.txt``) is its ``prompt_key`` prompt or, where the prompts rule left that cell
    empty (its template needs a field the volume's report/metadata lacks, "{sex}" without PatientSex), its
    ``fallback_key`` prompt (the structured prompt, which needs no metadata), with a warning; ``prompts.json``
    holds the prompts the volume has. A volume with neither is a one-line error before anything is written.
    """
    prep = pd.read_parquet(prep_table)
    prep = prep[prep["split"] == split]
    cohort = rows_for_chunk(cohort_path, chunk)
    prompts = pd.read_parquet(prompts_path)
    if prompt_key not in prompts.columns:
        raise ValueError(f"prompt template {prompt_key!r} not among {list(prompts.columns[2:])}")
    if fallback_key not in prompts.columns:
        fallback_key = None
    used = prompts[prompts["VolumeName"].isin(prep["VolumeName"])]
    # as booleans: pandas 3 keeps an empty map's string dtype (a chunk with no volume of this split), which ~ refuses
    empty = ~used[prompt_key].map(_filled).to_numpy(dtype=bool)
    if fallback_key is not None:
        empty &= ~used[fallback_key].map(_filled).to_numpy(dtype=bool)
    if empty.any():
        names = list(used.loc[empty, "VolumeName"])
        raise ValueError(f"{len(names)} volume(s) have no {prompt_key!r} prompt (first: {names[0]}): its template needs "
                         f"a field their report/metadata lacks; set shards.prompt to a prompt every volume has")
    return write_shards(_samples(prep, cohort, prompts, prompt_key, fallback_key), out_dir,
                        prefix=f"{split}-c{int(chunk):03d}", shard_size=shard_size, split=split)


def merge_split_manifests(chunk_dirs: list[str | Path], out_path: str | Path, split: str) -> dict:
    """The split's manifest over the chunk manifests found in ``chunk_dirs``."""
    paths = sorted(p for d in chunk_dirs for p in Path(d).glob(f"{split}-c*.manifest.json"))
    if len(paths) != len(chunk_dirs):
        raise FileNotFoundError(f"expected one {split} manifest per chunk folder, found {len(paths)} in {len(chunk_dirs)}")
    return merge_manifests(paths, out_path, split)
