"""Recall: FAISS top-N (default 200) over the artifact's index, excluding the user's history items.

The index is an inner-product index keyed by item id (`karma_ray.artifact.faiss_index.build_faiss`), so the
recall score is h·e_i (cosine; both are unit vectors). Payloads across the hop are compact: h in,
(ids int64, scores float32) out.

With the app's `recall_shards: S > 1` (serve_configs/*.yaml `args`), the index lives in S `RecallShard`
deployments (`RecallShard0`…), each loading only its shard file (`<artifact>/shards/<S>/index-<s>.faiss`,
written at export with `index.shards=S`); `Recall` then holds no index: it scatters h to every shard,
gathers their top-N (each already without the history items) and merges them exactly (`merge_topn`).
"""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from ray import serve

from karma_ray.artifact.faiss_index import SHARD_DIR, merge_topn, shard_path
from karma_ray.artifact.layout import MANIFEST, read_manifest, resolve, version
from karma_ray.artifact.reader import load_index
from karma_ray.serve.refresh import apply_refreshes
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
    refreshed: set[str] = field(default_factory=set)  # refresh files already added (karma_ray.serve.refresh)


def load_recall_state(artifact: str) -> RecallState:
    """The index alone (a lean replica: no model, no item table, no embeddings)."""
    p = resolve(artifact, ("manifest.json", "index.faiss"))
    return RecallState(load_index(p), version(read_manifest(p), p))


def load_shard_state(artifact: str, shard: int, shards: int) -> RecallState:
    """One shard's index alone; the artifact must have been exported with `index.shards=shards`."""
    import faiss

    p = resolve(artifact, (MANIFEST,))
    path = shard_path(p, shard, shards)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: export with `--set index.shards={shards}` "
                                f"(or serve with recall_shards: 1); the artifact has {_shard_counts(p)}")
    return RecallState(faiss.read_index(str(path)), version(read_manifest(p), p))


def _shard_counts(p) -> str:
    counts = sorted(d.name for d in (p / SHARD_DIR).iterdir()) if (p / SHARD_DIR).is_dir() else []
    return f"shards for S in {counts}" if counts else "no shard files"


def load_version(artifact: str) -> str:
    """What a scatter-gather Recall holds per artifact: its version only (the shards hold the index)."""
    p = resolve(artifact, (MANIFEST,))
    return version(read_manifest(p), p)


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
    """The recall stage the ingress calls: searches its own index, or (given shard handles) scatters to
    the RecallShard deployments and merges their top-N."""

    def __init__(self, artifact: str, shards: Sequence[Any] = ()):
        self.top_n = DEFAULT_TOP_N
        self.shards = list(shards)
        self.versions = HeldVersions(load_version if self.shards else load_recall_state, artifact)

    def reconfigure(self, cfg: dict[str, Any]) -> None:
        self.top_n = int(cfg.get("top_n", DEFAULT_TOP_N))
        if self.shards:  # the shards take their own user_config (nprobe, refresh, …)
            self.versions.hold(cfg.get("artifacts"))
            return
        configure_index_replica(self.versions, cfg, lambda ids: np.ones(len(ids), bool))

    async def search(self, artifact: str, h: np.ndarray, exclude: list[int], at_least: int = 0
                     ) -> tuple[np.ndarray, np.ndarray, str]:
        """(ids, h·e scores, version) of the top max(top_n, at_least) items not in `exclude`, best first."""
        n = max(self.top_n, int(at_least))
        if not self.shards:
            state = self.versions.get(artifact)
            ids, scores = recall_topn(state.index, h, exclude, n)
            return ids, scores, state.version
        parts = await asyncio.gather(*(s.search.remote(artifact, h, exclude, n) for s in self.shards))
        ids, scores = merge_topn(parts, n)
        return ids, scores, self.versions.get(artifact)

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and replaces it."""
        for _, state in self.versions.items():
            if not self.shards:
                check_index(state)

    async def info(self) -> dict[str, Any]:
        if self.shards:
            return {"pid": os.getpid(), "top_n": self.top_n, "shards": len(self.shards),
                    "versions": dict(self.versions.items())}
        return {"pid": os.getpid(), "top_n": self.top_n,
                "versions": {k: s.version for k, s in self.versions.items()},
                "ntotal": {k: int(s.index.ntotal) for k, s in self.versions.items()}}


@serve.deployment
class RecallShard:
    """Shard `shard` of `shards`: the top-N of the items with `id % shards == shard` (ids global)."""

    def __init__(self, artifact: str, shard: int, shards: int):
        self.shard, self.n_shards = int(shard), int(shards)
        self.versions = HeldVersions(lambda a: load_shard_state(a, self.shard, self.n_shards), artifact)

    def reconfigure(self, cfg: dict[str, Any]) -> None:
        from karma_ray.artifact.faiss_index import shard_of

        configure_index_replica(self.versions, cfg, lambda ids: shard_of(ids, self.n_shards) == self.shard)

    async def search(self, artifact: str, h: np.ndarray, exclude: list[int], n: int) -> tuple[np.ndarray, np.ndarray]:
        return recall_topn(self.versions.get(artifact).index, h, exclude, n)

    def check_health(self) -> None:
        for _, state in self.versions.items():
            check_index(state)

    async def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "shard": self.shard, "shards": self.n_shards,
                "versions": {k: s.version for k, s in self.versions.items()},
                "ntotal": {k: int(s.index.ntotal) for k, s in self.versions.items()}}


def configure_index_replica(versions: HeldVersions[RecallState], cfg: dict[str, Any], mine) -> None:
    """user_config of a replica that holds an index: threads, versions, search knobs, hot refreshes
    (`mine(ids)` says which refreshed items belong in this replica's index)."""
    import faiss

    faiss.omp_set_num_threads(int(cfg.get("faiss_threads", 1)))
    versions.hold(cfg.get("artifacts"))
    for _, state in versions.items():
        set_search_knobs(state.index, cfg)
        apply_refreshes(state, cfg.get("refresh") or [], mine)


def set_search_knobs(index, cfg: dict[str, Any]) -> None:
    """IVF `nprobe` / HNSW `ef_search` / the re-rank depth `k_factor` (ivf_pq_refine) from the user_config,
    where the index has them."""
    from karma_ray.artifact.faiss_index import set_search_knobs as set_knobs

    set_knobs(index, nprobe=cfg.get("nprobe"), ef_search=cfg.get("ef_search"), k_factor=cfg.get("k_factor"))
