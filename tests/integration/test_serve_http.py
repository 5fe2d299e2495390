"""The search service over real HTTP: serve_configs/search.yaml on the session's local Ray.

The app is deployed from the YAML (its replica CPUs, autoscaling, queue limits and batching apply),
with the artifact and HTTP port swapped for a tiny artifact and a free port, and recall sharded:
`recall_shards: 2`, RecallShard0/1 configured as the YAML's Recall (the artifact is exported with
`index.shards=2`), so every test here goes through the scatter-gather path. The unsharded path is the
YAML's default, served in tests/integration/test_shared_storage.py.

The tiny artifact is written by the real export path (`export_artifact`: encoder, heads, items,
item_emb, FAISS index, manifest) from the `tiny` preset's untrained weights, which keeps this module
well under a minute; set KARMA_SERVE_TEST_TRAIN=1 to train it with `karma_ray.train.run.run` instead.
No wall-clock assertions.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from karma_ray.serve.harness import SEARCH_YAML, deploy_config, free_port, load_config, user_configs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_artifact(tiny_cfg, ray_cluster, tmp_path_factory) -> Path:
    # its own artifacts dir, so the session's `latest` (the trained tiny-ddp run) stays put
    own_cfg = tiny_cfg.with_overrides([f"train.artifacts_dir={tmp_path_factory.mktemp('serve-artifacts')}"])
    if os.environ.get("KARMA_SERVE_TEST_TRAIN") == "1":
        from karma_ray.train.run import run

        return run(own_cfg, run_name="serve-test", show_progress=False)
    from safetensors.torch import save_file

    from karma_ray.train.export import export_artifact
    from karma_ray.models.karma import build_model

    model, _ = build_model(tiny_cfg.model, tiny_cfg.loss)
    ckpt = tmp_path_factory.mktemp("serve-ckpt")
    save_file(model.trainable_state(), str(ckpt / "model.safetensors"))  # what a training checkpoint holds
    cfg = own_cfg.with_overrides([f"index.shards={SHARDS}"])
    return export_artifact(cfg, ckpt, "serve-test", {"train": {}}, show_progress=False)


SHARDS = 2


@pytest.fixture(scope="module")
def base_url(tiny_artifact, ray_cluster):
    from ray import serve

    from karma_ray.serve.app import shard_names

    cfg = load_config(SEARCH_YAML, artifact=str(tiny_artifact), http_port=free_port(),
                      overrides={"InterestEncoder": {"user_config": {"torch_threads": 1}}})
    app = cfg["applications"][0]
    app["args"]["recall_shards"] = SHARDS
    recall = next(d for d in app["deployments"] if d["name"] == "Recall")
    app["deployments"] += [{**recall, "name": name} for name in shard_names(SHARDS)]
    try:
        yield deploy_config(cfg, timeout_s=240)
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def client(base_url):
    import httpx

    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def catalogue(tiny_artifact) -> list[int]:
    import pyarrow.parquet as pq

    return pq.read_table(tiny_artifact / "items.parquet").column("item_id").to_pylist()


def test_search_returns_k_items_with_stages_latency_and_version(client, catalogue):
    history = catalogue[:3]
    r = client.post("/search", json={"user_id": 1, "query": "running shoes", "history": history, "k": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["items"]) == 7
    ids = [it["item_id"] for it in body["items"]]
    assert len(set(ids)) == 7 and not set(ids) & set(history) and set(ids) <= set(catalogue)
    assert all(isinstance(it["title"], str) and it["title"] for it in body["items"])
    scores = [it["score"] for it in body["items"]]
    assert scores == sorted(scores, reverse=True)
    st = body["stages"]
    assert st["recall"] == min(200, len(catalogue) - len(history)) and st["prerank"] == 50 and st["rank"] == 7
    assert set(body["latency_ms"]) == {"encode", "recall", "prerank", "rank", "total"}
    assert all(v >= 0 for v in body["latency_ms"].values())
    assert body["model_version"] == "serve-test" and body["ignored_history"] == []
    assert body["rankers"] in (True, False)


def test_search_defaults_to_20_and_takes_query_only(client):
    r = client.post("/search", json={"query": "garden hose"})
    assert r.status_code == 200, r.text
    assert len(r.json()["items"]) == 20


def test_concurrent_searches_agree(client, catalogue):
    """Requests at once within what one encoder replica always takes (the YAML's max_pending, and
    max_wait_forwards: the running forward plus one more fit in 2 forwards) go through the
    micro-batching encoder; equal requests get equal answers."""
    from concurrent.futures import ThreadPoolExecutor

    encoder = user_configs(load_config(SEARCH_YAML))["InterestEncoder"]
    at_once = min(encoder["max_pending"], int(encoder["max_wait_forwards"]))
    req = {"history": catalogue[5:9], "k": 5}
    with ThreadPoolExecutor(at_once) as pool:
        outs = list(pool.map(lambda _: client.post("/search", json=req), range(16)))
    assert all(o.status_code == 200 for o in outs), [(o.status_code, o.text[:200]) for o in outs if o.status_code != 200]
    first = [i["item_id"] for i in outs[0].json()["items"]]
    assert all([i["item_id"] for i in o.json()["items"]] == first for o in outs)


def test_unknown_history_ids_are_dropped_and_reported(client, catalogue):
    unknown = max(catalogue) + 1000
    r = client.post("/search", json={"history": [catalogue[0], unknown, catalogue[1]], "k": 3})
    assert r.status_code == 200, r.text
    assert r.json()["ignored_history"] == [unknown]
    r = client.post("/search", json={"query": "lamp", "history": [unknown], "k": 3})
    assert r.status_code == 200 and r.json()["ignored_history"] == [unknown]
    r = client.post("/search", json={"history": [unknown, unknown + 1]})
    assert r.status_code == 422
    assert "none of the history item ids are in the catalogue" in r.json()["error"]


@pytest.mark.parametrize("body, field", [
    ({"query": "x", "k": 0}, "k"),
    ({"query": "x", "k": 500}, "k"),
    ({"query": "x", "k": "five"}, "k"),
    ({"query": "x", "k": "5"}, "k"),
    ({"query": ["x"]}, "query"),
    ({"history": ["a", "b"]}, "history"),
    ({"history": "1,2,3"}, "history"),
    ({"history": list(range(201))}, "history"),
    ({"history": [2**63]}, "history"),
    ({"query": "x", "history": [-(2**63) - 1]}, "history"),
    ({"query": "x", "histroy": [1]}, "histroy"),
    ({}, "query"),
    ([1, 2], "body"),
])
def test_validation_errors_are_422_with_clear_messages(client, body, field):
    r = client.post("/search", json=body)
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["error"].startswith("invalid request:") and field in err["error"]
    assert "Traceback" not in r.text
    assert len(r.content) < 4000  # the oversized input is not echoed back


def test_malformed_json_is_422(client):
    r = client.post("/search", content=b'{"query": "x", "k": ', headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert "malformed JSON" in r.json()["error"]


def test_oversized_body_is_413_and_unknown_path_is_json_404(client):
    r = client.post("/search", json={"query": "x", "user_id": 1, "pad": "y" * 100_000})
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]

    def chunks():  # no Content-Length: counted while reading
        for _ in range(100):
            yield b" " * 1024
    r = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.get("/nowhere")
    assert r.status_code == 404 and "error" in r.json()


def test_explain_returns_text(client, catalogue):
    r = client.post("/explain", json={"query": "shoes", "history": catalogue[:2] + [max(catalogue) + 7]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["text"], str) and body["model_version"] == "serve-test"
    assert body["ignored_history"] == [max(catalogue) + 7]
    assert client.post("/explain", json={"k": 3}).status_code == 422


def test_healthz_readyz_and_openapi(client, catalogue):
    r = client.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["model_version"] == "serve-test" and body["n_items"] == len(catalogue)
    assert isinstance(body["rankers"], bool)
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    ready = r.json()
    assert ready["ready"] and set(ready["stages"]) == {"InterestEncoder", "Recall", "PreRank", "Rank"}
    assert all(s["versions"] == ["serve-test"] for s in ready["stages"].values())
    spec = client.get("/openapi.json").json()
    assert {"/search", "/explain", "/healthz"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200


def test_replica_counts_from_yaml(base_url):
    from karma_ray.serve.app import DEPLOYMENTS, shard_names
    from karma_ray.serve.harness import replica_counts

    counts = replica_counts()
    assert set(counts) == {*DEPLOYMENTS, *shard_names(SHARDS)} and all(n >= 1 for n in counts.values())


def test_sharded_recall_equals_the_unsharded_index(base_url, tiny_artifact, catalogue):
    """Recall scatters to the shard deployments (each loaded only its shard file) and merges: the same
    ids and scores as the artifact's whole flat index, history excluded."""
    import numpy as np
    from ray import serve

    from karma_ray.artifact.reader import load_index
    from karma_ray.serve.harness import replica_info
    from karma_ray.serve.recall import recall_topn

    whole = load_index(tiny_artifact)
    infos = [replica_info(name, "karma")[0] for name in ("RecallShard0", "RecallShard1")]
    assert [i["shard"] for i in infos] == [0, 1]
    assert sum(next(iter(i["ntotal"].values())) for i in infos) == whole.ntotal == len(catalogue)
    recall = serve.get_deployment_handle("Recall", "karma")
    rng = np.random.default_rng(0)
    for _ in range(3):
        h = rng.standard_normal(whole.d).astype(np.float32)
        h /= np.linalg.norm(h)
        ids, scores, version = recall.search.remote(str(tiny_artifact.resolve()), h, catalogue[:4], 50).result(timeout_s=60)
        want_ids, want_scores = recall_topn(whole, h, catalogue[:4], 200)
        assert version == "serve-test"
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5)


