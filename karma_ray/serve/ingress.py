"""SearchIngress: the FastAPI front door — POST /search, POST /explain, GET /healthz, GET /readyz,
OpenAPI at /docs (can be turned off). The request logic is `pipeline.SearchPipeline`; the gate in
front of it (body cap, bearer token, rate limit) is `guard.Guard`.

Errors are JSON, never stack traces:
  401  missing/invalid bearer token (when auth is on);   404 docs turned off;
  413  body over `max_body_bytes`;   429 over the per-client rate limit (Retry-After);
  422  validation (k or an id out of range, unknown fields, wrong JSON types, oversized history or
       query, malformed JSON, neither query nor history, every history id unknown and no query);
  503  shed or unavailable, always with Retry-After. Refused at once, never queued: the ingress
       already runs `max_ongoing_search` requests, an encoder replica already holds `max_pending`,
       a stage's router queue is full (`max_queued_requests`), /explain is at its own limit, the
       encoder refused a call and this ingress still has as many in flight (`pipeline.EncoderGate`). Also:
       a stage unavailable, or a stage / the whole request over its time budget (`stage_timeout_s`,
       `request_timeout_s`, which the YAML keeps below the proxy's own `request_timeout_s`, so
       timeouts are JSON too);
  500  anything else, with a request id that is also in the replica log.
Every answered request is counted in `karma_requests_total{status,endpoint}`.
"""
# No `from __future__ import annotations` here: FastAPI must see real annotation types on the
# ingress methods (Serve re-wraps them, and string annotations then degrade to query params).

import asyncio
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from karma_ray.serve import guard
from karma_ray.serve.catalog import Catalog
from karma_ray.serve.metrics import get_metrics
from karma_ray.serve.pipeline import RequestError, SearchPipeline, StageOverloaded, StageTimeout, replica_lost_errors
from karma_ray.serve.schemas import (
    CONTRACT_VERSION, MAX_HISTORY, MAX_K, ErrorResponse, ExplainRequest, ExplainResponse, HealthResponse,
    SearchRequest, SearchResponse,
)
from karma_ray.serve.versions import HeldVersions

log = logging.getLogger("ray.serve")
RETRY_AFTER = {"Retry-After": "1"}
WARMUP_TIMEOUT_S = 120.0


def overload_errors() -> tuple[type, ...]:
    """Errors that mean "no capacity right now": answered 503 + Retry-After at once."""
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    return (StageOverloaded, BackPressureError, DeploymentUnavailableError, *replica_lost_errors())


# ---- HTTP layer ------------------------------------------------------------------------------
DESCRIPTION = f"""KARMA personalised search on Ray Serve (contract v{CONTRACT_VERSION}).

* `k` is 1..{MAX_K} (default 20); `history` holds at most {MAX_HISTORY} int64 item ids; `query` at most
  512 characters; unknown fields are rejected.
* Unknown history ids are dropped and listed in `ignored_history`; if no known history item and no
  query remain, the answer is 422.
* Errors are JSON `{{"error": str, "detail": [...]?}}`: 401 auth, 413 body too large, 422 validation,
  429 rate limited, 503 overloaded/unavailable (with Retry-After), 500 internal.
* When the deployment turns auth on, send `Authorization: Bearer <token>`.
"""
app = FastAPI(title="karma-ray search", version=CONTRACT_VERSION, description=DESCRIPTION)
app.add_middleware(guard.Guard)
_ERRORS = {code: {"model": ErrorResponse, "description": text} for code, text in (
    (401, "Missing or invalid bearer token"), (413, "Request body too large"), (422, "Invalid request"),
    (429, "Rate limited; retry after Retry-After seconds"), (500, "Internal error"),
    (503, "Overloaded or a stage is unavailable; retry after Retry-After seconds"))}


def _field(loc: tuple | list) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) if parts else "body"


