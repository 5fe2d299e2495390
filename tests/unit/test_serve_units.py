"""Pure pieces of the search service: request schemas and bounds, recall exclusion, row mapping,
error mapping, version pinning, health checks and the HTTP guard (body cap, auth, rate limit, docs).

No Ray cluster and no model: FAISS, numpy, pyarrow and FastAPI's test client on toy data.
"""
from __future__ import annotations

import asyncio
import json

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from karma_ray.data.catalog import UnknownItemError
from karma_ray.serve.catalog import Catalog, stage_scores, top_by_score
from karma_ray.serve.harness import Local
from karma_ray.serve.ingress import respond
from karma_ray.serve.pipeline import RequestError, SearchPipeline
from karma_ray.serve.recall import recall_topn
from karma_ray.serve.schemas import INT64_MAX, INT64_MIN, MAX_HISTORY, MAX_K, SearchRequest
from karma_ray.serve.versions import HeldVersions


# ---- schemas ---------------------------------------------------------------------------------
def test_search_request_defaults_and_limits():
    r = SearchRequest.model_validate({"query": "shoes"})
    assert r.k == 20 and r.history == [] and r.user_id is None
    SearchRequest.model_validate({"history": [1] * MAX_HISTORY, "k": MAX_K})
    SearchRequest.model_validate({"history": [3], "k": 1})
    SearchRequest.model_validate({"history": [INT64_MIN, INT64_MAX]})


@pytest.mark.parametrize("body, field", [
    ({"query": "x", "k": 0}, "k"),
    ({"query": "x", "k": MAX_K + 1}, "k"),
    ({"query": "x", "k": "5"}, "k"),  # strict: no string → int coercion
    ({"query": "x", "k": 5.0}, "k"),
    ({"query": "x", "k": True}, "k"),
    ({"query": 42}, "query"),
    ({"query": "x" * 513}, "query"),
    ({"history": ["a"]}, "history"),
    ({"history": 7}, "history"),
    ({"history": [1] * (MAX_HISTORY + 1)}, "history"),
    ({"query": "x", "user_id": "u1"}, "user_id"),
    ({"history": [2**63]}, "history"),  # passes a plain int check, fails int64: was a 500 in numpy
    ({"history": [1, INT64_MIN - 1]}, "history"),
    ({"query": "x", "user_id": 2**64}, "user_id"),
    ({"query": "x", "histroy": [1, 2]}, "histroy"),  # a misspelt field is an error, not "no history"
    ({"query": "x", "extra": None}, "extra"),
])
def test_search_request_rejects(body, field):
    with pytest.raises(ValidationError) as e:
        SearchRequest.model_validate(body)
    assert any(field in map(str, err["loc"]) for err in e.value.errors())


@pytest.mark.parametrize("body", [{}, {"query": "   "}, {"query": "", "history": []}, {"query": None}])
def test_search_request_needs_query_or_history(body):
    with pytest.raises(ValidationError, match="non-empty `query` or a non-empty `history`"):
        SearchRequest.model_validate(body)


# ---- recall ----------------------------------------------------------------------------------
def _index(emb: np.ndarray, ids: np.ndarray) -> faiss.Index:
    idx = faiss.IndexIDMap2(faiss.IndexFlatIP(emb.shape[1]))
    idx.add_with_ids(emb.astype(np.float32), ids.astype(np.int64))
    return idx


def test_recall_excludes_history_and_still_returns_n():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = np.arange(1000, 1050)
    idx = _index(emb, ids)
    h = emb[3]
    top, _ = recall_topn(idx, h, [], 10)
    assert top[0] == 1003
    exclude = top[:5].tolist() + [999999]  # also an id that is not in the index
    got, scores = recall_topn(idx, h, exclude, 10)
    assert len(got) == 10 and not set(got) & set(exclude)
    assert np.all(np.diff(scores) <= 1e-6)
    np.testing.assert_allclose(scores, emb[got - 1000] @ h, rtol=1e-5, atol=1e-6)


def test_recall_caps_at_catalogue_size():
    emb = np.eye(4, dtype=np.float32)
    got, _ = recall_topn(_index(emb, np.array([1, 2, 3, 4])), emb[0], [1], 200)
    assert sorted(got.tolist()) == [2, 3, 4]
    assert len(recall_topn(_index(emb, np.array([1, 2, 3, 4])), emb[0], [], 0)[0]) == 0


