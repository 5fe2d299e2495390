"""Recall: FAISS top-N (default 200) over the artifact's index, excluding the user's history items.

The index is an inner-product index keyed by item id (`karma_ray.artifact.faiss_index.build_faiss`), so the
recall score is h·e_i (cosine; both are unit vectors). Payloads across the hop are compact: h in,
(ids int64, scores float32) out.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from ray import serve

from karma_ray.artifact.layout import read_manifest, resolve, version
from karma_ray.artifact.reader import load_index
from karma_ray.serve.versions import HeldVersions

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


@dataclass
class RecallState:
    index: Any  # faiss.Index keyed by item id
    version: str


def load_recall_state(artifact: str) -> RecallState:
    """The index alone (a lean replica: no model, no item table, no embeddings)."""
    p = resolve(artifact, ("manifest.json", "index.faiss"))
    return RecallState(load_index(p), version(read_manifest(p), p))


def check_index(state: RecallState) -> None:
    """Raise unless the index can answer: loaded, non-empty, version known."""
    if state.index is None or int(state.index.ntotal) == 0:
        raise RuntimeError(f"recall index of version {state.version!r} is missing or empty")
    if not state.version:
        raise RuntimeError("recall index has no version")


# Methods are `async def` on purpose: the work is sub-millisecond, and Serve would run a sync method
# in its thread pool (one more thread hand-off per call).
@serve.deployment
class Recall:
    def __init__(self, artifact: str):
        self.top_n = DEFAULT_TOP_N
        self.versions = HeldVersions(load_recall_state, artifact)

    def reconfigure(self, cfg: dict[str, Any]) -> None:
        import faiss

        self.top_n = int(cfg.get("top_n", DEFAULT_TOP_N))
        faiss.omp_set_num_threads(int(cfg.get("faiss_threads", 1)))
        self.versions.hold(cfg.get("artifacts"))
        for _, state in self.versions.items():
            set_search_knobs(state.index, cfg)

    async def search(self, artifact: str, h: np.ndarray, exclude: list[int], at_least: int = 0
                     ) -> tuple[np.ndarray, np.ndarray, str]:
        """(ids, h·e scores, version) of the top max(top_n, at_least) items not in `exclude`, best first."""
        state = self.versions.get(artifact)
        ids, scores = recall_topn(state.index, h, exclude, max(self.top_n, int(at_least)))
        return ids, scores, state.version

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and replaces it."""
        for _, state in self.versions.items():
            check_index(state)

    async def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "top_n": self.top_n,
                "versions": {k: s.version for k, s in self.versions.items()},
                "ntotal": {k: int(s.index.ntotal) for k, s in self.versions.items()}}


def set_search_knobs(index, cfg: dict[str, Any]) -> None:
    """IVF `nprobe` / HNSW `ef_search` from the user_config, where the index has them."""
    import faiss

    if "nprobe" in cfg or "ef_search" in cfg:
        base = faiss.downcast_index(index.index) if hasattr(index, "index") else index
        if hasattr(base, "nprobe") and "nprobe" in cfg:
            base.nprobe = int(cfg["nprobe"])
        if hasattr(base, "hnsw") and "ef_search" in cfg:
            base.hnsw.efSearch = int(cfg["ef_search"])
