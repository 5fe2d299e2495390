"""Running the search app outside `serve run`: for tests, benchmarks, jobs/loadtest.py and the demo.

  free_port()                         a free loopback port
  load_config / deploy_config         a serve_configs/*.yaml as `serve run` would start it, with the
                                      artifact, HTTP port and deployment fields overridable; wait_running
  start_local / stop_local            a private local Ray (never joins another cluster) + the YAML app
  replica_counts                      RUNNING replicas per deployment (from the Serve controller)
  sample_requests                     /search bodies replayed from the artifact's held-out events
  inprocess_pipeline                  the same SearchPipeline with the stage classes called in-process
  prometheus / prom_query             a real Prometheus from deploy/prometheus.yml on one Ray's metrics port
  fuzz                                schemathesis cases from the app's own /openapi.json
  closed_loop                         N clients, each sending as soon as its last answer came (Retry-After honoured)
  replica_info / kill_one_replica     a stage's replicas' `info()`; SIGKILL one of them (a crash)
  noop_chain_app                      a no-op 4-hop chain app: the machine's floor for /search's shape
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from karma_ray.artifact.layout import canonical
from karma_ray.serve.app import APP_NAME, REPO_ROOT

WORDS = ("running shoes", "rain jacket", "lipstick", "garden hose", "desk lamp", "wool socks", "ankle boot",
         "coffee grinder", "yoga mat", "backpack", "slim jeans", "planter", "headphones", "kettle")
SEARCH_YAML = REPO_ROOT / "serve_configs" / "search.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the YAML, deployed the way `serve run config.yaml` does -----------------------------------
def load_config(path: str | Path = SEARCH_YAML, *, artifact: str | None = None, http_port: int | None = None,
                overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The YAML as a dict with the artifact, HTTP port and per-deployment fields optionally replaced
    (dict-valued fields such as user_config are merged, others replaced)."""
    import yaml

    cfg = copy.deepcopy(yaml.safe_load(Path(path).read_text()))
    app_cfg = cfg["applications"][0]
    if artifact is not None:
        app_cfg.setdefault("args", {})["artifact"] = canonical(artifact)
    if http_port is not None:
        cfg.setdefault("http_options", {})["port"] = int(http_port)
    for name, fields in (overrides or {}).items():
        set_deployment_fields(cfg, name, fields)
    return cfg


def set_deployment_fields(cfg: dict[str, Any], name: str, fields: dict[str, Any], app: str = APP_NAME) -> None:
    app_cfg = next(a for a in cfg["applications"] if a["name"] == app)
    dep = next((d for d in app_cfg.setdefault("deployments", []) if d["name"] == name), None)
    if dep is None:
        dep = {"name": name}
        app_cfg["deployments"].append(dep)
    for key, value in fields.items():
        dep[key] = {**dep[key], **value} if isinstance(value, dict) and isinstance(dep.get(key), dict) else value


def deploy_config(cfg: dict[str, Any], timeout_s: float = 180.0) -> str:
    """Deploy a Serve config dict on the connected Ray, as `serve run config.yaml` (or, on a running
    Serve, `serve deploy`) does; wait until RUNNING again.

    Returns the base URL. Uses Serve's config-deploy path (the YAML's deployment options, user_config
    and autoscaling apply), which `serve.run(app)` would ignore.
    """
    import ray
    from ray.serve._private import api as _private_api  # the same calls `serve run config.yaml` makes
    from ray.serve.schema import ServeDeploySchema

    if not ray.is_initialized():
        raise RuntimeError("connect to Ray first, e.g. ray.init(address='local', num_cpus=4)")
    schema = ServeDeploySchema.model_validate(cfg)
    client = _private_api.serve_start(http_options=schema.http_options.model_dump(),
                                      proxy_location=schema.proxy_location)
    client.deploy_apps(schema, _blocking=False)
    wait_running([a.name for a in schema.applications], timeout_s, settle_s=1.0)
    http = schema.http_options
    return f"http://{http.host}:{http.port}"


