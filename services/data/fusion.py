"""Combining retrieval scores: rank fusion, normalised score fusion, neighbour spreading."""

from __future__ import annotations

import numpy as np


def ranks(scores: np.ndarray) -> np.ndarray:
    """0-based rank of each item (0 = best); ties keep index order."""
    order = np.argsort(-scores, kind="stable")
    out = np.empty(len(scores), dtype=np.int64)
    out[order] = np.arange(len(scores))
    return out


def rrf(score_lists: list[np.ndarray], k: float = 60.0,
        weights: list[float] | None = None) -> np.ndarray:
    """Reciprocal rank fusion: sum of w / (k + rank + 1) over the lists."""
    weights = weights or [1.0] * len(score_lists)
    total = np.zeros(len(score_lists[0]), dtype=np.float64)
    for scores, w in zip(score_lists, weights):
        total += w / (k + ranks(scores) + 1.0)
    return total


def zscore(scores: np.ndarray) -> np.ndarray:
    """Centred on the mean, in standard deviations; all zeros when the scores are flat."""
    scores = np.asarray(scores, dtype=np.float64)
    std = scores.std()
    return (scores - scores.mean()) / std if std > 1e-12 else np.zeros_like(scores)


def minmax(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return scores
    lo, hi = scores.min(), scores.max()
    return (scores - lo) / (hi - lo) if hi - lo > 1e-12 else np.zeros_like(scores)


def weighted(score_lists: list[np.ndarray], weights: list[float], norm=zscore) -> np.ndarray:
    """Normalise each list, then a weighted sum: keeps how far ahead a hit is, unlike RRF."""
    total = np.zeros(len(score_lists[0]), dtype=np.float64)
    for scores, w in zip(score_lists, weights):
        total += w * norm(scores)
    return total


def spread(scores: np.ndarray, group: np.ndarray, share: float,
           reply_share: float | None = None) -> np.ndarray:
    """Each item moves `share` of the way to a better neighbour's score (same group only): a
    reply, or the question before it, often holds the answer the matching turn points at.
    `reply_share` (default: share) is for the item after the better one."""
    reply_share = share if reply_share is None else reply_share
    out = scores.copy()
    if len(scores) < 2:
        return out
    same = group[1:] == group[:-1]
    from_prev = np.where(same, scores[:-1], -np.inf)
    from_next = np.where(same, scores[1:], -np.inf)
    if reply_share > 0:
        out[1:] = np.maximum(out[1:], reply_share * from_prev + (1 - reply_share) * scores[1:])
    if share > 0:
        out[:-1] = np.maximum(out[:-1], share * from_next + (1 - share) * scores[:-1])
    return out