# ---- catalogue rows (the artifact's one convention: position in the id-sorted catalogue) -----
@pytest.fixture()
def toy_artifact(tmp_path):
    ids = np.array([10, 20, 30, 40], np.int64)  # artifacts store items id-sorted
    emb = np.eye(4, dtype=np.float32)  # row i of item_emb ↔ catalogue row i
    pq.write_table(pa.table({"item_id": ids, "title": [f"t{i}" for i in ids], "category": ["c"] * 4,
                             "attributes": [""] * 4}), tmp_path / "items.parquet")
    np.save(tmp_path / "item_emb.npy", emb, allow_pickle=False)
    faiss.write_index(_index(emb, ids), str(tmp_path / "index.faiss"))
    (tmp_path / "manifest.json").write_text(json.dumps({"run_name": "toy-run"}))
    return tmp_path


def test_catalog_rows_are_id_sorted_positions(toy_artifact):
    cat = Catalog.load(toy_artifact)
    assert cat.version == "toy-run" and len(cat) == 4
    assert cat.rows_of([30, 10, 40]).tolist() == [2, 0, 3]
    assert cat.title_of([20]) == ["t20"]
    np.testing.assert_array_equal(cat.item_emb[cat.rows_of([20])[0]], np.eye(4, dtype=np.float32)[1])
    assert cat.split_known([10, 5, 40, 5]) == ([10, 40], [5, 5])
    with pytest.raises(UnknownItemError):
        cat.rows_of([10, 11])


class _Bundle:
    """Records what a RankerBundle receives; scores = minus the row index (so row order wins)."""

    def __init__(self):
        self.calls = []

    def prerank_scores(self, h, cand_emb, cand_rows, history_rows):
        self.calls.append((h.shape, cand_emb.copy(), cand_rows.copy(), history_rows))
        return -cand_rows.astype(np.float32)

    rank_scores = prerank_scores


def test_stage_scores_fallback_is_recall_score(toy_artifact):
    cat = Catalog.load(toy_artifact)
    h = np.array([0.1, 0.2, 0.7, 0.0], np.float32)
    ids = np.array([40, 30, 10])
    s = stage_scores(None, "prerank", cat, h, ids, [20])
    np.testing.assert_allclose(s, cat.item_emb[cat.rows_of(ids)] @ h)
    top, top_s = top_by_score(ids, s, 2)
    assert top.tolist() == [30, 10] and top_s[0] >= top_s[1]


def test_stage_scores_passes_consistent_rows_to_rankers(toy_artifact):
    cat = Catalog.load(toy_artifact)
    b = _Bundle()
    h = np.ones(4, np.float32)
    s = stage_scores(b, "rank", cat, h, np.array([40, 10]), [20, 30])
    (hshape, emb, rows, hist), = b.calls
    assert hshape == (1, 4) and rows.tolist() == [[3, 0]] and hist == [[1, 2]]
    np.testing.assert_array_equal(emb[0], cat.item_emb[[3, 0]])
    assert s.tolist() == [-3.0, 0.0]


# ---- the request pipeline with in-process stages ---------------------------------------------
class _Enc:
    version = "toy-run"

    def __init__(self):
        self.seen = []

    def encode(self, artifact, query, history):
        self.seen.append((query, list(history)))
        return np.array([0.1, 0.3, 1.0, 0.2], np.float32), self.version

    def explain(self, artifact, query, history):
        return "Next: something", self.version


class _Stage:
    def __init__(self, cat, idx):
        self.cat, self.idx = cat, idx

    def search(self, artifact, h, exclude, at_least=0):
        return (*recall_topn(self.idx, h, exclude, max(3, at_least)), self.cat.version)

    def score(self, artifact, h, ids, history, k):
        return (*top_by_score(ids, stage_scores(None, "rank", self.cat, h, ids, history), k), self.cat.version)

    def has_rankers(self, artifact):
        return False


def _catalogs(path):
    return HeldVersions(lambda a: Catalog.load(a, with_emb=False), str(path))


def _pipeline(toy_artifact):
    cat = Catalog.load(toy_artifact)
    stage = Local(_Stage(cat, faiss.read_index(str(toy_artifact / "index.faiss"))))
    enc = _Enc()
    return SearchPipeline(_catalogs(toy_artifact), Local(enc), stage, stage, stage), enc


