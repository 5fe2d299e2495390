"""Requests and a local Serve for load tests, benchmarks and the demo (no HTTP client code here).

`sample_requests` replays the artifact's own held-out events (query + history) when the artifact's
data directory is present, else makes query-only requests from a small word list.
`start_local` starts a private local Ray (never joins another cluster) and deploys a Serve YAML on
free ports, the way `serve run config.yaml` would.
"""
from __future__ import annotations

import json
import os
import random
import socket
import time
from pathlib import Path
from typing import Any

WORDS = ("running shoes", "rain jacket", "lipstick", "garden hose", "desk lamp", "wool socks", "ankle boot",
         "coffee grinder", "yoga mat", "backpack", "slim jeans", "planter", "headphones", "kettle")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_requests(artifact: str | Path | None = None, n: int = 300, seed: int = 0, k: int = 20,
                    max_history: int = 50) -> list[dict[str, Any]]:
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


def start_local(config: str | Path, artifact: str | Path, *, num_cpus: int = 4, http_port: int | None = None,
                metrics_port: int | None = None, overrides: dict[str, dict[str, Any]] | None = None,
                env: dict[str, str] | None = None, timeout_s: float = 300.0) -> dict[str, Any]:
    """Private local Ray + the YAML's app on free ports. Returns {"url", "metrics_port", "config"}."""
    import ray

    from karma_ray.serve.app import deploy_config, load_config

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # the raylet waits this long for its agents; their start can exceed the 30 s default on a busy box
    os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")
    for key, value in (env or {}).items():  # e.g. RAY_SERVE_* switches: workers inherit the driver's env
        os.environ[key] = value
    metrics_port = metrics_port or free_port()
    for attempt in range(3):  # on an overloaded box the raylet can time out waiting for its agents
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     _metrics_export_port=metrics_port)
            break
        except Exception as e:  # noqa: BLE001 — Ray raises a bare Exception for a startup timeout
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            ray.shutdown()
            time.sleep(10)
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
