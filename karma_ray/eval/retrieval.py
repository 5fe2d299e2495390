"""Full-catalogue retrieval metrics (docs/design.md §4): HR@K and NDCG@K with the user's history excluded."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def exclude_and_cut(ids: np.ndarray, scores: np.ndarray, exclude: Sequence[Sequence[int]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop each row's excluded ids (its earlier history), keep the first k. Pads with -1."""
    out_ids = np.full((len(ids), k), -1, np.int64)
    out_sc = np.full((len(ids), k), -np.inf, np.float32)
    for r in range(len(ids)):
        keep = ~np.isin(ids[r], np.asarray(list(exclude[r]), np.int64)) & (ids[r] >= 0)
        row_ids, row_sc = ids[r][keep][:k], scores[r][keep][:k]
        out_ids[r, : len(row_ids)], out_sc[r, : len(row_sc)] = row_ids, row_sc
    return out_ids, out_sc


def target_ranks(topk: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based rank of each target in its row, or 0 when it is not in the top-K."""
    hit = topk == np.asarray(targets)[:, None]  # (n, K)
    return np.where(hit.any(1), hit.argmax(1) + 1, 0)


def hit_rate(ranks: np.ndarray, k: int) -> float:
    return float(((ranks > 0) & (ranks <= k)).mean()) if len(ranks) else float("nan")


def ndcg(ranks: np.ndarray, k: int) -> float:
    """One relevant item per event, so NDCG@K = 1/log2(rank+1) when rank <= K, else 0."""
    if not len(ranks):
        return float("nan")
    gain = np.where((ranks > 0) & (ranks <= k), 1.0 / np.log2(ranks + 1.0, where=ranks > 0, out=np.ones(len(ranks))), 0.0)
    return float(gain.mean())


def retrieval_metrics(ranks: np.ndarray, ks: Sequence[int] = (10, 50), prefix: str = "") -> dict[str, float]:
    out = {f"{prefix}hr@{k}": hit_rate(ranks, k) for k in ks}
    out.update({f"{prefix}ndcg@{k}": ndcg(ranks, k) for k in ks})
    out[f"{prefix}n"] = int(len(ranks))
    return out
