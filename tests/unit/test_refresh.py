"""Hot refresh without Ray: the file round trip, which replica applies what, and the config it deploys."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from karma_ray.artifact.faiss_index import IndexCannotReplace, build_faiss, shard_of
from karma_ray.config import IndexConfig
from karma_ray.serve.recall import RecallState
from karma_ray.serve.refresh import apply_refreshes, check_index_kind, read_refresh, refresh_config, write_refresh


def _unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_refresh_file_round_trip(tmp_path):
    emb = _unit(3, 0)
    path = write_refresh(tmp_path / "r.parquet", np.array([4, 5, 6]), emb, "v1")
    ids, got, version = read_refresh(path)
    assert ids.tolist() == [4, 5, 6] and version == "v1"
    np.testing.assert_array_equal(got, emb)


def test_apply_refreshes_once_per_file_only_mine_and_only_my_version(tmp_path):
    state = RecallState(build_faiss(_unit(10, 1), np.arange(10), IndexConfig(kind="flat")), "v1")
    mine = write_refresh(tmp_path / "a.parquet", np.array([3, 4]), _unit(2, 2), "v1")
    other = write_refresh(tmp_path / "b.parquet", np.array([5]), _unit(1, 3), "v0")
    in_shard_1 = lambda ids: shard_of(ids, 2) == 1  # noqa: E731 — this replica holds the odd ids
    assert apply_refreshes(state, [str(mine), str(other)], in_shard_1) == 1  # id 3 only; v0's file skipped
    assert apply_refreshes(state, [str(mine), str(other)], in_shard_1) == 0  # applied once
    assert state.index.ntotal == 10
    _, top = state.index.search(read_refresh(mine)[1][:1], 1)
    assert top[0, 0] == 3


def test_refresh_config_names_the_deployments_that_hold_the_index():
    def cfg(shards):
        return {"applications": [{"name": "karma", "args": {"recall_shards": shards},
                                  "deployments": [{"name": "Recall", "user_config": {"top_n": 200}}]}]}
    one = refresh_config(cfg(1), "/x/r1.parquet", "karma")["applications"][0]["deployments"]
    assert one == [{"name": "Recall", "user_config": {"top_n": 200, "refresh": ["/x/r1.parquet"]}}]
    two = refresh_config(refresh_config(cfg(2), "/x/r1.parquet", "karma"), "/x/r2.parquet", "karma")
    deps = {d["name"]: d["user_config"] for d in two["applications"][0]["deployments"]}
    assert "refresh" not in deps["Recall"]
    assert deps["RecallShard0"]["refresh"] == deps["RecallShard1"]["refresh"] == ["/x/r1.parquet", "/x/r2.parquet"]


def test_hnsw_refresh_of_an_existing_id_is_refused_whole_and_up_front(tmp_path):
    state = RecallState(build_faiss(_unit(50, 4), np.arange(50), IndexConfig(kind="hnsw", hnsw_m=8)), "v1")
    path = write_refresh(tmp_path / "a.parquet", np.array([60, 7]), _unit(2, 5), "v1")  # 7 is there already
    with pytest.raises(IndexCannotReplace, match=r"1 of the 2 ids .*\[7\]"):
        apply_refreshes(state, [str(path)], lambda ids: np.ones(len(ids), bool))
    assert state.index.ntotal == 50 and str(path) not in state.refreshed  # untouched: no duplicate id 7
    items = pa.table({"item_id": np.array([7], np.int64)})
    for kind, refused in (("hnsw", True), ("ivf_pq_refine", False), ("flat", False)):
        art = tmp_path / kind
        art.mkdir()
        (art / "manifest.json").write_text(json.dumps({"config": {"index": {"kind": kind}}}))
        if refused:  # what `refresh` checks before it embeds or deploys anything
            with pytest.raises(IndexCannotReplace, match="index.kind=hnsw.*rollout"):
                check_index_kind(items, str(art))
        else:
            check_index_kind(items, str(art))