def wait_running(app_names: list[str], timeout_s: float = 180.0, settle_s: float = 0.0) -> None:
    """Until every app is RUNNING (after a config update too: UPDATING → RUNNING once every replica
    has the new version or user_config); `settle_s` first lets the controller notice an update."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    time.sleep(settle_s)
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        apps = serve.status().applications
        last = {n: (apps[n].status if n in apps else "NOT_STARTED") for n in app_names}
        bad = {n: apps[n].message for n in app_names if n in apps and apps[n].status == ApplicationStatus.DEPLOY_FAILED}
        if bad:
            raise RuntimeError(f"Serve application failed to deploy: {bad}")
        if all(s == ApplicationStatus.RUNNING for s in last.values()):
            return
        time.sleep(0.5)
    raise TimeoutError(f"Serve applications not RUNNING after {timeout_s}s: {last}")


def replica_counts(app_name: str | None = APP_NAME) -> dict[str, int]:
    """RUNNING replicas per deployment (of one app, or of all with None); needs a Ray connection."""
    from ray import serve

    out: dict[str, int] = {}
    for name, app in serve.status().applications.items():
        if app_name is not None and name != app_name:
            continue
        for dep_name, dep in app.deployments.items():
            counts = getattr(dep, "replica_states", None) or {}
            out[dep_name] = int(sum(v for k, v in counts.items() if str(getattr(k, "value", k)) == "RUNNING"))
    return out


def start_local(config: str | Path, artifact: str | Path, *, num_cpus: int = 4, http_port: int | None = None,
                metrics_port: int | None = None, overrides: dict[str, dict[str, Any]] | None = None,
                env: dict[str, str] | None = None, timeout_s: float = 300.0) -> dict[str, Any]:
    """Private local Ray (`karma_ray.runtime.ensure_ray`) + the YAML's app on free ports.
    Returns {"url", "metrics_port", "config"}."""
    from karma_ray.runtime import ensure_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    for key, value in (env or {}).items():  # e.g. RAY_SERVE_* switches: workers inherit the driver's env
        os.environ[key] = value
    metrics_port = metrics_port or free_port()
    ensure_ray(num_cpus=num_cpus, metrics_port=metrics_port, log_to_driver=False, include_dashboard=False)
    cfg = load_config(config, artifact=str(artifact), http_port=http_port or free_port(), overrides=overrides)
    url = deploy_config(cfg, timeout_s=timeout_s)
    return {"url": url, "metrics_port": metrics_port, "config": cfg}


def stop_local() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def user_configs(cfg: dict[str, Any], app: str = APP_NAME) -> dict[str, dict[str, Any]]:
    app_cfg = next(a for a in cfg["applications"] if a["name"] == app)
    return {d["name"]: dict(d.get("user_config") or {}) for d in app_cfg.get("deployments", [])}


# ---- requests --------------------------------------------------------------------------------
def sample_requests(artifact: str | Path | None = None, n: int = 300, seed: int = 0, k: int = 20,
                    max_history: int = 50) -> list[dict[str, Any]]:
    """/search bodies: the artifact's held-out events (query + history) when its data dir is there,
    else query-only requests from a small word list."""
    rng = random.Random(seed)
    events: list[dict[str, Any]] = []
    if artifact is not None:
        try:
            import pyarrow.parquet as pq

            art = Path(artifact).resolve()
            data = Path(json.loads((art / "manifest.json").read_text()).get("data", {}).get("path", ""))
            for split in ("test", "valid", "test_cold"):
                if (data / f"{split}.parquet").exists():
                    events += pq.read_table(data / f"{split}.parquet", columns=["user_id", "query", "history"]).to_pylist()
        except (OSError, ValueError, KeyError):
            events = []
    out = []
    for i in range(n):
        if events:
            e = events[rng.randrange(len(events))]
            req = {"user_id": int(e["user_id"]), "query": e["query"] or "", "history": list(e["history"])[-max_history:]}
            if not req["query"] and not req["history"]:
                req["query"] = rng.choice(WORDS)
        else:
            req = {"user_id": i, "query": rng.choice(WORDS), "history": []}
        req["k"] = k
        out.append(req)
    return out


# ---- the in-process stand-in -------------------------------------------------------------------
class Local:
    """`obj.method.remote(*a)` → awaitable: a DeploymentHandle stand-in that calls in-process."""

    def __init__(self, obj):
        self._obj = obj

    def __getattr__(self, name):
        fn = getattr(self._obj, name)

        class _Method:
            @staticmethod
            async def remote(*a, **kw):
                out = fn(*a, **kw)
                return await out if asyncio.iscoroutine(out) else out
        return _Method


def inprocess_pipeline(artifact: str, cfg: dict[str, Any] | None = None):
    """(SearchPipeline, {deployment name: stage object}) with the stage classes in this process,
    reconfigured with the YAML's user_config: the Serve path minus Serve."""
    from karma_ray.serve.app import stages
    from karma_ray.serve.catalog import Catalog
    from karma_ray.serve.pipeline import SearchPipeline
    from karma_ray.serve.versions import HeldVersions

    uc = user_configs(cfg) if cfg else {}
    objs = {}
    for name, bound in stages(artifact).items():
        dep = bound._bound_deployment  # the Deployment behind `.bind(...)`: its class and init args
        obj = dep.func_or_class(*dep.init_args, **dep.init_kwargs)
        done = obj.reconfigure(uc.get(name, {}))
        if asyncio.iscoroutine(done):
            asyncio.run(done)
        objs[name] = obj
    pipe = SearchPipeline(HeldVersions(lambda a: Catalog.load(a, with_emb=False), artifact),
                          *(Local(objs[n]) for n in ("InterestEncoder", "Recall", "PreRank", "Rank")))
    return pipe, objs


