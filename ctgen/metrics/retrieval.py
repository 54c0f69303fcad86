"""Text retrieval from volumes: can a volume's own report be found among all the evaluation reports?

The CLIP score is a raw cosine (times 100): its scale depends on the model and its temperature,
so 23.4 says nothing by itself. Retrieval reads directly: each volume's embedding ranks every
candidate report by cosine; top-k accuracy is the share of volumes whose own report is among the
first k, against a chance level of k / M for M candidates.

Identical report texts (templated prompts: "no acute findings") are one candidate, so a volume is
never counted wrong for picking a word-for-word copy of its report, and M counts distinct texts.
A volume tied with other candidates ranks behind all of them (a constant embedding scores chance,
not 100%).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ctgen.metrics.summary import MetricValue, join_flags, mean_with_ci


def distinct_texts(texts: list[str]) -> tuple[list[str], np.ndarray]:
    """(the distinct texts in first-seen order, index (N,) of each input text among them)."""
    order: dict[str, int] = {}
    index = np.array([order.setdefault(t, len(order)) for t in texts], dtype=np.int64)
    return list(order), index


def retrieval_ranks(image_emb, text_emb, target) -> np.ndarray:
    """image_emb (N, E), candidate text_emb (M, E), target (N,) index of each volume's own text -> rank (N,), 1 = first.

    Memory: the (N, M) similarity matrix, in blocks of 1024 volumes.
    """
    img = F.normalize(torch.as_tensor(np.asarray(image_emb), dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.as_tensor(np.asarray(text_emb), dtype=torch.float64), dim=-1)
    target = torch.as_tensor(np.asarray(target), dtype=torch.long)
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1] or target.shape != (img.shape[0],):
        raise ValueError(f"expected (N, E), (M, E), (N,), got {tuple(img.shape)}, {tuple(txt.shape)}, {tuple(target.shape)}")
    if len(target) and (target.min() < 0 or target.max() >= txt.shape[0]):
        raise ValueError(f"target indices must lie in [0, {txt.shape[0]})")
    ranks = []
    for start in range(0, img.shape[0], 1024):
        sims = img[start:start + 1024] @ txt.T  # (n, M)
        own = sims.gather(1, target[start:start + 1024, None])  # (n, 1)
        ranks.append((sims >= own).sum(dim=1))  # itself and every candidate at least as close
    return torch.cat(ranks).numpy() if ranks else np.zeros(0, np.int64)


def top_k_accuracy(ranks, k: int, n_candidates: int, name: str, **kw) -> MetricValue:
    """Share of volumes whose own report ranks in the first ``k`` of ``n_candidates``, with its CI
    over volumes and the chance level ``k / n_candidates`` in ``extra``."""
    if n_candidates < 1 or k < 1:
        raise ValueError(f"need k >= 1 and n_candidates >= 1, got {k}, {n_candidates}")
    hits = (np.asarray(ranks) <= k).astype(np.float64)
    m = mean_with_ci(hits, name, **kw)
    m.extra.update(k=k, n_candidates=n_candidates, chance=min(k / n_candidates, 1.0))
    if k >= n_candidates:
        m.flag = join_flags(f"k = {k} >= {n_candidates} candidate reports: every volume is a hit", m.flag)
    return m
