"""CLIP score between volume and text embeddings, and volume-to-volume similarity, per pair.

Per-pair scores (not only a mean) so that the evaluate rule keeps one row per volume and two runs
can be compared pair by pair with :func:`ctgen.metrics.permutation.paired_permutation_test`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (N, E) embeddings as float64 CPU tensors, shapes checked."""
    a, b = (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x, dtype=np.float64)) for x in (a, b))
    a, b = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"expected two (N, E) embeddings of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b


def cosine(a_emb, b_emb) -> np.ndarray:
    """(N, E), (N, E) -> (N,) cosine similarity of each row pair, in [-1, 1]."""
    a, b = _pair(a_emb, b_emb)
    return F.cosine_similarity(a, b, dim=1, eps=1e-12).numpy()


def clip_score(image_emb, text_emb) -> np.ndarray:
    """(N, E) volume embeddings, (N, E) embeddings of their prompts -> (N,) 100 * max(cos, 0).

    Scored for generated volumes against the prompt that produced them, and for the real volume
    of the same report as the ceiling. Embeddings need not be normalised.
    """
    return 100.0 * np.maximum(cosine(image_emb, text_emb), 0.0)


def image_similarity(a_emb, b_emb) -> np.ndarray:
    """(N, E), (N, E) volume embeddings (generated, real of the same report) -> (N,) cosine in [-1, 1]."""
    return cosine(a_emb, b_emb)