def _count(status: int, request: Request) -> None:
    try:
        get_metrics().count(status, request.url.path.strip("/") or "root")
    except Exception:  # noqa: BLE001 — outside a Serve replica (unit tests) there is nothing to count
        pass


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = []
    for e in exc.errors():  # no `input` echo: a 10k-item history must not come back in the body
        loc, msg, typ = [str(p) for p in e.get("loc", ())], str(e.get("msg", "")), str(e.get("type", ""))
        if typ == "json_invalid":  # FastAPI puts the character offset where a field name would be
            msg, loc = f"malformed JSON ({e.get('ctx', {}).get('error', msg)} at character {loc[-1]})", ["body"]
        errors.append({"loc": loc, "msg": msg, "type": typ})
    summary = "; ".join(f"{_field(e['loc'])}: {e['msg']}" for e in errors[:5])
    _count(422, request)
    return JSONResponse({"error": f"invalid request: {summary}", "detail": errors}, status_code=422)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """404 / 405 / a body FastAPI cannot parse (400): the same JSON error shape as everything else."""
    _count(exc.status_code, request)
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def respond(call, endpoint: str, metrics=None, overload: tuple[type, ...] = (),
                  timeout_s: float | None = None) -> Any:
    """Await one endpoint's work (within `timeout_s`) and map every failure to a JSON error."""
    try:
        out = await (asyncio.wait_for(call, timeout_s) if timeout_s else call)
        status = 200
        if isinstance(out, BaseModel):  # serialise once with pydantic-core; FastAPI would re-validate
            out = Response(out.model_dump_json(), media_type="application/json")
    except RequestError as e:
        status, out = e.status, JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)
    except (StageTimeout, asyncio.TimeoutError) as e:
        msg = str(e) or f"the request did not finish within {timeout_s:g} s"
        log.warning("%s: %s", endpoint, msg)
        status, out = 503, JSONResponse({"error": f"{msg}; retry later"}, status_code=503, headers=RETRY_AFTER)
    except overload as e:
        log.warning("%s overloaded: %s: %s", endpoint, type(e).__name__, e)
        status = 503
        out = JSONResponse({"error": f"service overloaded or a stage is unavailable ({type(e).__name__}); "
                                     "retry later"}, status_code=503, headers=RETRY_AFTER)
    except Exception:  # noqa: BLE001 — the body must never carry a stack trace
        rid = uuid.uuid4().hex[:12]
        log.exception("%s failed (request id %s)", endpoint, rid)
        status = 500
        out = JSONResponse({"error": f"internal error (request id {rid}; see the SearchIngress replica log)"},
                           status_code=500)
    if metrics is not None:
        metrics.count(status, endpoint)
    return out


class ConcurrencyLimit:
    """At most `limit` calls at once; beyond that a 503 at once (no queue): /explain's own limit."""

    def __init__(self, limit: int, name: str):
        self.limit, self.name, self.active = int(limit), name, 0

    async def run(self, call):
        if self.active >= self.limit:
            call.close()  # never awaited
            raise RequestError(503, f"{self.name} is at its concurrency limit ({self.limit}); retry later", RETRY_AFTER)
        self.active += 1
        try:
            return await call
        finally:
            self.active -= 1


