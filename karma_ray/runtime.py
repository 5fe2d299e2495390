"""The one way this project connects to Ray: join a cluster if one is named, else start a private local one."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import ray

from karma_ray.allocator import fast_allocator_env

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]


def worker_env() -> dict[str, str]:
    """Environment every Ray worker needs: the repo on PYTHONPATH (workers don't see the driver's
    sys.path), this process's auth mode, and the fast allocator where the machine has it (the train
    workers and the cache build's actors do the heavy CPU work)."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    if os.environ.get("RAY_AUTH_MODE"):
        env["RAY_AUTH_MODE"] = os.environ["RAY_AUTH_MODE"]
    return env | fast_allocator_env()


def ensure_ray(address: str | None = None, *, num_cpus: float | None = None, metrics_port: int | None = None,
               log_to_driver: bool = True, include_dashboard: bool | None = None, attempts: int = 3) -> None:
    """Connect once per process.

    - `address` or RAY_ADDRESS set (e.g. under `ray job submit`): join that cluster.
    - Otherwise start a private local Ray (`address="local"`, so a cluster started with `ray start`
      on the same machine is never joined by accident), with the repo on the workers' PYTHONPATH.
    A busy machine can time out a local node's start-up; that is retried `attempts` times.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # the raylet waits this long for its agents; their start can exceed the 30 s default on a busy box
    os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")
    kwargs: dict[str, Any] = {"log_to_driver": log_to_driver, "runtime_env": {"env_vars": worker_env()}}
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **kwargs)
    else:
        # Serve's proxy → ingress hop over gRPC rather than a Ray actor call (measured in
        # benchmarks/results/reliability.md serve_overhead); read by the proxy, which inherits this
        # process's environment through the raylet it starts. On a `ray start` cluster set it there.
        os.environ.setdefault("RAY_SERVE_PROXY_USE_GRPC", "1")
        kwargs.update(address="local", num_cpus=num_cpus)
        if include_dashboard is not None:
            kwargs["include_dashboard"] = include_dashboard
        if metrics_port:
            kwargs["_metrics_export_port"] = metrics_port
        for attempt in range(attempts):
            try:
                ray.init(**kwargs)
                break
            except Exception as e:  # noqa: BLE001 — Ray raises a bare Exception for a start-up timeout
                if attempt == attempts - 1 or "timed out" not in str(e):
                    raise
                log.warning("local Ray start timed out (attempt %d/%d); retrying", attempt + 1, attempts)
                ray.shutdown()
                time.sleep(10)
    ray.data.DataContext.get_current().enable_progress_bars = False  # each job draws its own progress
