"""Open-loop HTTP load for the search service: the generator behind jobs/loadtest.py and the benchmarks.

Open loop: requests start on a fixed schedule (target QPS per step, evenly spaced or Poisson),
whether or not earlier ones have answered, so a slow server shows up as latency and errors rather
than as a lower send rate. It always stops: at most `max_in_flight` concurrent requests (beyond
that a scheduled request is counted as `skipped`, not sent), at most `max_requests` in all, every
request has a `timeout`, and the whole run has a hard deadline (sum of steps + cooldown + timeout).
A `ReplicaPoller` samples RUNNING replicas per deployment once a second meanwhile.
"""
from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np


def rest_sampler(dashboard_url: str, token: str | None = None, app_name: str | None = None
                 ) -> Callable[[], dict[str, int]]:
    """Replica counts via GET {dashboard}/api/serve/applications/ (no Ray connection needed)."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = dashboard_url.rstrip("/") + "/api/serve/applications/"

    def sample() -> dict[str, int]:
        r = httpx.get(url, headers=headers, timeout=5)
        r.raise_for_status()
        out: dict[str, int] = {}
        for name, app in (r.json().get("applications") or {}).items():
            if app_name and name != app_name:
                continue
            for dep_name, dep in (app.get("deployments") or {}).items():
                out[dep_name] = sum(1 for rep in dep.get("replicas", []) if rep.get("state") == "RUNNING")
        return out
    return sample



class ReplicaPoller:
    """Background thread: replica counts every `interval` s (the controller call blocks, so not on the loop)."""

    def __init__(self, sample: Callable[[], dict[str, int]] | None, interval: float = 1.0):
        self.sample, self.interval = sample, interval
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._t0 = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, t0: float) -> None:
        self._t0 = t0
        if self.sample is not None:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append({"t": round(time.monotonic() - self._t0, 2), "replicas": self.sample()})
            except Exception as e:  # noqa: BLE001 — a missed sample must not end the run
                self.samples.append({"t": round(time.monotonic() - self._t0, 2), "error": f"{type(e).__name__}: {e}"})
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)


# ---- the load ------------------------------------------------------------------------------
def percentiles(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    a = np.asarray(xs, dtype=np.float64)
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p95_ms": round(float(np.percentile(a, 95)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "max_ms": round(float(a.max()), 2)}


async def _load(url: str, steps: list[float], step_seconds: float, requests: list[dict], *, timeout: float,
                max_in_flight: int, max_requests: int, poisson: bool, cooldown_seconds: float, seed: int,
                poller: ReplicaPoller, path: str, headers: dict[str, str], record_version: bool) -> dict[str, Any]:
    import httpx

    rng = random.Random(seed)
    records: list[dict[str, Any]] = []  # one per scheduled request
    in_flight = 0
    tasks: set[asyncio.Task] = set()
    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, headers=headers) as client:
        async def one(rec: dict[str, Any], body: dict) -> None:
            nonlocal in_flight
            in_flight += 1
            t = time.perf_counter()
            try:
                r = await client.post(path, json=body)
                rec["status"] = r.status_code
                if r.status_code == 200:
                    answer = r.json()
                    if record_version:
                        rec["version"] = answer.get("model_version")
                    if isinstance(answer.get("latency_ms"), dict):  # /search: where a served request's time went
                        rec["stages_ms"] = answer["latency_ms"]
            except httpx.TimeoutException:
                rec["status"] = "timeout"
            except httpx.HTTPError as e:
                rec["status"] = type(e).__name__
            finally:
                rec["ms"] = (time.perf_counter() - t) * 1000
                rec["done"] = time.monotonic() - t0
                in_flight -= 1

        t0 = time.monotonic()
        poller.start(t0)
        n = 0
        step_start = 0.0
        for si, qps in enumerate(steps):
            step_end = step_start + step_seconds
            t_next = step_start
            while t_next < step_end and n < max_requests:
                delay = t0 + t_next - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                rec = {"step": si, "t": round(time.monotonic() - t0, 4)}
                records.append(rec)
                if in_flight >= max_in_flight:
                    rec["status"] = "skipped"
                else:
                    task = asyncio.create_task(one(rec, requests[n % len(requests)]))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                n += 1
                t_next += rng.expovariate(qps) if poisson else 1.0 / qps
            step_start = step_end
        sending_ended = time.monotonic() - t0
        if tasks:  # bounded by the per-request timeout; then cancel whatever is left
            _, pending = await asyncio.wait(set(tasks), timeout=timeout + 5)
            for task in pending:
                task.cancel()
        remaining = cooldown_seconds - (time.monotonic() - t0 - sending_ended)
        if remaining > 0:  # keep sampling replicas while the deployments scale back down
            await asyncio.sleep(remaining)
    poller.stop()
    return {"records": records, "sending_ended_s": round(sending_ended, 2), "ended_s": round(time.monotonic() - t0, 2)}


def summarize(records: list[dict], steps: list[float], step_seconds: float) -> tuple[list[dict], list[dict]]:
    out = []
    for si, qps in enumerate(steps):
        recs = [r for r in records if r["step"] == si]
        sent = [r for r in recs if r.get("status") != "skipped"]
        ok = [r["ms"] for r in sent if r.get("status") == 200]
        statuses = Counter(str(r.get("status", "cancelled")) for r in recs)
        errors = len(recs) - len(ok)
        out.append({"step": si, "target_qps": qps, "seconds": step_seconds, "scheduled": len(recs), "sent": len(sent),
                    "ok": len(ok), "errors": errors, "error_rate": round(errors / len(recs), 4) if recs else 0.0,
                    "skipped": statuses.get("skipped", 0), "status_counts": dict(statuses),
                    "achieved_qps": round(len(sent) / step_seconds, 2), **percentiles(ok)})
    timeline = []
    horizon = int(np.ceil(max((r.get("done", r["t"]) for r in records), default=0))) + 1
    for sec in range(horizon):
        done = [r for r in records if "done" in r and sec <= r["done"] < sec + 1]
        ok = [r["ms"] for r in done if r.get("status") == 200]
        timeline.append({"t": sec, "started": sum(1 for r in records if sec <= r["t"] < sec + 1),
                         "ok": len(ok), "errors": len(done) - len(ok), **percentiles(ok)})
    return out, timeline


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    tl = result["timeline"]
    t = [p["t"] for p in tl]
    ax = axes[0]
    ax.plot(t, [p["p50_ms"] if p["p50_ms"] is not None else np.nan for p in tl], label="p50")
    ax.plot(t, [p["p99_ms"] if p["p99_ms"] is not None else np.nan for p in tl], label="p99")
    ax.set_ylabel("latency ms (per second)")
    ax.set_yscale("log")
    ax.legend(loc="upper left")
    ax.set_title(f"POST /search open-loop load: steps {result['steps_qps']} QPS × {result['step_seconds']} s")
    ax = axes[1]
    ax.plot(t, [p["ok"] for p in tl], label="ok/s")
    ax.plot(t, [p["errors"] for p in tl], label="errors/s", color="tab:red")
    target = [result["steps_qps"][min(int(x // result["step_seconds"]), len(result["steps_qps"]) - 1)]
              if x < result["step_seconds"] * len(result["steps_qps"]) else 0 for x in t]
    ax.step(t, target, where="post", label="target QPS", linestyle="--", color="gray")
    ax.set_ylabel("requests / s")
    ax.legend(loc="upper left")
    ax = axes[2]
    samples = [s for s in result["replicas"] if "replicas" in s]
    names = sorted({n for s in samples for n in s["replicas"]})
    for i, name in enumerate(names):  # small vertical offsets so equal counts stay visible
        ax.step([s["t"] for s in samples], [s["replicas"].get(name, 0) + 0.04 * i for s in samples], where="post",
                label=name)
    ax.set_ylabel("RUNNING replicas")
    ax.set_xlabel("seconds since start")
    if names:
        ax.legend(loc="upper left", fontsize=8)
    else:
        ax.text(0.5, 0.5, "replica counts unavailable", ha="center", transform=ax.transAxes)
    for x in range(1, len(result["steps_qps"]) + 1):
        for a in axes:
            a.axvline(x * result["step_seconds"], color="lightgray", linewidth=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_load(url: str, steps: list[float], step_seconds: float, requests: list[dict], *,
             sampler: Callable[[], dict[str, int]] | None = None, sampler_name: str = "", timeout: float = 10.0,
             max_in_flight: int = 256, max_requests: int = 100_000, poisson: bool = False,
             cooldown_seconds: float = 0.0, sample_interval: float = 1.0, seed: int = 0, path: str = "/search",
             out: str | Path | None = None, headers: dict[str, str] | None = None,
             record_version: bool = False) -> dict[str, Any]:
    """Run the load and return the result dict (also written as JSON + PNG when `out` is given).

    `headers` go with every request (e.g. the bearer token); with `record_version` each 200's
    `model_version` is kept in its record (`result["records"]`)."""
    if not steps or any(q <= 0 for q in steps) or step_seconds <= 0:
        raise ValueError("steps must be positive QPS values and step_seconds > 0")
    poller = ReplicaPoller(sampler, sample_interval)
    hard_deadline = len(steps) * step_seconds + cooldown_seconds + timeout + 30
    try:
        raw = asyncio.run(asyncio.wait_for(
            _load(url, steps, step_seconds, requests, timeout=timeout, max_in_flight=max_in_flight,
                  max_requests=max_requests, poisson=poisson, cooldown_seconds=cooldown_seconds, seed=seed,
                  poller=poller, path=path, headers=headers or {}, record_version=record_version), hard_deadline))
    finally:
        poller.stop()
    per_step, timeline = summarize(raw["records"], steps, step_seconds)
    result = {"url": url, "path": path, "steps_qps": steps, "step_seconds": step_seconds, "steps": per_step,
              "timeline": timeline, "replicas": poller.samples, "replica_source": sampler_name,
              "sending_ended_s": raw["sending_ended_s"], "ended_s": raw["ended_s"], "records": raw["records"],
              "bounds": {"timeout_s": timeout, "max_in_flight": max_in_flight, "max_requests": max_requests,
                         "hard_deadline_s": hard_deadline}}
    if out is not None:
        outdir = Path(out)
        outdir.mkdir(parents=True, exist_ok=True)
        summary = {k: v for k, v in result.items() if k != "records"}  # per-request records stay in memory
        (outdir / "loadtest.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot(result, outdir / "loadtest.png")
    return result