@serve.deployment
@serve.ingress(app)
class SearchIngress:
    def __init__(self, encoder, recall, prerank, rank, artifact: str):
        self.metrics = get_metrics()
        self._handles = {"encoder": encoder, "recall": recall, "prerank": prerank, "rank": rank}
        self.pipeline = SearchPipeline(HeldVersions(lambda a: Catalog.load(a, with_emb=False), artifact),
                                       encoder, recall, prerank, rank, self.metrics, retry_on=replica_lost_errors())
        self._overload = overload_errors()
        from ray.serve.exceptions import BackPressureError

        self.pipeline.encoder_gate.refused = (StageOverloaded, BackPressureError)
        self.request_timeout_s: float | None = None
        self.explain_limit = ConcurrencyLimit(2, "/explain")
        self.search_limit = ConcurrencyLimit(10**9, "/search")
        self._warm: set[str] = set()

    async def reconfigure(self, cfg: dict[str, Any]) -> None:  # async: handle.options() wants the event loop
        """user_config:
          stage_timeout_s    per-stage time budget, retries included (unset: no per-stage limit);
          request_timeout_s  whole-request budget; keep it below http_options.request_timeout_s;
          stage_retries      retries of a stage call whose replica died (default 2);
          explain_max_ongoing  /explain calls at once per ingress replica, beyond: 503 (default 2);
          max_ongoing_search   /search calls at once per ingress replica, beyond: 503 at once, before
                             any stage is touched (the cheapest refusal; 0 = no limit);
          handle_transport   "actor" (Ray actor calls, Serve's default) or "grpc" (Serve's
                             inter-deployment gRPC, `_by_reference=False`; fewer copies per hop);
          serialization      request/response serialisation for gRPC hops: "cloudpickle" | "pickle";
          artifact           the version new requests are pinned to (a rollout sets it; default: the
                             app's args.artifact); the guard's keys (see guard.GuardConfig).
        """
        guard.configure(guard.GuardConfig.from_user_config(cfg))
        p = self.pipeline
        p.stage_timeout_s = float(cfg["stage_timeout_s"]) if cfg.get("stage_timeout_s") else None
        p.stage_retries = int(cfg.get("stage_retries", 2))
        self.request_timeout_s = float(cfg["request_timeout_s"]) if cfg.get("request_timeout_s") else None
        self.explain_limit = ConcurrencyLimit(int(cfg.get("explain_max_ongoing", 2)), "/explain")
        self.search_limit = ConcurrencyLimit(int(cfg.get("max_ongoing_search", 0)) or 10**9, "/search")
        self._set_transport(cfg)
        await self._switch(cfg.get("artifact") or p.catalogs.initial)

    def _set_transport(self, cfg: dict[str, Any]) -> None:
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

    async def _switch(self, artifact: str) -> None:
        """Load the version's catalogue, send one request through every stage with it (warms the
        handles, the routers and the stages), then pin new requests to it."""
        from karma_ray.serve.versions import artifact_key

        key = artifact_key(artifact)
        self.pipeline.catalogs.get(key, reason="preload")
        if key not in self._warm:
            previous, self.pipeline.active = self.pipeline.active, key
            try:
                await asyncio.wait_for(self.pipeline.search(SearchRequest(query="warm up", k=1)), WARMUP_TIMEOUT_S)
                self._warm.add(key)
            except Exception as e:  # noqa: BLE001 — a slow stage must not keep the ingress down
                log.warning("warm-up of %s through the stages failed: %s: %s", key, type(e).__name__, e)
            finally:
                self.pipeline.active = previous
        self.pipeline.activate(key)
        self.pipeline.catalogs.hold([key])

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and replaces it."""
        self.pipeline.catalogs.get(self.pipeline.active).check()

    async def artifacts(self) -> dict[str, str]:
        """{"initial": the app's build-time artifact, "active": the pinned one} (for rollout.py)."""
        return {"initial": self.pipeline.catalogs.initial, "active": self.pipeline.active}

    async def _answer(self, endpoint: str, call) -> Any:
        return await respond(call, endpoint, self.metrics, self._overload, self.request_timeout_s)

    @app.post("/search", response_model=SearchResponse, responses=_ERRORS,
              summary="Top-k items for a query and/or click history")
    async def search(self, req: SearchRequest):
        return await self._answer("search", self.search_limit.run(self.pipeline.search(req)))

    @app.post("/explain", response_model=ExplainResponse, responses=_ERRORS,
              summary="Text decoded from the interest embedding h (\"Next: …\")")
    async def explain(self, req: ExplainRequest):
        return await self._answer("explain", self.explain_limit.run(self.pipeline.explain(req)))

    @app.get("/healthz", response_model=HealthResponse, summary="Liveness and the pinned artifact version")
    async def healthz(self):
        return self.pipeline.health()

    @app.get("/readyz", summary="Readiness: every stage answers and holds the pinned version (503 if not)")
    async def readyz(self):
        body = await self.pipeline.readiness()
        return JSONResponse(body, status_code=200 if body["ready"] else 503)
