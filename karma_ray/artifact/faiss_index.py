"""Item embeddings -> FAISS inner-product indexes keyed by item id: one index, or S shards with global ids.

Embeddings are unit vectors, so inner product = cosine. Every index is an `IndexIDMap2` over the kind
`IndexConfig.kind` names, so search returns item ids (never rows) and items can be added later
(`add_items`, the hot refresh) without renumbering. A sharded catalogue puts item `i` in shard
`i % S`: any new id has one home, and each shard's top-N merged by score (`merge_topn`) is exactly the
unsharded top-N when the shards are exact (flat), because every global top-N item is in its shard's top-N.

`ivf_pq_refine` is FAISS's standard large-catalogue recipe (`index_factory(d, "IVF{nlist},PQ{m}x4fs,RFlat")`):
an IVF-PQ first pass (fast-scan when `pq_bits` is 4) ranks the probed cells by compressed codes, and an
`IndexRefineFlat` re-scores its top k·`refine_k_factor` exactly against the float vectors it also keeps.
It costs the float vectors plus the codes in memory, and scans codes instead of vectors.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from karma_ray.config import IndexConfig
from karma_ray.data.catalog import ItemCatalog
from karma_ray.data.events import sample_rows

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


class IndexCannotReplace(ValueError):
    """An item id is already in an index whose kind cannot remove items (FAISS HNSW)."""


NO_REMOVE_KINDS = ("hnsw",)  # FAISS HNSW graphs cannot remove a node: a re-embedded item cannot replace its old vector


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
        if cfg.kind == "ivf_pq_refine" and cfg.pq_bits == 4:
            base = faiss.IndexIVFPQFastScan(faiss.IndexFlatIP(d), d, nlist, cfg.pq_m, 4, ip)
        else:
            base = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, cfg.pq_m, cfg.pq_bits, ip)
    base.nprobe = min(cfg.nprobe, nlist)
    base.cp.niter = KMEANS_ITERS
    if cfg.kind == "ivf_pq_refine":
        refine = faiss.IndexRefineFlat(base)  # keeps the float vectors; is trained when `base` is
        refine.k_factor = float(cfg.refine_k_factor)
        return refine
    return base


def core_index(index: faiss.Index) -> faiss.Index:
    """The searching index under the id map and the exact re-rank: IndexFlat, IndexIVF… or IndexHNSW…."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.downcast_index(index.index)
    if isinstance(index, faiss.IndexRefine):
        index = faiss.downcast_index(index.base_index)
    return index


def set_search_knobs(index, nprobe: int | None = None, ef_search: int | None = None,
                     k_factor: float | None = None) -> None:
    """IVF probes, HNSW ef_search and the re-rank depth of an index or of every shard, where it has them."""
    for part in (index.shards if isinstance(index, ShardedIndex) else [index]):
        core = core_index(part)
        if nprobe is not None and hasattr(core, "nprobe"):
            core.nprobe = int(nprobe)
        if ef_search is not None and hasattr(core, "hnsw"):
            core.hnsw.efSearch = int(ef_search)
        outer = faiss.downcast_index(part.index) if hasattr(part, "index") else part
        if k_factor is not None and isinstance(outer, faiss.IndexRefine):
            outer.k_factor = float(k_factor)


