"""Text for a batch of sample keys: a frozen encoder's cached states, or token ids for a trainable encoder."""

from __future__ import annotations

import torch


class TextConditioning:
    """``text(keys)`` -> {"text", "text_mask"} (cached frozen-encoder states) or {"text_ids", "text_mask"}."""

    def __init__(self, prompts: dict[str, str] | None = None, cache_path: str | None = None, tokenizer_path: str | None = None,
                 max_length: int = 128):
        if (cache_path is None) == (tokenizer_path is None):
            raise ValueError("give exactly one of a text embedding cache or a text tokenizer")
        self.prompts = prompts or {}
        self.max_length = max_length
        self.cache = self.tokenizer = None
        if cache_path:
            from ctgen.data.text_cache import EmbeddingCache

            self.cache = EmbeddingCache(cache_path)
        else:
            from ctgen.models.text_encoders import ReportTokenizer

            self.tokenizer = ReportTokenizer.load(tokenizer_path)

    def __call__(self, keys: list[str], prompts: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Cached states by key, or token ids of ``prompts`` (default: the prompts given at construction)."""
        if self.cache is not None:
            enc = self.cache.batch(keys)
            return {"text": enc.hidden, "text_mask": enc.mask}
        texts = prompts if prompts is not None else [self.prompts[k] for k in keys]
        ids, mask = self.tokenizer.encode_batch(texts, self.max_length)
        return {"text_ids": ids, "text_mask": mask}
