"""SearchIngress: the FastAPI front door — POST /search, POST /explain, GET /healthz, OpenAPI at /docs.

Request flow of /search (each arrow is a DeploymentHandle hop with a compact payload):
  validate → drop unknown history ids → InterestEncoder.encode(query, history) → h (d floats)
  → Recall.search(h, history) → ≤200 (ids, scores) → PreRank.score(h, ids, history) → ~50
  → Rank.score(h, ids, history, k) → k (ids, scores) → titles from the catalogue → JSON.

Errors are JSON, never stack traces:
  422  validation (k out of range, wrong JSON types, oversized history/query, malformed JSON,
       neither query nor history, or every history id unknown and no query);
  503  overloaded (a stage's queue is full: `max_queued_requests`), a stage is unavailable, or a
       stage did not answer within the ingress's `stage_timeout_s` (user_config);
  500  anything else, with a request id that is also in the replica log.
Every answered /search and /explain request is counted in `karma_requests_total{status,endpoint}`.

`SearchPipeline` holds the request logic without Serve, so benchmarks can run the very same code
with the stage objects called in-process (see benchmarks/serve_latency.py).
"""
# No `from __future__ import annotations` here: FastAPI must see real annotation types on the
# ingress methods (Serve re-wraps them, and string annotations then degrade to query params).

import asyncio
import logging
import time
import uuid
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from ray import serve

from karma_ray.serve.schemas import (
    CONTRACT_VERSION, MAX_HISTORY, MAX_K, ErrorResponse, ExplainRequest, ExplainResponse, HealthResponse, SearchItem,
    SearchRequest, SearchResponse, StageCounts, StageLatency,
)

log = logging.getLogger("ray.serve")


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class StageTimeout(Exception):
    """A stage did not answer within `stage_timeout_s` (e.g. it has no running replica): 503."""


async def _await(x):
    return await x


def _overload_types() -> tuple[type, ...]:
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    out: list[type] = [BackPressureError, DeploymentUnavailableError]
    try:
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        out += [ActorDiedError, ActorUnavailableError]
    except ImportError:  # older Ray
        pass
    return tuple(out)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