# ---- Prometheus --------------------------------------------------------------------------------
def prom_query(base: str, expr: str) -> list[dict]:
    import httpx

    r = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    r.raise_for_status()
    body = r.json()
    if body.get("status") != "success":
        raise RuntimeError(f"query failed: {expr}: {body}")
    return body["data"]["result"]


@contextlib.contextmanager
def prometheus(metrics_port: int, binary: str | None = None, scrape_interval: str = "2s") -> Iterator[str]:
    """A real Prometheus configured from deploy/prometheus.yml (same job and file_sd mechanism),
    scraping only this Ray's metrics port (Ray's own SD file in /tmp/ray is shared by every Ray on
    the machine), on a free port with a temporary TSDB. Yields its base URL; stopped on exit."""
    import yaml

    binary = binary or shutil.which("prometheus")
    if not binary:
        raise FileNotFoundError("prometheus binary not found: `sudo apt-get install -y prometheus`")
    tmp = Path(tempfile.mkdtemp(prefix="karma-prom-"))
    sd = tmp / "ray_sd.json"
    sd.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": [f"127.0.0.1:{metrics_port}"]}]))
    cfg = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus.yml").read_text())
    cfg["global"]["scrape_interval"] = scrape_interval  # quicker evidence than the shipped file's
    for job in cfg["scrape_configs"]:
        for sdc in job.get("file_sd_configs", []):
            sdc["files"], sdc["refresh_interval"] = [str(sd)], "2s"
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    with open(tmp / "prometheus.log", "w") as log_file:
        proc = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdout=log_file, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


