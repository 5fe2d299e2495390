"""Ranking-quality metrics over impressions (docs/design.md §4): AUC and GAUC, pure numpy.

AUC is the Mann–Whitney statistic: the probability that a random positive outscores a random
negative, with tied scores counting one half (average ranks). GAUC averages per-user AUCs
weighted by each user's number of positives, skipping users with only one class — a global AUC
rewards a model for separating *users* (heavy vs light clickers); GAUC only for ordering each
user's own impressions, which is what a ranker is used for.
"""
from __future__ import annotations

import numpy as np


def _average_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks of `scores`, ties sharing the mean of the ranks they span."""
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # Start of each run of equal scores, and the run each sorted position belongs to.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    run = np.cumsum(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]) - 1
    ends = np.r_[starts[1:], len(scores)]  # exclusive
    mean_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = mean_rank[run]
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of `scores` for binary `labels` (0/1); NaN when only one class is present."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape} vs {s.shape}")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = _average_ranks(s)[y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(user_ids: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Σ_u pos_u · AUC_u / Σ_u pos_u over users with both classes; NaN when no user qualifies."""
    u = np.asarray(user_ids).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not (len(u) == len(y) == len(s)):
        raise ValueError(f"user_ids, labels and scores differ in length: {len(u)}, {len(y)}, {len(s)}")
    order = np.argsort(u, kind="mergesort")
    u, y, s = u[order], y[order], s[order]
    bounds = np.flatnonzero(np.r_[True, u[1:] != u[:-1], True])
    total, weight = 0.0, 0.0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        n_pos = int(y[lo:hi].sum())
        if 0 < n_pos < hi - lo:
            total += n_pos * auc(y[lo:hi], s[lo:hi])
            weight += n_pos
    return total / weight if weight else float("nan")
