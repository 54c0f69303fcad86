"""The text side's jobs: fit the small encoder's tokenizer on training prompts, cache a frozen encoder's states."""

from __future__ import annotations

import logging
from pathlib import Path

from ctprep.ctrate import is_blank_section, volume_key

log = logging.getLogger(__name__)


def prompt_texts(prompts_parquet: str | Path, column: str, splits: list[str] | None = None) -> dict[str, str]:
    """{sample key: prompt} of the prompts table's ``column`` (a template name), optionally for ``splits`` only."""
    import pandas as pd

    table = pd.read_parquet(prompts_parquet)
    # every column read is named when absent, with all the table has (a KeyError named only the column; the list
    # left out the first two columns, where a wrong table's own columns show)
    missing = [c for c in ("VolumeName", column, *(["split"] if splits else [])) if c not in table.columns]
    if missing:
        raise ValueError(f"{prompts_parquet} has no {', '.join(map(repr, missing))} column{'s' * (len(missing) > 1)}; "
                         f"it has {[str(c) for c in table.columns]}")
    if splits:
        absent = [s for s in splits if s not in set(table["split"])]
        if absent:  # a typo ("trian") fitted a vocabulary on no text, without a word
            raise ValueError(f"{prompts_parquet} has no {', '.join(map(repr, absent))} split; its splits are "
                             f"{sorted(map(str, table['split'].dropna().unique()))}")
        table = table[table["split"].isin(splits)]
    empty = ~table[column].map(lambda t: isinstance(t, str))
    if empty.any():  # the template needs a field these volumes' report/metadata lacks ("{sex}")
        log.warning("%s: %d volume(s) have no %r prompt (first: %s); left out of its texts", prompts_parquet,
                    int(empty.sum()), column, table.loc[empty, "VolumeName"].iloc[0])
        table = table[~empty]
    return {volume_key(name): text for name, text in zip(table["VolumeName"], table[column])}


def fit_text_tokenizer(prompts_parquet: str | Path, column: str | list[str], out_path: str | Path, vocab_size: int,
                       splits: list[str] | None = ("train",)) -> Path:
    """The small encoder's tokenizer, fitted on the training split's prompts (never on held-out text).

    ``column``: one prompt template, or several (the latent flow family reads the report sections,
    whose words the ``findings_impression`` template carries).
    """
    from ctgen.models.text_encoders import fit_text_tokenizer as fit

    columns = [column] if isinstance(column, str) else list(column)
    texts = sorted({t for c in columns for t in prompt_texts(prompts_parquet, c, list(splits) if splits else None).values()})
    fit(texts, vocab_size, out_path)
    log.info("fitted a %d-token vocabulary on %d distinct prompts", vocab_size, len(texts))
    return Path(out_path)


def embed_prompts(prompts_parquet: str | Path, column: str, encoder_cfg: dict, out_path: str | Path) -> Path:
    """A frozen encoder's states for every prompt of the cohort, computed once and cached."""
    from ctgen.data.text_cache import encode_prompts
    from ctgen.models.text_encoders import build_text_encoder, check_encoder_keys

    check_encoder_keys(encoder_cfg)
    encoder = build_text_encoder(encoder_cfg)
    if encoder is None:
        raise ValueError("text_encoder.kind 'small' is trained with the model: there is nothing to cache")
    return encode_prompts(encoder, prompt_texts(prompts_parquet, column), out_path)


SECTIONS = ("findings", "impression", "structured")  # the latent flow model's report segments


def section_texts(cohort_parquet: str | Path, prompts_parquet: str | Path) -> dict[str, str]:
    """{``<sample key>:<section>``: text} of every report: findings, impression (cohort), structured (prompts)."""
    import pandas as pd

    from ctprep.cohort import SECTIONS as COLUMNS

    cohort = pd.read_parquet(cohort_parquet)
    if "VolumeName" not in cohort.columns:
        raise ValueError(f"{cohort_parquet} is not a cohort table (ctprep cohort): it has no VolumeName column")
    raw = {name: col for col, name in COLUMNS.items()}  # the CT-RATE CSV's names, where a table keeps them
    if not {"findings", "impression", raw["findings"], raw["impression"]} & set(cohort.columns):
        # another table (the prompts table) cached an empty text for every section, without a word
        raise ValueError(f"{cohort_parquet} is not a cohort table (ctprep cohort): it has no findings or impression "
                         f"column; it has {[str(c) for c in cohort.columns]}")
    out = {}
    for row in cohort.to_dict("records"):
        key = volume_key(row["VolumeName"])
        for seg in ("findings", "impression"):
            text = row.get(seg, row.get(raw[seg], ""))
            out[f"{key}:{seg}"] = "" if is_blank_section(text) else text
    prompts = pd.read_parquet(prompts_parquet)
    if "structured" in prompts.columns and "VolumeName" not in prompts.columns:
        raise ValueError(f"{prompts_parquet} is not a prompts table (the prompts rule): it has no VolumeName column")
    if "structured" in prompts.columns:
        for name, text in zip(prompts["VolumeName"], prompts["structured"]):
            out[f"{volume_key(name)}:structured"] = text if isinstance(text, str) else ""
    return out


def embed_sections(cohort_parquet: str | Path, prompts_parquet: str | Path, encoder_cfg: dict, out_path: str | Path) -> Path:
    """A frozen encoder's states for every report section (the latent flow model's conditioning), cached."""
    from ctgen.data.text_cache import encode_prompts
    from ctgen.models.text_encoders import build_text_encoder, check_encoder_keys

    check_encoder_keys(encoder_cfg)
    encoder = build_text_encoder(encoder_cfg)
    if encoder is None:
        raise ValueError("text_encoder.kind 'small' is trained with the model: there is nothing to cache")
    return encode_prompts(encoder, section_texts(cohort_parquet, prompts_parquet), out_path)