class SearchPipeline:
    """The /search and /explain logic over four stage handles (DeploymentHandles or in-process shims).

    A handle here is anything with `handle.method.remote(*args)` returning an awaitable.
    """

    def __init__(self, catalog, encoder, recall, prerank, rank, metrics=None, stage_timeout_s: float | None = None):
        self.catalog = catalog
        self.encoder, self.recall, self.prerank, self.rank = encoder, recall, prerank, rank
        self.metrics = metrics
        self.stage_timeout_s = stage_timeout_s  # None: wait as long as the HTTP request_timeout_s allows
        self._rankers: bool | None = None

    # ---- shared pieces -----------------------------------------------------------------------
    def _history(self, req: SearchRequest) -> tuple[list[int], list[int]]:
        """(known history, ignored ids); 422 if nothing usable is left."""
        known, unknown = self.catalog.split_known(req.history)
        ignored = list(dict.fromkeys(unknown))
        if not known and not req.clean_query:
            shown = ignored[:20]
            raise RequestError(422, f"none of the history item ids are in the catalogue ({shown}"
                                    f"{' …' if len(ignored) > 20 else ''}) and no query was given")
        return known, ignored

    async def _call(self, stage: str, call) -> Any:
        if not self.stage_timeout_s:
            return await call
        try:
            return await asyncio.wait_for(_await(call), self.stage_timeout_s)
        except asyncio.TimeoutError:
            raise StageTimeout(f"stage {stage} did not answer within {self.stage_timeout_s:g} s") from None

    async def _timed(self, stage: str, lat: dict[str, float], make_call) -> Any:
        """Await `make_call()` (a handle call) and record its wall time, submission included."""
        t0 = time.perf_counter()
        out = await self._call(stage, make_call())
        lat[stage] = _ms(t0)
        if self.metrics is not None:
            self.metrics.observe_stage(stage, lat[stage])
        return out

    async def rankers(self) -> bool:
        if self._rankers is None:
            a, b = await asyncio.gather(self.prerank.has_rankers.remote(), self.rank.has_rankers.remote())
            self._rankers = bool(a and b)
        return self._rankers

    # ---- endpoints ---------------------------------------------------------------------------
    async def search(self, req: SearchRequest) -> SearchResponse:
        t0 = time.perf_counter()
        history, ignored = self._history(req)
        lat: dict[str, float] = {}
        query = req.clean_query
        h = await self._timed("encode", lat, lambda: self.encoder.encode.remote(query, history))
        h = np.asarray(h, dtype=np.float32)
        ids, _ = await self._timed("recall", lat, lambda: self.recall.search.remote(h, history, req.k))
        n_recall = len(ids)
        ids, _ = await self._timed("prerank", lat, lambda: self.prerank.score.remote(h, ids, history, req.k))
        n_prerank = len(ids)
        ids, scores = await self._timed("rank", lat, lambda: self.rank.score.remote(h, ids, history, req.k))
        titles = self.catalog.title_of(ids)
        items = [SearchItem(item_id=int(i), title=t, score=float(s)) for i, t, s in zip(ids, titles, scores)]
        rankers = await self.rankers()
        lat["total"] = _ms(t0)
        return SearchResponse(items=items, stages=StageCounts(recall=n_recall, prerank=n_prerank, rank=len(items)),
                              latency_ms=StageLatency(**lat), model_version=self.catalog.version,
                              ignored_history=ignored, rankers=rankers)

    async def explain(self, req: ExplainRequest) -> ExplainResponse:
        t0 = time.perf_counter()
        history, ignored = self._history(req)
        text = await self._call("explain", self.encoder.explain.remote(req.clean_query, history))
        return ExplainResponse(text=str(text), model_version=self.catalog.version, ignored_history=ignored,
                               latency_ms=_ms(t0))

    async def health(self) -> HealthResponse:
        try:
            rankers = await asyncio.wait_for(self.rankers(), timeout=5.0)
        except Exception:  # a stage that is still starting must not fail liveness
            rankers = False
        return HealthResponse(status="ok", model_version=self.catalog.version, artifact=str(self.catalog.path),
                              n_items=len(self.catalog), rankers=rankers)


# ---- HTTP layer ------------------------------------------------------------------------------
DESCRIPTION = f"""KARMA personalised search on Ray Serve (contract v{CONTRACT_VERSION}, DESIGN §5).

* `k` is 1..{MAX_K} (default 20); `history` holds at most {MAX_HISTORY} item ids; `query` at most 512 characters.
* Unknown history ids are dropped and listed in `ignored_history`; if no known history item and no
  query remain, the answer is 422.
* Errors are JSON `{{"error": str, "detail": [...]?}}`: 422 validation, 503 overloaded/unavailable, 500 internal.
"""
app = FastAPI(title="karma-ray search", version=CONTRACT_VERSION, description=DESCRIPTION)
_ERRORS = {422: {"model": ErrorResponse, "description": "Invalid request"},
           500: {"model": ErrorResponse, "description": "Internal error"},
           503: {"model": ErrorResponse, "description": "Overloaded or a stage is unavailable; retry later"}}


def _field(loc: tuple | list) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) if parts else "body"


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = []
    for e in exc.errors():  # no `input` echo: a 10k-item history must not come back in the body
        loc, msg, typ = [str(p) for p in e.get("loc", ())], str(e.get("msg", "")), str(e.get("type", ""))
        if typ == "json_invalid":  # FastAPI puts the character offset where a field name would be
            msg, loc = f"malformed JSON ({e.get('ctx', {}).get('error', msg)} at character {loc[-1]})", ["body"]
        errors.append({"loc": loc, "msg": msg, "type": typ})
    summary = "; ".join(f"{_field(e['loc'])}: {e['msg']}" for e in errors[:5])
    try:
        from karma_ray.serve.metrics import get_metrics  # by name: the replica's one instance

        get_metrics().count(422, request.url.path.strip("/") or "root")
    except Exception:  # noqa: BLE001 — outside a Serve replica (unit tests) there is nothing to count
        pass
    return JSONResponse({"error": f"invalid request: {summary}", "detail": errors}, status_code=422)