def test_pipeline_drops_unknown_history_and_reports_it(toy_artifact):
    pipe, enc = _pipeline(toy_artifact)
    out = asyncio.run(pipe.search(SearchRequest(history=[30, 999, 10, 999], k=2)))
    assert enc.seen == [("", [30, 10])]
    assert out.ignored_history == [999]
    assert [i.item_id for i in out.items] == [20, 40]  # 30 (best) and 10 are history: excluded
    assert out.stages.rank == 2 and out.model_version == "toy-run" and out.rankers is False
    assert set(out.latency_ms.model_dump()) == {"encode", "recall", "prerank", "rank", "total"}


def test_pipeline_all_unknown_history_without_query_is_422(toy_artifact):
    pipe, _ = _pipeline(toy_artifact)
    with pytest.raises(RequestError) as e:
        asyncio.run(pipe.search(SearchRequest(history=[999, 998])))
    assert e.value.status == 422 and "999" in e.value.message
    ok = asyncio.run(pipe.search(SearchRequest(query="shoes", history=[999], k=1)))
    assert ok.ignored_history == [999] and len(ok.items) == 1


class _Counter:
    def __init__(self):
        self.counts = []

    def count(self, status, endpoint="search"):
        self.counts.append((str(status), endpoint))


def test_respond_maps_failures_to_json_without_traceback():
    m = _Counter()

    async def boom():
        raise RuntimeError("secret internals at /srv/x.py line 3")

    async def busy():
        raise TimeoutError("queue full")

    r = asyncio.run(respond(boom(), "search", m))
    body = json.loads(r.body)
    assert r.status_code == 500 and "internal error" in body["error"]
    assert "secret" not in r.body.decode() and "Traceback" not in r.body.decode()
    r = asyncio.run(respond(busy(), "search", m, overload=(TimeoutError,)))
    assert r.status_code == 503 and r.headers["retry-after"] == "1"

    async def bad():
        raise RequestError(422, "nope")

    assert asyncio.run(respond(bad(), "explain", m)).status_code == 422
    assert m.counts == [("500", "search"), ("503", "search"), ("422", "explain")]


def test_silent_stage_becomes_503(toy_artifact):
    class _Slow(_Enc):
        async def encode(self, artifact, query, history):
            await asyncio.sleep(5)

    pipe, _ = _pipeline(toy_artifact)
    pipe.encoder = Local(_Slow())
    pipe.stage_timeout_s = 0.05
    r = asyncio.run(respond(pipe.search(SearchRequest(query="x")), "search", _Counter()))
    assert r.status_code == 503 and "stage encode did not answer" in json.loads(r.body)["error"]


def test_ranker_file_names_match_the_rankers_module(toy_artifact):
    from karma_ray.models import rankers
    from karma_ray.serve.catalog import RANKER_FILES, load_ranker_bundle

    assert set(RANKER_FILES) == {rankers.META_FILE, rankers.WEIGHTS_FILE}
    bundle, reason = load_ranker_bundle(toy_artifact)
    assert bundle is None and "no trained rankers" in reason


# ---- the encoder's micro-batcher -----------------------------------------------------------------
def test_micro_batcher_waits_to_fill_a_batch_only_when_saturated():
    """At light load a call runs at once; once saturated (a refusal, or a full batch before), a short
    batch waits up to fill_wait_s for more calls, so batches stay full under load."""
    import time

    from karma_ray.serve.encoder import MicroBatcher

    sizes: list[int] = []

    async def run(saturated: bool, gap_s: float, n: int) -> list[int]:
        sizes.clear()
        b = MicroBatcher(lambda items: [i * 2 for i in items], 3, lambda size, ms: sizes.append(size),
                         fill_wait_s=0.5)
        b.saturated = saturated

        async def late(i):
            await asyncio.sleep(gap_s * i)
            return await b.submit(i)
        t = time.perf_counter()
        out = await asyncio.gather(*(late(i) for i in range(n)))
        assert out == [i * 2 for i in range(n)]
        return [*sizes, time.perf_counter() - t]

    *light, _ = asyncio.run(run(False, 0.05, 3))
    assert light[0] == 1  # not saturated: the first call runs alone, at once
    *busy, took = asyncio.run(run(True, 0.05, 3))
    assert busy == [3] and took < 0.45  # saturated: waited for the batch to fill, not for the whole 0.5 s


