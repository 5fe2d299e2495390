"""Reliability and security pieces of the search service without a cluster: the HTTP guard (413, 401,
429, docs switch), version pinning, retries on a lost replica, health checks, /explain's limit and
the rollout's phase configs."""
from __future__ import annotations

import asyncio
import json

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from karma_ray.serve import guard
from karma_ray.serve.catalog import Catalog
from karma_ray.serve.harness import Local
from karma_ray.serve.ingress import ConcurrencyLimit, respond
from karma_ray.serve.pipeline import SearchPipeline, VersionMismatch
from karma_ray.serve.recall import Recall, check_index, load_recall_state
from karma_ray.serve.schemas import SearchRequest
from karma_ray.serve.versions import HeldVersions, artifact_key


def _artifact(path, run_name, n=4):
    path.mkdir(parents=True, exist_ok=True)
    ids = np.arange(10, 10 + n, dtype=np.int64)
    emb = np.eye(n, dtype=np.float32)
    pq.write_table(pa.table({"item_id": ids, "title": [f"t{i}" for i in ids], "category": ["c"] * n,
                             "attributes": [""] * n}), path / "items.parquet")
    np.save(path / "item_emb.npy", emb, allow_pickle=False)
    idx = faiss.IndexIDMap2(faiss.IndexFlatIP(n))
    idx.add_with_ids(emb, ids)
    faiss.write_index(idx, str(path / "index.faiss"))
    (path / "manifest.json").write_text(json.dumps({"run_name": run_name}))
    return path


# ---- guard -------------------------------------------------------------------------------------
@pytest.fixture()
def guarded():
    app = FastAPI()
    app.add_middleware(guard.Guard)

    @app.post("/search")
    async def search(body: dict):
        return {"ok": True, "n": len(json.dumps(body))}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    yield TestClient(app)
    guard.configure(guard.GuardConfig())