def test_hot_refresh_reembeds_items_without_a_restart(base_url, tiny_artifact, catalogue, tmp_path):
    """jobs/refresh_items.py's path: the live encoder embeds new text for two catalogue items, the
    shards that hold them replace their vectors via user_config (same replicas: no restart), and each
    item is then its own top-1 for its new vector."""
    import numpy as np
    import pyarrow as pa
    from ray import serve

    from karma_ray.serve.harness import deploy_config, replica_info
    from karma_ray.serve.refresh import read_refresh, refresh
    from karma_ray.serve.rollout import live_config

    pids = {name: {i["pid"] for i in replica_info(name, "karma")} for name in ("RecallShard0", "RecallShard1")}
    ids = catalogue[10:12]
    items = pa.table({"item_id": ids, "title": ["solar lantern XL", "trail runner 2"],
                      "category": ["garden", "shoes"], "attributes": ["new", "new"]})
    out = refresh(items, tmp_path, cfg=live_config(), deploy=deploy_config, app="karma")
    assert out["items"] == 2 and out["deployments"] == ["RecallShard0", "RecallShard1"]
    got_ids, emb, version = read_refresh(out["file"])
    assert got_ids.tolist() == ids and version == "serve-test"
    recall = serve.get_deployment_handle("Recall", "karma")
    for item_id, vec in zip(ids, emb):
        top, _, _ = recall.search.remote(str(tiny_artifact.resolve()), vec, [], 1).result(timeout_s=60)
        assert int(top[0]) == item_id
    assert {name: {i["pid"] for i in replica_info(name, "karma")} for name in pids} == pids
    with pytest.raises(ValueError, match="not in the served catalogue"):
        refresh(pa.table({"item_id": [max(catalogue) + 1], "title": ["x"]}), tmp_path, cfg=live_config(),
                deploy=deploy_config, app="karma")


