"""The /search and /explain logic over four stage handles, without Serve.

Request flow of /search (each arrow is a DeploymentHandle hop with a compact payload):
  pin the artifact version → drop unknown history ids → (EncoderGate: 503 at once while the encoder is
  known to be full) → InterestEncoder.encode → h (d floats)
  → Recall.search(h, history) → ≤200 (ids, scores) → PreRank.score → ~50 → Rank.score → k
  → titles from the pinned version's catalogue → JSON.
Every stage call carries the pinned artifact and answers with the version it used; a mismatch is
an error, so a response never mixes versions (see versions.py and rollout.py).

Stage calls are idempotent, so a call that fails because its replica died (or became unreachable)
is retried on another replica, up to `stage_retries` times within the stage's time budget.
A handle here is anything with `handle.method.remote(*args)` returning an awaitable, so the
in-process stand-in (`harness.inprocess_pipeline`) runs this very code without Serve.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

import numpy as np

from karma_ray.serve.catalog import Catalog
from karma_ray.serve.schemas import (
    ExplainRequest, ExplainResponse, HealthResponse, SearchItem, SearchRequest, SearchResponse, StageCounts,
    StageLatency,
)
from karma_ray.serve.versions import HeldVersions, artifact_key

log = logging.getLogger("ray.serve")
RETRY_BACKOFF_S = 0.05


class RequestError(Exception):
    """An answer other than 200 that the client should see as is (status, message, headers)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class StageTimeout(Exception):
    """A stage (or the whole request) did not answer within its time budget: 503."""


class StageOverloaded(Exception):
    """A stage replica refused a call because it is full (`max_pending`, or it could not answer in time):
    503 at once. `retry_in_s` > 0: the refusing replica expects to take a call again that much later."""

    def __init__(self, message: str, retry_in_s: float = 0.0):
        super().__init__(message, retry_in_s)
        self.retry_in_s = retry_in_s

    def __str__(self) -> str:
        return str(self.args[0])


def retry_hint_s(error: BaseException) -> float:
    """A StageOverloaded's `retry_in_s`, also through Ray's wrapping of a remote exception (`cause`)."""
    for e in (error, getattr(error, "cause", None)):
        if isinstance(getattr(e, "retry_in_s", None), (int, float)):
            return float(e.retry_in_s)
    return 0.0


class VersionMismatch(Exception):
    """A stage answered from another artifact version than the one pinned for the request (a bug)."""