def test_micro_batcher_admits_a_call_only_if_it_can_answer_it_within_the_budget():
    """The time bound behind `max_wait_forwards`: an idle replica takes any call; a busy one takes a call
    only if the running forward's remainder plus the call's own batch fits the budget, from measured
    forward times (an unseen batch size scales the nearest seen one)."""
    import time

    from karma_ray.serve.encoder import ForwardCost, MicroBatcher

    cost = ForwardCost()
    assert cost(3) == 0.0  # nothing measured yet
    cost.observe(1, 0.1)
    assert cost(2) == pytest.approx(0.2)  # one size seen: in proportion
    cost.observe(3, 0.05, provisional=True)
    cost.observe(3, 0.25)  # the first real forward replaces a provisional figure
    assert cost(3) == pytest.approx(0.25)
    assert cost(2) == pytest.approx(0.175) and cost(5) == pytest.approx(0.4)  # on the line through 1 and 3
    cost.observe(2, 0.9)  # measured while the machine was busy: capped at two forwards of one
    assert cost(2) == pytest.approx(0.2)

    async def run() -> list[bool]:
        b = MicroBatcher(lambda items: time.sleep(0.1 * len(items)) or items, 3)
        b.cost.observe(1, 0.1)
        seen = [b.answers_within(0.01)]  # idle: always
        first = asyncio.create_task(b.submit("a"))
        await asyncio.sleep(0.02)  # "a" is running: ~0.08 s left, and a new call's own forward is 0.1 s
        seen += [b.answers_within(0.15), b.answers_within(0.25)]
        second = asyncio.create_task(b.submit("b"))
        await asyncio.sleep(0)
        seen.append(b.answers_within(0.25))  # would join "b": their batch of 2 (0.2 s) ends too late for "b"
        await asyncio.gather(first, second)
        return seen

    assert asyncio.run(run()) == [True, False, True, False]


def test_encoder_gate_stays_closed_for_as_long_as_the_encoder_said():
    """A refusal with `retry_in_s` (the encoder could not answer in time) closes the gate for that long:
    calls in between are refused at the ingress, with no hop; the hint survives pickling (Ray's hop)."""
    import pickle
    import time

    from karma_ray.serve.pipeline import EncoderGate, StageOverloaded, retry_hint_s

    refusal = pickle.loads(pickle.dumps(StageOverloaded("late", retry_in_s=0.2)))
    assert retry_hint_s(refusal) == 0.2 and str(refusal) == "late"
    gate, calls = EncoderGate(), []

    async def encode(refuse: bool):
        calls.append(refuse)
        if refuse:
            raise refusal
        return "h"

    async def run():
        with pytest.raises(StageOverloaded):
            await gate.call(lambda: encode(True))
        with pytest.raises(StageOverloaded, match="takes calls again"):
            await gate.call(lambda: encode(False))  # refused here, never sent
        await asyncio.sleep(0.25)
        return await gate.call(lambda: encode(False))

    t = time.perf_counter()
    assert asyncio.run(run()) == "h" and calls == [True, False] and time.perf_counter() - t >= 0.2
    assert gate.cap is None  # a timed refusal sets no count cap


def test_encoder_gate_sheds_at_the_ingress_while_the_encoder_is_full():
    """After a refusal, the calls still in flight are the cap: more are refused without a hop; each
    answered call raises the cap; a lone request always passes."""
    from karma_ray.serve.pipeline import EncoderGate, StageOverloaded

    gate, room, calls = EncoderGate(), 2, []

    async def encode():
        calls.append(1)
        if gate.in_flight > room:
            raise StageOverloaded("full")
        await asyncio.sleep(0.05)
        return "h"

    async def burst(n):
        return await asyncio.gather(*(gate.call(encode) for _ in range(n)), return_exceptions=True)

    out = asyncio.run(burst(4))
    assert [o == "h" for o in out].count(True) == 2 and gate.cap == 2 + 2  # refused at 3 and 4 -> cap 2, +2 answers
    calls.clear()
    gate.cap, gate.in_flight = 2, 2
    with pytest.raises(StageOverloaded):
        asyncio.run(gate.call(encode))  # at the cap: refused before the encoder is called
    assert calls == []
    gate.cap, gate.in_flight = 1, 0
    assert asyncio.run(gate.call(encode)) == "h" and gate.cap == 2  # a lone request passes