def test_real_prometheus_scrapes_every_stage_latency_histogram(client, catalogue, ray_metrics_port):
    """A real Prometheus, configured from deploy/prometheus.yml, scrapes this Ray's metrics port and
    sees karma_stage_latency_ms buckets for encode, recall, prerank and rank."""
    import shutil
    import time

    from karma_ray.serve.harness import prom_query, prometheus
    from karma_ray.serve.metrics import STAGES

    if not shutil.which("prometheus"):
        pytest.skip("prometheus is not installed (make test / .ci/run install it with apt-get)")
    for i in range(6):
        assert client.post("/search", json={"query": "lamp", "history": catalogue[i : i + 2], "k": 5}).status_code == 200
    found: set[str] = set()
    with prometheus(ray_metrics_port, scrape_interval="1s") as prom:
        deadline = time.monotonic() + 120  # Ray reports custom metrics every ~10 s; a bound, not an assertion
        while time.monotonic() < deadline and not set(STAGES) <= found:
            time.sleep(2)
            try:
                series = prom_query(prom, "sum by (stage) (ray_karma_stage_latency_ms_bucket)")
            except Exception:  # noqa: BLE001 - Prometheus still starting
                continue
            found = {s["metric"].get("stage") for s in series if float(s["value"][1]) > 0}
    assert set(STAGES) <= found, f"stages with buckets in Prometheus: {sorted(found)}"