def replica_lost_errors() -> tuple[type, ...]:
    """Errors that mean "the replica that took the call is gone": safe to retry an idempotent call."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    return (RayActorError, ReplicaUnavailableError)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


async def _await(x):
    return await x


class EncoderGate:
    """Sheds /search at the ingress, before any hop, while the encoder is known to be full.

    A refusal that says when the encoder will take calls again (`retry_in_s`: it could not answer in
    time) closes the gate until then. Any other refusal (its replicas hold `max_pending`, or its router
    queue is full) makes the calls this ingress still has in flight there the cap; new requests are
    refused at once while that many are in flight, and every answered call raises the cap by one (so a
    lone request always passes and the cap follows the encoder's real room). Under overload the encoder
    then sees about one refused call per batch instead of one per excess request: a refusal costs a
    hop, an exception and a traceback in the replica that is computing the served requests' forwards."""

    def __init__(self, refused: tuple[type, ...] = (StageOverloaded,)):
        self.refused = refused
        self.in_flight = 0
        self.cap: int | None = None  # None: no refusal seen yet, no cap
        self.closed_until = 0.0  # perf_counter time before which the encoder said it takes no call

    def admit(self) -> None:
        wait = self.closed_until - time.perf_counter()
        if wait > 0:
            raise StageOverloaded(f"the encoder takes calls again in {wait * 1000:.0f} ms", retry_in_s=wait)
        if self.cap is not None and self.in_flight >= self.cap:
            raise StageOverloaded(f"the encoder is full ({self.in_flight} calls of this ingress in flight)")

    async def call(self, make_call):
        self.admit()
        self.in_flight += 1
        try:
            out = await make_call()
        except self.refused as e:
            hint = retry_hint_s(e)
            if hint > 0:
                self.closed_until = max(self.closed_until, time.perf_counter() + hint)
            else:
                self.cap = max(1, self.in_flight - 1)
            raise
        finally:
            self.in_flight -= 1
        if self.cap is not None:
            self.cap += 1
        return out


class SearchPipeline:
    """The request logic; `catalogs` holds the ingress's artifact versions, `active` is the pinned one."""

    def __init__(self, catalogs: HeldVersions[Catalog], encoder, recall, prerank, rank, metrics=None,
                 stage_timeout_s: float | None = None, stage_retries: int = 2, retry_on: tuple[type, ...] = ()):
        self.catalogs = catalogs
        self.active = catalogs.initial
        self.encoder, self.recall, self.prerank, self.rank = encoder, recall, prerank, rank
        self.metrics = metrics
        self.stage_timeout_s = stage_timeout_s  # None: wait as long as the request deadline allows
        self.stage_retries = stage_retries
        self.retry_on = retry_on
        self.encoder_gate = EncoderGate()
        self._rankers: dict[str, bool] = {}

    def activate(self, artifact: str) -> None:
        """Pin new requests to `artifact` (loaded first); requests already running keep theirs."""
        key = artifact_key(artifact)
        self.catalogs.get(key, reason="preload")
        self.active = key

    # ---- shared pieces -----------------------------------------------------------------------
    def _history(self, catalog: Catalog, req: SearchRequest) -> tuple[list[int], list[int]]:
        """(known history, ignored ids); 422 if nothing usable is left."""
        known, unknown = catalog.split_known(req.history)
        ignored = list(dict.fromkeys(unknown))
        if not known and not req.clean_query:
            shown = ignored[:20]
            raise RequestError(422, f"none of the history item ids are in the catalogue ({shown}"
                                    f"{' …' if len(ignored) > 20 else ''}) and no query was given")
        return known, ignored

    async def _call(self, stage: str, make_call: Callable[[], Any]) -> Any:
        """Await a fresh handle call; retry it when its replica is lost; 503 past the stage timeout."""
        deadline = time.monotonic() + self.stage_timeout_s if self.stage_timeout_s else None
        for attempt in range(self.stage_retries + 1):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            try:
                call = make_call()
                return await (call if left is None else asyncio.wait_for(_await(call), left))
            except asyncio.TimeoutError:
                break
            except self.retry_on as e:
                if attempt == self.stage_retries:
                    raise
                log.warning("stage %s: %s; retrying on another replica (%d/%d)", stage, type(e).__name__,
                            attempt + 1, self.stage_retries)
                await asyncio.sleep(RETRY_BACKOFF_S * (attempt + 1))
        raise StageTimeout(f"stage {stage} did not answer within {self.stage_timeout_s:g} s")

    async def _timed(self, stage: str, lat: dict[str, float], version: str, make_call) -> Any:
        """Await a stage call, record its wall time and check it answered from the pinned version."""
        t0 = time.perf_counter()
        *out, answered = await self._call(stage, make_call)
        lat[stage] = _ms(t0)
        if self.metrics is not None:
            self.metrics.observe_stage(stage, lat[stage])
        if answered != version:
            raise VersionMismatch(f"stage {stage} answered from version {answered!r}, the request is pinned to "
                                  f"{version!r}")
        return out[0] if len(out) == 1 else out

    async def rankers(self, artifact: str) -> bool:
        if artifact not in self._rankers:
            a, b = await asyncio.gather(self.prerank.has_rankers.remote(artifact),
                                        self.rank.has_rankers.remote(artifact))
            self._rankers[artifact] = bool(a and b)
        return self._rankers[artifact]

    # ---- endpoints ---------------------------------------------------------------------------
    async def search(self, req: SearchRequest) -> SearchResponse:
        t0 = time.perf_counter()
        art = self.active
        catalog = self.catalogs.get(art)
        v = catalog.version
        history, ignored = self._history(catalog, req)
        lat: dict[str, float] = {}
        query, k = req.clean_query, req.k
        h = await self.encoder_gate.call(
            lambda: self._timed("encode", lat, v, lambda: self.encoder.encode.remote(art, query, history)))
        h = np.asarray(h, dtype=np.float32)
        ids, _ = await self._timed("recall", lat, v, lambda: self.recall.search.remote(art, h, history, k))
        n_recall = len(ids)
        ids, _ = await self._timed("prerank", lat, v, lambda: self.prerank.score.remote(art, h, ids, history, k))
        n_prerank = len(ids)
        ids, scores = await self._timed("rank", lat, v, lambda: self.rank.score.remote(art, h, ids, history, k))
        titles = catalog.title_of(ids)
        items = [SearchItem(item_id=int(i), title=t, score=float(s)) for i, t, s in zip(ids, titles, scores)]
        rankers = await self.rankers(art)
        lat["total"] = _ms(t0)
        return SearchResponse(items=items, stages=StageCounts(recall=n_recall, prerank=n_prerank, rank=len(items)),
                              latency_ms=StageLatency(**lat), model_version=v, ignored_history=ignored,
                              rankers=rankers)

    async def explain(self, req: ExplainRequest) -> ExplainResponse:
        t0 = time.perf_counter()
        art = self.active
        catalog = self.catalogs.get(art)
        history, ignored = self._history(catalog, req)
        text = await self._timed("explain", {}, catalog.version,
                                 lambda: self.encoder.explain.remote(art, req.clean_query, history))
        return ExplainResponse(text=str(text), model_version=catalog.version, ignored_history=ignored,
                               latency_ms=_ms(t0))

    def health(self) -> HealthResponse:
        """Liveness: this replica's pinned version, no stage calls."""
        catalog = self.catalogs.get(self.active)
        return HealthResponse(status="ok", model_version=catalog.version, artifact=self.active,  # path or s3:// URI
                              n_items=len(catalog), rankers=self._rankers.get(self.active, False))

    async def readiness(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """Ask one replica of every stage whether it is up and holds the pinned version."""
        art = self.active
        version = self.catalogs.get(art).version
        handles = {"InterestEncoder": self.encoder, "Recall": self.recall, "PreRank": self.prerank,
                   "Rank": self.rank}

        async def probe(handle) -> dict[str, Any]:
            try:
                info = await asyncio.wait_for(_await(handle.info.remote()), timeout_s)
            except Exception as e:  # noqa: BLE001 — a stage that cannot answer is simply not ready
                return {"ready": False, "error": f"{type(e).__name__}: {e}"[:300]}
            held = info.get("versions", {})
            return {"ready": art in held, "versions": sorted(set(held.values()))}

        results = await asyncio.gather(*(probe(h) for h in handles.values()))
        stages = dict(zip(handles, results))
        return {"ready": all(s["ready"] for s in stages.values()), "model_version": version, "stages": stages}
