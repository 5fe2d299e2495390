"""Uncertainty for retrieval metrics: cluster bootstraps and paired differences (docs/design.md §4).

Events are not independent: a warm test set has one event per user, but a cold set has thousands of
events on a hundred-odd items, a third of them on ten items. Resampling events then understates the
spread, so every interval here resamples *clusters* (users on warm sets, items on cold sets), and a
comparison of two arms resamples seeds too and pairs the arms within each (seed, event).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def hits_at(ranks: Sequence[int], k: int) -> np.ndarray:
    """1.0 where the 1-based rank is within the top k (rank 0 = not ranked = a miss)."""
    r = np.asarray(ranks)
    return ((r > 0) & (r <= k)).astype(np.float64)


def _cluster_index(clusters: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    ids, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(ids)))[:-1]
    return ids, np.split(order, bounds)


def cluster_bootstrap_ci(values: np.ndarray, clusters: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0,
                         alpha: float = 0.05) -> tuple[float, float]:
    """Percentile (1−α) interval of the mean of per-event `values`, resampling whole clusters.

    Each replicate draws as many clusters as there are, with replacement, and averages every event of
    the drawn clusters. With `clusters=None` each event is its own cluster (the plain bootstrap).
    """
    values = np.asarray(values, np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    if clusters is None:
        clusters = np.arange(len(values))
    _, members = _cluster_index(clusters)
    sums = np.array([values[m].sum() for m in members])
    sizes = np.array([len(m) for m in members], np.float64)
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(members), size=(n_boot, len(members)))
    boots = sums[draw].sum(1) / sizes[draw].sum(1)
    return float(np.quantile(boots, alpha / 2)), float(np.quantile(boots, 1 - alpha / 2))


def paired_difference(a: np.ndarray, b: np.ndarray, clusters: np.ndarray, n_boot: int = 1000, seed: int = 0,
                      alpha: float = 0.05) -> dict[str, float | list[float]]:
    """Mean of a − b with a hierarchical bootstrap interval, paired by seed and event.

    `a` and `b` are (n_seeds, n_events) per-event values of two arms (seed s of each arm trained with
    the same seed), on the same events in the same order. Each replicate resamples seeds, then clusters,
    with replacement, and averages a − b over the drawn (seed, event) pairs.
    """
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    if a.shape != b.shape:
        raise ValueError(f"paired arms need the same (seeds, events) shape, got {a.shape} and {b.shape}")
    d = a - b  # (S, E)
    _, members = _cluster_index(clusters)
    sums = np.stack([d[:, m].sum(1) for m in members], axis=1)  # (S, C)
    sizes = np.array([len(m) for m in members], np.float64)
    rng = np.random.default_rng(seed)
    S, C = sums.shape
    boots = np.empty(n_boot)
    for i in range(n_boot):
        s = rng.integers(0, S, size=S)
        c = rng.integers(0, C, size=C)
        boots[i] = sums[s][:, c].sum() / (sizes[c].sum() * S)
    return {"diff": float(d.mean()), "ci": [float(np.quantile(boots, alpha / 2)), float(np.quantile(boots, 1 - alpha / 2))],
            "n_seeds": int(S), "n_events": int(d.shape[1]), "n_clusters": int(C)}