async def respond(call, endpoint: str, metrics=None, overload: tuple[type, ...] = ()) -> Any:
    """Await one endpoint's work and map every failure to a JSON error (never a stack trace)."""
    try:
        out = await call
        status = 200
        if isinstance(out, BaseModel):  # serialise once with pydantic-core; FastAPI would re-validate
            out = Response(out.model_dump_json(), media_type="application/json")
    except RequestError as e:
        status, out = e.status, JSONResponse({"error": e.message}, status_code=e.status)
    except StageTimeout as e:
        log.warning("%s: %s", endpoint, e)
        status = 503
        out = JSONResponse({"error": f"{e}; retry later"}, status_code=503, headers={"Retry-After": "1"})
    except overload as e:
        log.warning("%s overloaded: %s: %s", endpoint, type(e).__name__, e)
        status = 503
        out = JSONResponse({"error": f"service overloaded or a stage is unavailable ({type(e).__name__}); "
                                     "retry later"}, status_code=503, headers={"Retry-After": "1"})
    except Exception:  # noqa: BLE001 — the body must never carry a stack trace
        rid = uuid.uuid4().hex[:12]
        log.exception("%s failed (request id %s)", endpoint, rid)
        status = 500
        out = JSONResponse({"error": f"internal error (request id {rid}; see the SearchIngress replica log)"},
                           status_code=500)
    if metrics is not None:
        metrics.count(status, endpoint)
    return out


@serve.deployment
@serve.ingress(app)
class SearchIngress:
    def __init__(self, encoder, recall, prerank, rank, artifact: str):
        from karma_ray.serve.catalog import Catalog
        from karma_ray.serve.metrics import get_metrics

        self.metrics = get_metrics()
        self._handles = {"encoder": encoder, "recall": recall, "prerank": prerank, "rank": rank}
        self.pipeline = SearchPipeline(Catalog.load(artifact, with_emb=False), encoder, recall, prerank, rank,
                                       self.metrics)
        self._overload = _overload_types()

    async def reconfigure(self, cfg: dict[str, Any]) -> None:  # async: handle.options() wants the event loop
        """user_config:
          stage_timeout_s   per-hop wait before answering 503 (unset: no per-hop limit);
          handle_transport  "actor" (Ray actor calls, Serve's default) or "grpc" (Serve's
                            inter-deployment gRPC, `_by_reference=False`; fewer copies per hop);
          serialization     request/response serialisation for gRPC hops: "cloudpickle" | "pickle".
        """
        t = cfg.get("stage_timeout_s")
        self.pipeline.stage_timeout_s = float(t) if t else None
        transport = cfg.get("handle_transport", "actor")
        if transport not in ("actor", "grpc"):
            raise ValueError(f"handle_transport must be 'actor' or 'grpc', not {transport!r}")
        opts: dict[str, Any] = {}
        if transport == "grpc":
            opts["_by_reference"] = False
            if cfg.get("serialization"):
                opts["request_serialization"] = opts["response_serialization"] = cfg["serialization"]
        for name, handle in self._handles.items():
            setattr(self.pipeline, name, handle.options(**opts) if opts else handle)

    async def _answer(self, endpoint: str, call) -> Any:
        return await respond(call, endpoint, self.metrics, self._overload)

    @app.post("/search", response_model=SearchResponse, responses=_ERRORS,
              summary="Top-k items for a query and/or click history")
    async def search(self, req: SearchRequest):
        return await self._answer("search", self.pipeline.search(req))

    @app.post("/explain", response_model=ExplainResponse, responses=_ERRORS,
              summary="Text decoded from the interest embedding h (\"Next: …\")")
    async def explain(self, req: ExplainRequest):
        return await self._answer("explain", self.pipeline.explain(req))

    @app.get("/healthz", response_model=HealthResponse, summary="Liveness and artifact version")
    async def healthz(self):
        return await self.pipeline.health()