# ---- fuzzing, closed-loop load, replica kill, the no-op floor ------------------------------------
def fuzz(base_url: str, cases: int, paths: tuple[str, ...] = ("/search", "/explain"),
         headers: dict[str, str] | None = None, seed: int = 0) -> dict[str, Any]:
    """`cases` schemathesis cases in all (half valid, half invalid by the schema, spread over `paths`)
    generated from the app's own /openapi.json and sent over HTTP. Returns {"cases", "status_counts",
    "examples_5xx"} (a few request bodies that got a 5xx, to reproduce them)."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    counts: dict[int, int] = {}
    examples: list[dict[str, Any]] = []
    jobs = [(path, mode) for path in paths for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
    with requests.Session() as session:
        for i, (path, mode) in enumerate(jobs):
            want = cases // len(jobs) + (1 if i < cases % len(jobs) else 0)
            done = 0
            for round_ in range(20):  # hypothesis stops early once a small space is exhausted: reseed
                if done >= want:
                    break
                n_before = sum(counts.values())

                @hypothesis_seed(seed * 1000 + round_)
                @settings(max_examples=want - done, deadline=None, database=None, phases=[Phase.generate],
                          suppress_health_check=list(HealthCheck))
                @given(case=schema[path]["POST"].as_strategy(generation_mode=mode))
                def send(case) -> None:
                    r = case.call(base_url=base_url, session=session, headers=headers, timeout=60)
                    counts[r.status_code] = counts.get(r.status_code, 0) + 1
                    if r.status_code >= 500 and len(examples) < 5:
                        examples.append({"path": path, "body": repr(case.body)[:500], "status": r.status_code,
                                         "answer": r.text[:300]})

                send()
                done += sum(counts.values()) - n_before
    return {"cases": sum(counts.values()), "status_counts": {str(k): v for k, v in sorted(counts.items())},
            "examples_5xx": examples}


def closed_loop(base_url: str, requests: list[dict[str, Any]], clients: int, seconds: float,
                path: str = "/search", headers: dict[str, str] | None = None, timeout: float = 30.0,
                backoff_cap_s: float = 0.25) -> dict[str, Any]:
    """`clients` concurrent clients, each sending its next request as soon as the last one answered
    (after a 429/503, once its Retry-After has passed, capped at `backoff_cap_s`), for `seconds`.
    Returns {"requests", "ok", "qps", "status_counts", "latencies_ms" (of 200s)}."""
    import httpx

    async def run() -> list[tuple[int | str, float]]:
        out: list[tuple[int | str, float]] = []
        deadline = time.monotonic() + seconds
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits, headers=headers) as c:
            async def client(i: int) -> None:
                n = i
                while time.monotonic() < deadline:
                    t = time.perf_counter()
                    retry_after = 0.0
                    try:
                        r = await c.post(path, json=requests[n % len(requests)])
                        status: int | str = r.status_code
                        retry_after = float(r.headers.get("retry-after", 0)) if status in (429, 503) else 0.0
                    except httpx.HTTPError as e:
                        status = type(e).__name__
                    out.append((status, (time.perf_counter() - t) * 1000))
                    n += clients
                    if retry_after:  # a well-behaved client: back off as told (capped), do not hammer
                        await asyncio.sleep(min(retry_after, backoff_cap_s))
            await asyncio.gather(*(client(i) for i in range(clients)))
        return out

    t0 = time.monotonic()
    records = asyncio.run(run())
    elapsed = time.monotonic() - t0
    counts: dict[str, int] = {}
    for status, _ in records:
        counts[str(status)] = counts.get(str(status), 0) + 1
    ok = [ms for status, ms in records if status == 200]
    return {"requests": len(records), "ok": len(ok), "qps": len(ok) / elapsed, "status_counts": counts,
            "latencies_ms": ok}


def replica_info(deployment: str, app: str = APP_NAME, tries: int = 8) -> list[dict[str, Any]]:
    """`info()` of the replicas that answer `tries` calls (the router spreads them), one per pid."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app)
    seen: dict[int, dict[str, Any]] = {}
    for _ in range(tries):
        info = handle.info.remote().result(timeout_s=60)
        seen[info["pid"]] = info
    return list(seen.values())


def kill_one_replica(deployment: str, app: str = APP_NAME) -> int:
    """SIGKILL one replica process of `deployment` (a crash, not a graceful stop); returns its pid."""
    import signal

    pid = replica_info(deployment, app, tries=1)[0]["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


def noop_chain_app(hops: int = 4, route_prefix: str = "/noop", runtime_env: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """A Serve application config (for `deploy_config`'s "applications") of a FastAPI ingress that
    calls `hops` no-op deployments one after the other over gRPC handles, like /search does: the
    floor of this machine for an HTTP request through a four-stage chain. Give it the search app's
    `runtime_env` so that both run with the same Serve threading settings."""
    return {"name": "noop-chain", "route_prefix": route_prefix, "import_path": "karma_ray.serve.harness:_noop_chain",
            "args": {"hops": hops}, **({"runtime_env": runtime_env} if runtime_env else {}),
            "deployments": [{"name": "NoopIngress", "ray_actor_options": {"num_cpus": 0.1}}]
            + [{"name": f"Noop{i}", "ray_actor_options": {"num_cpus": 0.1}} for i in range(hops)]}


def _noop_chain(args: dict[str, Any]):
    from fastapi import FastAPI
    from ray import serve

    web = FastAPI()

    @serve.deployment
    class Noop:
        async def call(self, x):
            return x

    @serve.deployment
    @serve.ingress(web)
    class NoopIngress:
        def __init__(self, *stages):
            self.stages, self.grpc = stages, None

        @web.post("/")
        async def chain(self, body: dict):
            if self.grpc is None:  # handle.options() wants the replica's event loop: set on first use
                self.grpc = [s.options(_by_reference=False, request_serialization="pickle",
                                       response_serialization="pickle") for s in self.stages]
            x = body
            for s in self.grpc:
                x = await s.call.remote(x)
            return x

    hops = int(args.get("hops", 4))
    return NoopIngress.bind(*[Noop.options(name=f"Noop{i}").bind() for i in range(hops)])
