"""Recall: FAISS top-N (default 200) over the artifact's index, excluding the user's history items.

The index is an inner-product index keyed by item id (`karma_ray.artifact.faiss_index.build_faiss`), so the
recall score is h·e_i (cosine; both are unit vectors). Payloads across the hop are compact: h in,
(ids int64, scores float32) out.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from ray import serve

DEFAULT_TOP_N = 200


def recall_topn(index, h: np.ndarray, exclude: Sequence[int], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-n item ids and scores for one h, with `exclude` ids removed (ids, not rows, as in the index).

    Searches n + |exclude| deep so that removing history items still leaves n results when the
    catalogue has them.
    """
    ntotal = int(index.ntotal)
    n = max(0, min(int(n), ntotal))
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    excl = np.unique(np.asarray(list(exclude), dtype=np.int64))
    depth = min(ntotal, n + len(excl))
    q = np.ascontiguousarray(np.asarray(h, dtype=np.float32).reshape(1, -1))
    scores, ids = index.search(q, depth)
    scores, ids = scores[0], ids[0].astype(np.int64)
    keep = ids >= 0  # FAISS pads with -1 when it finds fewer than depth
    if len(excl):
        keep &= ~np.isin(ids, excl)
    return ids[keep][:n], scores[keep][:n].astype(np.float32)


# Methods are `async def` on purpose: the work is sub-millisecond, and Serve would run a sync method
# in its thread pool (one more thread hand-off per call).
@serve.deployment
class Recall:
    def __init__(self, artifact: str, top_n: int = DEFAULT_TOP_N):
        import faiss

        from karma_ray.serve.catalog import resolve_artifact

        p = resolve_artifact(artifact)
        self.index = faiss.read_index(str(p / "index.faiss"))
        self.top_n = int(top_n)
        self.reconfigure({})

    def reconfigure(self, cfg: dict[str, Any]) -> None:
        import faiss

        self.top_n = int(cfg.get("top_n", self.top_n))
        faiss.omp_set_num_threads(int(cfg.get("faiss_threads", 1)))
        if "nprobe" in cfg or "ef_search" in cfg:  # IVF / HNSW search-time knobs
            base = faiss.downcast_index(self.index.index) if hasattr(self.index, "index") else self.index
            if hasattr(base, "nprobe") and "nprobe" in cfg:
                base.nprobe = int(cfg["nprobe"])
            if hasattr(base, "hnsw") and "ef_search" in cfg:
                base.hnsw.efSearch = int(cfg["ef_search"])

    async def search(self, h: np.ndarray, exclude: list[int], at_least: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(ids, h·e scores) of the top max(top_n, at_least) items not in `exclude`, best first."""
        return recall_topn(self.index, h, exclude, max(self.top_n, int(at_least)))

    async def ntotal(self) -> int:
        return int(self.index.ntotal)


def app(args: dict[str, str] | None = None):
    """`serve run karma_ray.serve.recall:app artifact=DIR` — recall alone."""
    from karma_ray.serve.app import default_artifact

    return Recall.bind((args or {}).get("artifact") or default_artifact())
