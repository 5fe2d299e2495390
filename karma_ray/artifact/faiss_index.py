"""Item embeddings -> FAISS inner-product indexes keyed by item id: one index, or S shards with global ids.

Embeddings are unit vectors, so inner product = cosine. Every index is an `IndexIDMap2` over the kind
`IndexConfig.kind` names, so search returns item ids (never rows) and items can be added later
(`add_items`, the hot refresh) without renumbering. A sharded catalogue puts item `i` in shard
`i % S`: any new id has one home, and each shard's top-N merged by score (`merge_topn`) is exactly the
unsharded top-N when the shards are exact (flat), because every global top-N item is in its shard's top-N.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from karma_ray.config import IndexConfig

MIN_POINTS_PER_CELL = 39  # FAISS warns below this many training points per IVF cell
TRAIN_POINTS_PER_CELL = 40  # k-means sample per cell, just above FAISS's minimum: the sample sets the training cost
KMEANS_ITERS = 15  # FAISS default 25; fewer keeps a 1M-item IVF build to minutes on 2 cores (recall: benchmarks/recall_scale.py)
SHARD_DIR = "shards"  # <artifact>/shards/<S>/index-<i>.faiss


def build_faiss(item_emb: np.ndarray, item_ids: np.ndarray, cfg: IndexConfig, seed: int = 0) -> faiss.Index:
    """One index of `cfg.kind` over all items, keyed by item id (search knobs set from `cfg`)."""
    emb = np.ascontiguousarray(item_emb, dtype=np.float32)
    base = _empty_index(emb.shape[1], len(emb), cfg)
    if not base.is_trained:
        base.train(_training_sample(emb, base, seed))
    index = faiss.IndexIDMap2(base)
    index.add_with_ids(emb, np.asarray(item_ids, dtype=np.int64))
    return index


def _empty_index(d: int, n: int, cfg: IndexConfig) -> faiss.Index:
    ip = faiss.METRIC_INNER_PRODUCT
    if cfg.kind == "hnsw":
        base = faiss.IndexHNSWFlat(d, cfg.hnsw_m, ip)
        base.hnsw.efConstruction, base.hnsw.efSearch = cfg.hnsw_ef_construction, cfg.hnsw_ef_search
        return base
    if cfg.kind == "flat":
        return faiss.IndexFlatIP(d)
    nlist = max(1, min(cfg.nlist, n // MIN_POINTS_PER_CELL))
    if cfg.kind == "ivf_flat":
        base = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, ip)
    else:
        if d % cfg.pq_m:
            raise ValueError(f"index.pq_m={cfg.pq_m} must divide the embedding size {d}")
        base = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, cfg.pq_m, cfg.pq_bits, ip)
    base.nprobe = min(cfg.nprobe, nlist)
    base.cp.niter = KMEANS_ITERS
    return base


def _training_sample(emb: np.ndarray, base: faiss.Index, seed: int) -> np.ndarray:
    nlist = getattr(base, "nlist", 1)
    cap = max(TRAIN_POINTS_PER_CELL * nlist, 256 * 64)  # PQ codebooks want >= 256 points per code too
    if len(emb) <= cap:
        return emb
    rows = np.sort(np.random.default_rng(seed).choice(len(emb), cap, replace=False))
    return emb[rows]


def shard_of(item_ids: np.ndarray, shards: int) -> np.ndarray:
    """The shard that holds each item: `id % shards` (stable for ids added later)."""
    return np.asarray(item_ids, dtype=np.int64) % int(shards)


def build_shards(item_emb: np.ndarray, item_ids: np.ndarray, cfg: IndexConfig, shards: int) -> list[faiss.Index]:
    """`shards` indexes of `cfg.kind`, shard s holding the items with `id % shards == s` (ids global).
    IVF shards get `nlist / shards` cells and `nprobe / shards` probes each: the same share of the
    catalogue is scanned per query as unsharded, split over the shards."""
    ids = np.asarray(item_ids, dtype=np.int64)
    where = shard_of(ids, shards)
    per = IndexConfig(**{**cfg.__dict__, "nlist": max(1, cfg.nlist // shards), "nprobe": max(1, cfg.nprobe // shards)})
    return [build_faiss(item_emb[where == s], ids[where == s], per, seed=s) for s in range(shards)]


def merge_topn(parts: Sequence[tuple[np.ndarray, np.ndarray]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact merge of per-shard (ids, scores) lists into the global top-n by score (ties: lower id first)."""
    ids = np.concatenate([np.asarray(p[0], dtype=np.int64) for p in parts]) if parts else np.zeros(0, np.int64)
    scores = np.concatenate([np.asarray(p[1], dtype=np.float32) for p in parts]) if parts else np.zeros(0, np.float32)
    order = np.lexsort((ids, -scores))[: max(0, int(n))]
    return ids[order], scores[order]


class ShardedIndex:
    """S shard indexes searched one after another in-process and merged: the same answer the RecallShard
    deployments give over the network (benchmarks and tests use it; `recall_topn` accepts it)."""

    def __init__(self, shards: Sequence[faiss.Index]):
        self.shards = list(shards)

    @property
    def ntotal(self) -> int:
        return sum(int(s.ntotal) for s in self.shards)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's shape: (scores, ids), each (nq, k), -1 / -inf padded."""
        per = [s.search(q, min(int(k), int(s.ntotal))) if s.ntotal else None for s in self.shards]
        scores = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        for row in range(len(q)):
            parts = [(i[row][i[row] >= 0], d[row][i[row] >= 0]) for d, i in (p for p in per if p is not None)]
            top_ids, top_scores = merge_topn(parts, k)
            ids[row, : len(top_ids)], scores[row, : len(top_ids)] = top_ids, top_scores
        return scores, ids


def add_items(index, item_emb: np.ndarray, item_ids: np.ndarray) -> None:
    """Add (or, for ids already there, replace) items without rebuilding: IVF cells and HNSW graphs
    take new points as they are; a ShardedIndex routes each id to its shard."""
    emb = np.ascontiguousarray(item_emb, dtype=np.float32)
    ids = np.asarray(item_ids, dtype=np.int64)
    if isinstance(index, ShardedIndex):
        where = shard_of(ids, len(index.shards))
        for s, shard in enumerate(index.shards):
            if (where == s).any():
                add_items(shard, emb[where == s], ids[where == s])
        return
    if not isinstance(faiss.downcast_index(index.index), faiss.IndexHNSW):  # HNSW cannot remove
        index.remove_ids(ids)
    index.add_with_ids(emb, ids)


def index_bytes(index: faiss.Index) -> int:
    """Bytes the index takes serialised (≈ its memory: codes, ids, cells or graph)."""
    fd, path = tempfile.mkstemp(suffix=".faiss")
    os.close(fd)
    try:
        faiss.write_index(index, path)
        return os.path.getsize(path)
    finally:
        os.unlink(path)


def shard_path(artifact_dir: str | Path, shard: int, shards: int) -> Path:
    """Where shard `shard` of `shards` lives in an artifact version (written by `write_artifact`)."""
    return Path(artifact_dir) / SHARD_DIR / str(int(shards)) / f"index-{int(shard)}.faiss"