def _training_sample(emb: np.ndarray, base: faiss.Index, seed: int) -> np.ndarray:
    nlist = getattr(core_index(base), "nlist", 1)
    cap = max(TRAIN_POINTS_PER_CELL * nlist, 256 * 64)  # PQ codebooks want >= 256 points per code too
    return emb if len(emb) <= cap else emb[sample_rows(len(emb), cap, seed)]


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
    """Add items without rebuilding; an id already there gets its new vector in place of the old one
    (the last row of an id repeated in the batch wins). A ShardedIndex routes each id to its shard.

    Flat renumbers on removal, so its old rows are removed and re-added. IVF lists do not renumber, so an
    IVF core (ivf_flat, ivf_pq, ivf_pq_refine) keeps each replaced item's row in the id map: the row leaves
    its IVF cell and re-enters the cell of the new vector under the same row number (the re-rank's float
    copy is overwritten in place). HNSW cannot remove a node: a batch with an id already in an HNSW index
    raises IndexCannotReplace before anything is added (see `check_replaceable`)."""
    emb = np.ascontiguousarray(item_emb, dtype=np.float32)
    ids = np.asarray(item_ids, dtype=np.int64)
    if isinstance(index, ShardedIndex):
        where = shard_of(ids, len(index.shards))
        for s, shard in enumerate(index.shards):  # checked for every shard first: all or nothing
            if (where == s).any() and isinstance(core_index(shard), faiss.IndexHNSW):
                _refuse_present(shard, ids[where == s])
        for s, shard in enumerate(index.shards):
            if (where == s).any():
                add_items(shard, emb[where == s], ids[where == s])
        return
    last = len(ids) - 1 - np.unique(ids[::-1], return_index=True)[1]  # the last row of every distinct id
    emb, ids = emb[np.sort(last)], ids[np.sort(last)]
    core = core_index(index)
    if isinstance(core, faiss.IndexHNSW):
        _refuse_present(index, ids)
    elif isinstance(core, faiss.IndexIVF):
        id_map = faiss.vector_to_array(index.id_map)
        old = np.isin(ids, id_map)
        if old.any():
            rows = _rows_of(id_map, ids[old])
            outer = faiss.downcast_index(index.index)
            if isinstance(outer, faiss.IndexRefine):  # the exact copy first: the fast-scan path re-encodes from it
                vectors = faiss.rev_swig_ptr(faiss.downcast_index(outer.refine_index).get_xb(), outer.ntotal * outer.d)
                vectors = vectors.reshape(-1, outer.d)
                vectors[rows] = emb[old]
            if isinstance(core, faiss.IndexIVFFastScan):
                _reencode_lists(core, vectors, rows)
            else:
                core.remove_ids(faiss.IDSelectorBatch(rows))
                core.add_with_ids(emb[old], rows)
            emb, ids = emb[~old], ids[~old]
    else:
        index.remove_ids(ids)
    if len(ids):
        index.add_with_ids(emb, ids)


def _reencode_lists(core, vectors: np.ndarray, rows: np.ndarray) -> None:
    """Fast-scan lists pack codes in blocks, and FAISS's remove_ids leaves them inconsistent (1.15: removed
    and re-added rows are then not found). So every list that holds a replaced row is emptied and its rows
    re-encoded from the re-rank's float copy (already updated): the others land in the same list with the
    same codes, the replaced rows in their new vectors' lists. Costs ~ntotal/nlist encodes per row."""
    invlists = core.invlists
    held, affected = [], []
    for lst in range(core.nlist):
        size = invlists.list_size(lst)
        if size:
            labels = faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy()
            if np.isin(labels, rows).any():
                held.append(labels)
                affected.append(lst)
    for lst in affected:
        invlists.resize(lst, 0)
    again = np.concatenate(held) if held else np.zeros(0, np.int64)
    core.ntotal = core.ntotal - len(again)
    core.add_with_ids(np.ascontiguousarray(vectors[again]), again)


def _rows_of(id_map: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions in the id map (the index's labels, in the order they were added) that hold `ids`."""
    order = np.argsort(id_map, kind="stable")
    return order[ItemCatalog.of_ids(id_map[order]).rows_of(ids)].astype(np.int64)


def _refuse_present(index, ids: np.ndarray) -> None:
    present = ids[np.isin(ids, faiss.vector_to_array(index.id_map))]
    if len(present):
        raise IndexCannotReplace(
            f"{len(present)} of the {len(ids)} ids are already in this HNSW index (first: {present[:5].tolist()}), "
            "and FAISS HNSW cannot remove a node to replace its vector; nothing was added. Re-embedded items "
            "need a new export and a rollout (jobs/rollout.py), or an index kind that replaces in place "
            "(index.kind=flat|ivf_flat|ivf_pq|ivf_pq_refine).")


def check_replaceable(kind: str, ids: np.ndarray) -> None:
    """Refuse (IndexCannotReplace) a refresh of existing ids before any replica sees it, by index kind."""
    if kind in NO_REMOVE_KINDS and len(ids):
        raise IndexCannotReplace(
            f"the served index is index.kind={kind}, which cannot replace an item already in it (FAISS HNSW "
            f"cannot remove a node), and every refreshed id is in the served catalogue (first: "
            f"{np.asarray(ids)[:5].tolist()}). Export a new version and roll it out (jobs/rollout.py), or serve an "
            "index kind that replaces in place (index.kind=flat|ivf_flat|ivf_pq|ivf_pq_refine).")


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
