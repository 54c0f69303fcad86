"""The text side's jobs: fit the small encoder's tokenizer on training prompts, cache a frozen encoder's states."""

from __future__ import annotations

import logging
from pathlib import Path

from ctprep.ctrate import volume_key

log = logging.getLogger(__name__)


def prompt_texts(prompts_parquet: str | Path, column: str, splits: list[str] | None = None) -> dict[str, str]:
    """{sample key: prompt} of the prompts table's ``column`` (a template name), optionally for ``splits`` only."""
    import pandas as pd

    table = pd.read_parquet(prompts_parquet)
    if column not in table.columns:
        raise ValueError(f"{prompts_parquet} has no prompt column {column!r}; it has {list(table.columns[2:])}")
    if splits:
        table = table[table["split"].isin(splits)]
    return {volume_key(name): text for name, text in zip(table["VolumeName"], table[column])}


def fit_text_tokenizer(prompts_parquet: str | Path, column: str, out_path: str | Path, vocab_size: int,
                       splits: list[str] | None = ("train",)) -> Path:
    """The small encoder's tokenizer, fitted on the training split's prompts (never on held-out text)."""
    from ctgen.models.text_encoders import fit_text_tokenizer as fit

    texts = sorted(set(prompt_texts(prompts_parquet, column, list(splits) if splits else None).values()))
    fit(texts, vocab_size, out_path)
    log.info("fitted a %d-token vocabulary on %d distinct prompts", vocab_size, len(texts))
    return Path(out_path)


def embed_prompts(prompts_parquet: str | Path, column: str, encoder_cfg: dict, out_path: str | Path) -> Path:
    """A frozen encoder's states for every prompt of the cohort, computed once and cached."""
    from ctgen.data.text_cache import encode_prompts
    from ctgen.models.text_encoders import build_text_encoder

    encoder = build_text_encoder(encoder_cfg)
    if encoder is None:
        raise ValueError("text_encoder.kind 'small' is trained with the model: there is nothing to cache")
    return encode_prompts(encoder, prompt_texts(prompts_parquet, column), out_path)
