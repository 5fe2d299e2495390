"""Sharded recall is exact on flat shards; IVF-Flat, IVF-PQ and HNSW build, search and take new items."""
from __future__ import annotations

import numpy as np
import pytest

from karma_ray.artifact.faiss_index import (ShardedIndex, add_items, build_faiss, build_shards, index_bytes,
                                            merge_topn, shard_of)
from karma_ray.config import IndexConfig
from karma_ray.serve.recall import recall_topn


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def catalogue():
    rng = np.random.default_rng(0)
    emb = _unit(rng.standard_normal((3000, 32)))
    ids = rng.choice(10**9, size=len(emb), replace=False).astype(np.int64)  # sparse, unordered ids
    queries = _unit(rng.standard_normal((20, 32)))
    return emb, ids, queries


@pytest.mark.parametrize("shards", [2, 3, 5])
def test_sharded_topn_equals_unsharded_on_flat_shards(catalogue, shards):
    emb, ids, queries = catalogue
    whole = build_faiss(emb, ids, IndexConfig(kind="flat"))
    sharded = ShardedIndex(build_shards(emb, ids, IndexConfig(kind="flat"), shards))
    assert sharded.ntotal == len(ids)
    for s, index in enumerate(sharded.shards):  # each shard holds exactly its ids
        held = faiss_ids(index)
        assert (shard_of(held, shards) == s).all()
    exclude = ids[:7].tolist()
    for q in queries:
        want_ids, want_scores = recall_topn(whole, q, exclude, 200)
        got_ids, got_scores = recall_topn(sharded, q, exclude, 200)
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_allclose(got_scores, want_scores, rtol=1e-6)


def faiss_ids(index) -> np.ndarray:
    import faiss

    return faiss.vector_to_array(index.id_map)


def test_merge_topn_orders_by_score_then_id():
    ids, scores = merge_topn([(np.array([5, 1]), np.array([0.9, 0.5])), (np.array([3, 2]), np.array([0.9, 0.7]))], 3)
    assert ids.tolist() == [3, 5, 2] and scores.tolist() == pytest.approx([0.9, 0.9, 0.7])
    assert merge_topn([], 5)[0].size == 0


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_pq", "hnsw"])
def test_approximate_kinds_find_most_of_flat_topn_and_take_new_items(catalogue, kind):
    emb, ids, queries = catalogue
    cfg = IndexConfig(kind=kind, nlist=16, nprobe=8, pq_m=8, hnsw_m=16)
    exact = build_faiss(emb, ids, IndexConfig(kind="flat"))
    index = build_faiss(emb, ids, cfg)
    assert index.ntotal == len(ids) and index_bytes(index) > 0
    _, want = exact.search(queries, 50)
    _, got = index.search(queries, 50)
    recall = np.mean([len(set(a) & set(b)) / 50 for a, b in zip(want, got)])
    assert recall >= (0.4 if kind == "ivf_pq" else 0.8), recall
    new = _unit(np.random.default_rng(1).standard_normal((3, 32)))
    new_ids = np.array([10**10, 10**10 + 1, 10**10 + 2])
    add_items(index, new, new_ids)
    assert index.ntotal == len(ids) + 3
    _, top = index.search(new, 1)
    assert top[:, 0].tolist() == new_ids.tolist()  # each new item is its own nearest neighbour


def test_add_items_routes_to_shards_and_replaces_existing_ids(catalogue):
    emb, ids, _ = catalogue
    sharded = ShardedIndex(build_shards(emb, ids, IndexConfig(kind="flat"), 3))
    moved = _unit(np.random.default_rng(2).standard_normal((2, 32)))
    add_items(sharded, moved, ids[:2])  # a re-embedded (cold) item replaces its old vector
    assert sharded.ntotal == len(ids)
    _, top = sharded.search(moved, 1)
    assert top[:, 0].tolist() == ids[:2].tolist()


def test_index_config_validates_kind_and_knobs():
    with pytest.raises(ValueError, match="index.kind"):
        IndexConfig(kind="ivf")
    with pytest.raises(ValueError, match="index.shards"):
        IndexConfig(shards=0)
    with pytest.raises(ValueError, match="pq_m"):
        build_faiss(np.zeros((100, 30), np.float32), np.arange(100), IndexConfig(kind="ivf_pq", pq_m=8))