def test_rollout_under_load_gives_one_version_per_response_and_rolls_back(client, tiny_artifact, tmp_path):
    """jobs/rollout.py's phases on the live app while a client keeps searching: no request fails,
    every answer comes from one version, the new version takes over, and --rollback returns."""
    import json
    import shutil
    import threading

    from karma_ray.serve.harness import deploy_config
    from karma_ray.serve.rollout import live_config, previous_artifact, roll

    v2 = tmp_path / "serve-test-v2"
    shutil.copytree(tiny_artifact, v2)
    manifest = json.loads((v2 / "manifest.json").read_text())
    (v2 / "manifest.json").write_text(json.dumps({**manifest, "run_name": "serve-test-v2"}))
    seen: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def load() -> None:
        import httpx

        with httpx.Client(base_url=str(client.base_url), timeout=60) as c:
            while not stop.is_set():
                r = c.post("/search", json={"query": "lamp", "k": 3})
                seen.append((r.status_code, r.json().get("model_version") if r.status_code == 200 else r.text))

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        out = roll(str(v2), cfg=live_config(), deploy=deploy_config, drain_s=1.0, log=lambda _: None)
        assert out["to"] == str(v2.resolve())
        n_rolled = len(seen)
        back = roll(previous_artifact(live_config()), cfg=live_config(), deploy=deploy_config, drain_s=1.0,
                    log=lambda _: None)
        assert back["to"] == str(tiny_artifact.resolve())
        while len(seen) < n_rolled + 3:  # a few answers after the rollback too
            stop.wait(0.2)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert seen and all(status == 200 for status, _ in seen), [s for s in seen if s[0] != 200][:5]
    versions = [v for _, v in seen]
    assert set(versions) <= {"serve-test", "serve-test-v2"}
    assert "serve-test-v2" in versions[:n_rolled + 1] and versions[-1] == "serve-test"
    switches = sum(a != b for a, b in zip(versions, versions[1:]))
    assert switches <= 2, "one switch to the new version and one back: never back and forth"


def test_fuzzing_from_the_openapi_schema_finds_no_5xx(base_url):
    """schemathesis cases (valid and invalid by the app's own /openapi.json) on /search and /explain:
    every answer is a 2xx or a clear 4xx. benchmarks/reliability.py runs >= 1,000 of them."""
    from karma_ray.serve.harness import fuzz

    out = fuzz(base_url, 48)
    assert out["cases"] >= 48
    assert not [c for c in out["status_counts"] if c.startswith("5")], out
    assert set(out["status_counts"]) <= {"200", "400", "413", "422"}, out