def test_body_over_the_cap_is_413_with_or_without_content_length(guarded):
    guard.configure(guard.GuardConfig(max_body_bytes=2048))
    assert guarded.post("/search", json={"q": "x" * 1000}).status_code == 200
    r = guarded.post("/search", json={"q": "x" * 5000})
    assert r.status_code == 413 and "exceeds the limit of 2048 bytes" in r.json()["error"]
    r = guarded.post("/search", content=iter([b"{" + b" " * 1500, b" " * 1500 + b"}"]),
                     headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_bearer_token_from_env_and_file_with_open_probes(guarded, tmp_path, monkeypatch):
    monkeypatch.setenv("KARMA_TEST_TOKEN", "s3cret")
    secret = tmp_path / "token"
    secret.write_text("rotated-1\nrotated-2\n")
    guard.configure(guard.GuardConfig(auth_token_env="KARMA_TEST_TOKEN", auth_token_file=str(secret)))
    assert guarded.post("/search", json={}).status_code == 401
    r = guarded.post("/search", json={}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    for token in ("s3cret", "rotated-1", "rotated-2"):
        assert guarded.post("/search", json={}, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert guarded.get("/healthz").status_code == 200  # liveness probes carry no token
    monkeypatch.setenv("KARMA_API_TOKEN", "client-side")
    assert guard.client_headers() == {"Authorization": "Bearer client-side"}


def test_token_never_in_config_and_auth_needs_a_token(monkeypatch):
    with pytest.raises(ValueError, match="never put a token"):
        guard.GuardConfig.from_user_config({"auth_token": "abc"})
    monkeypatch.delenv("KARMA_NO_SUCH_TOKEN", raising=False)
    with pytest.raises(ValueError, match="no token was found"):
        guard.configure(guard.GuardConfig(auth_token_env="KARMA_NO_SUCH_TOKEN"))
    with pytest.raises(ValueError, match="max_body_bytes"):
        guard.GuardConfig(max_body_bytes=10)


def test_rate_limit_per_client_with_retry_after(guarded):
    guard.configure(guard.GuardConfig(rate_limit_qps=0.5, rate_limit_burst=2, rate_limit_key="header:X-Client"))
    a = [guarded.post("/search", json={}, headers={"X-Client": "a"}).status_code for _ in range(3)]
    assert a == [200, 200, 429]
    r = guarded.post("/search", json={}, headers={"X-Client": "a"})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "rate limit" in r.json()["error"]
    assert guarded.post("/search", json={}, headers={"X-Client": "b"}).status_code == 200  # another client
    assert guarded.get("/healthz", headers={"X-Client": "a"}).status_code == 200


def test_docs_can_be_turned_off(guarded):
    assert guarded.get("/openapi.json").status_code == 200
    guard.configure(guard.GuardConfig(docs=False))
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert guarded.get(path).status_code == 404


# ---- health ------------------------------------------------------------------------------------
def test_check_health_fails_when_the_index_is_missing_or_empty(tmp_path):
    art = _artifact(tmp_path / "a", "v1")
    recall = Recall.func_or_class(str(art))
    recall.check_health()  # loaded, non-empty, version known
    recall.versions.get(artifact_key(art)).index = None
    with pytest.raises(RuntimeError, match="missing or empty"):
        recall.check_health()
    state = load_recall_state(str(art))
    state.index = faiss.IndexIDMap2(faiss.IndexFlatIP(4))
    with pytest.raises(RuntimeError, match="missing or empty"):
        check_index(state)
    (art / "index.faiss").unlink()
    with pytest.raises(FileNotFoundError, match="missing: index.faiss"):
        Recall.func_or_class(str(art))


def test_catalog_check_needs_items(tmp_path):
    Catalog.load(_artifact(tmp_path / "a", "v1")).check()
    with pytest.raises(RuntimeError, match="catalogue is empty"):
        Catalog.load(_artifact(tmp_path / "b", "v2", n=0)).check()


# ---- versions, retries, limits -----------------------------------------------------------------
def test_held_versions_load_hold_and_drop(tmp_path):
    a, b = _artifact(tmp_path / "a", "va"), _artifact(tmp_path / "b", "vb")
    loads = []
    held = HeldVersions(lambda p: loads.append(p) or Catalog.load(p), str(a))
    held.hold([str(a), str(b)])
    assert [held.get(artifact_key(x)).version for x in (a, b)] == ["va", "vb"] and len(loads) == 2
    held.hold([str(b)])
    assert [k for k, _ in held.items()] == [artifact_key(b)]
    assert held.get(str(a)).version == "va" and len(loads) == 3  # not held: loaded on demand, never wrong


class _Stage:
    def __init__(self, version, fail_first=0, exc=ConnectionError):
        self.version, self.fail_first, self.exc, self.calls = version, fail_first, exc, 0

    def encode(self, artifact, query, history):
        self.calls += 1
        if self.calls <= self.fail_first:
            raise self.exc("replica died")
        return np.ones(4, np.float32) / 2, self.version

    def search(self, artifact, h, exclude, k):
        return np.array([10, 11]), np.array([0.9, 0.8], np.float32), self.version

    def score(self, artifact, h, ids, history, k):
        return np.asarray(ids)[:k], np.array([0.9, 0.8], np.float32)[: len(ids)][:k], self.version

    def has_rankers(self, artifact):
        return False


def _pipe(tmp_path, enc, other, retries=2):
    art = _artifact(tmp_path / "a", "v1")
    cats = HeldVersions(lambda p: Catalog.load(p, with_emb=False), str(art))
    return SearchPipeline(cats, Local(enc), Local(other), Local(other), Local(other), stage_retries=retries,
                          retry_on=(ConnectionError,))


def test_a_stage_call_whose_replica_died_is_retried(tmp_path):
    enc = _Stage("v1", fail_first=2)
    out = asyncio.run(_pipe(tmp_path, enc, _Stage("v1")).search(SearchRequest(query="x", k=2)))
    assert enc.calls == 3 and out.model_version == "v1" and [i.item_id for i in out.items] == [10, 11]
    enc = _Stage("v1", fail_first=5)
    with pytest.raises(ConnectionError):
        asyncio.run(_pipe(tmp_path, enc, _Stage("v1")).search(SearchRequest(query="x", k=2)))
    assert enc.calls == 3  # 1 + stage_retries, then the error reaches the client as a 503
    enc = _Stage("v1", fail_first=1, exc=ValueError)  # not a lost replica: no retry
    with pytest.raises(ValueError):
        asyncio.run(_pipe(tmp_path, enc, _Stage("v1")).search(SearchRequest(query="x", k=2)))
    assert enc.calls == 1


def test_a_stage_answering_from_another_version_is_never_mixed_in(tmp_path):
    pipe = _pipe(tmp_path, _Stage("v1"), _Stage("v2"))
    with pytest.raises(VersionMismatch, match="pinned to 'v1'"):
        asyncio.run(pipe.search(SearchRequest(query="x")))
    r = asyncio.run(respond(pipe.search(SearchRequest(query="x")), "search"))
    assert r.status_code == 500 and "Traceback" not in r.body.decode()


def test_whole_request_deadline_is_a_json_503():
    async def slow():
        await asyncio.sleep(5)

    r = asyncio.run(respond(slow(), "search", timeout_s=0.05))
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "did not finish within 0.05 s" in json.loads(r.body)["error"]


def test_explain_concurrency_limit_rejects_at_once():
    limit = ConcurrencyLimit(1, "/explain")

    async def main():
        gate = asyncio.Event()

        async def work():
            await gate.wait()
            return "done"
        first = asyncio.create_task(limit.run(work()))
        await asyncio.sleep(0)
        second = await respond(limit.run(work()), "explain")
        gate.set()
        return await first, second

    first, second = asyncio.run(main())
    assert first == "done" and second.status_code == 503 and second.headers["retry-after"] == "1"
    assert "concurrency limit" in json.loads(second.body)["error"]


# ---- rollout phases ----------------------------------------------------------------------------
def test_rollout_phases_hold_both_then_switch_then_drop(tmp_path):
    from karma_ray.serve.rollout import STAGE_DEPLOYMENTS, drain_seconds, phases, previous_artifact

    old, new = _artifact(tmp_path / "old", "v1"), _artifact(tmp_path / "new", "v2")
    cfg = {"applications": [{"name": "karma", "args": {"artifact": str(old)}, "deployments": [
        {"name": "SearchIngress", "user_config": {"request_timeout_s": 7}},
        {"name": "Recall", "user_config": {"top_n": 100}}]}]}
    (n1, c1), (n2, c2), (n3, c3) = phases(cfg, str(new))

    def uc(c, name):
        return next(d for d in c["applications"][0]["deployments"] if d["name"] == name)["user_config"]
    ko, kn = artifact_key(old), artifact_key(new)
    assert all(uc(c1, s)["artifacts"] == [ko, kn] for s in STAGE_DEPLOYMENTS) and "artifact" not in uc(c1, "SearchIngress")
    assert uc(c2, "SearchIngress")["artifact"] == kn and uc(c2, "Recall")["artifacts"] == [ko, kn]
    assert all(uc(c3, s)["artifacts"] == [kn] for s in STAGE_DEPLOYMENTS) and uc(c3, "Recall")["top_n"] == 100
    assert previous_artifact(c3) == ko and drain_seconds(c3) == 7
    assert c3["applications"][0]["args"] == cfg["applications"][0]["args"]  # init args untouched: no restarts
    with pytest.raises(ValueError, match="nothing to roll back to"):
        previous_artifact(cfg)


# ---- the shipped YAMLs -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["search.yaml", "search-gpu.yaml"])
def test_yaml_timeouts_answer_before_the_proxy_and_shedding_is_bounded(name):
    """The ingress's own deadlines fit inside the proxy's (so a timeout is a JSON 503, not the
    proxy's plain-text answer), and every queue that can shed is bounded."""
    from karma_ray.serve.app import recall_shards, shard_names
    from karma_ray.serve.harness import REPO_ROOT, load_config, user_configs

    cfg = load_config(REPO_ROOT / "serve_configs" / name)
    shards = recall_shards(cfg["applications"][0]["args"])
    ingress = user_configs(cfg)["SearchIngress"]
    assert 0 < ingress["stage_timeout_s"] <= ingress["request_timeout_s"] < cfg["http_options"]["request_timeout_s"]
    guard.GuardConfig.from_user_config(ingress)  # the gate's keys are valid
    deps = {d["name"]: d for d in cfg["applications"][0]["deployments"]}
    assert set(deps) == {"SearchIngress", "InterestEncoder", "Recall", "PreRank", "Rank",
                         *(shard_names(shards) if shards > 1 else [])}
    assert all(0 < d["max_queued_requests"] for d in deps.values())
    assert all(d.get("health_check_period_s") for d in deps.values())
    enc = deps["InterestEncoder"]
    assert enc["user_config"]["max_pending"] >= enc["user_config"]["max_batch_size"]
