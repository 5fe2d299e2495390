"""Bounded open-loop load test for POST /search; samples every deployment's replica count over time.

  python jobs/loadtest.py --url http://127.0.0.1:8000 --steps 5,20,50 --step-seconds 20
  python jobs/loadtest.py --url URL --steps 10,40 --step-seconds 30 --cooldown-seconds 30 --out runs/loadtest
  KARMA_API_TOKEN=… python jobs/loadtest.py --url URL          # a service with auth on
  python jobs/loadtest.py --url URL --token-file /run/secrets/karma-token

The generator is `karma_ray.serve.loadgen` (open loop, bounded in requests, concurrency and time).
Tokens never come from the command line: the service's bearer token from $KARMA_API_TOKEN or
--token-file, the Ray dashboard's from $RAY_AUTH_TOKEN or --ray-token-file.

Replica counts come from, in order of preference: `serve.status()` when this process is connected
to the cluster (`--ray-address`), else the Serve REST API of the dashboard (`--dashboard-url`,
default http://127.0.0.1:8265), else none.

Writes <out>/loadtest.json (per-step p50/p95/p99, error rate, status counts; per-second timeline;
replica samples) and <out>/loadtest.png.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

from karma_ray.serve.guard import client_headers, read_tokens
from karma_ray.serve.harness import replica_counts, sample_requests
from karma_ray.serve.loadgen import rest_sampler, run_load

REPO = Path(__file__).resolve().parents[1]


def pick_sampler(args) -> tuple[Callable[[], dict[str, int]] | None, str]:
    try:
        import ray

        from karma_ray.runtime import ensure_ray

        if args.ray_address:
            ensure_ray(args.ray_address, log_to_driver=False)
        if ray.is_initialized():
            s = partial(replica_counts, args.app)
            s()
            return s, "serve.status()"
    except Exception as e:  # noqa: BLE001 — fall through to REST
        print(f"serve.status() unavailable ({type(e).__name__}: {e}); trying the REST API", file=sys.stderr)
    if args.dashboard_url:
        try:
            ray_token = next(iter(read_tokens("RAY_AUTH_TOKEN", args.ray_token_file)), None)
            s = rest_sampler(args.dashboard_url, ray_token, args.app)
            s()
            return s, f"REST {args.dashboard_url}/api/serve/applications/"
        except Exception as e:  # noqa: BLE001
            print(f"Serve REST API unavailable ({type(e).__name__}: {e}); no replica counts", file=sys.stderr)
    return None, "none"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="base URL of the search service, e.g. http://127.0.0.1:8000")
    p.add_argument("--steps", default="5,20,50", help="target QPS per step, comma-separated (default 5,20,50)")
    p.add_argument("--step-seconds", type=float, default=20.0, help="duration of each step (default 20)")
    p.add_argument("--cooldown-seconds", type=float, default=0.0,
                   help="keep sampling replicas this long after sending stops (to see scale-down)")
    p.add_argument("--out", default=None, help="output dir (default runs/loadtest-<timestamp>)")
    p.add_argument("--artifact", default=os.environ.get("KARMA_ARTIFACT", "artifacts/latest"),
                   help="replay this artifact's held-out events as requests (else query-only requests)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, s")
    p.add_argument("--max-in-flight", type=int, default=256)
    p.add_argument("--max-requests", type=int, default=100_000)
    p.add_argument("--poisson", action="store_true", help="exponential inter-arrival times instead of even spacing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--app", default=None, help="only this Serve application's deployments")
    p.add_argument("--ray-address", default=None, help="connect to this Ray cluster for serve.status()")
    p.add_argument("--dashboard-url", default="http://127.0.0.1:8265", help="Serve REST API fallback ('' to skip)")
    p.add_argument("--token-file", default=None,
                   help="file holding the search service's bearer token (else $KARMA_API_TOKEN, else none)")
    p.add_argument("--ray-token-file", default=None,
                   help="file holding the Ray dashboard's token for the REST API (else $RAY_AUTH_TOKEN)")
    args = p.parse_args(argv)

    steps = [float(x) for x in args.steps.split(",") if x.strip()]
    artifact = args.artifact if args.artifact and Path(args.artifact).exists() else None
    requests = sample_requests(artifact, n=2000, seed=args.seed, k=args.k)
    sampler, sampler_name = pick_sampler(args)
    out = args.out or str(REPO / "runs" / f"loadtest-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"load: {steps} QPS × {args.step_seconds}s against {args.url}; replicas via {sampler_name}; out {out}")
    result = run_load(args.url, steps, args.step_seconds, requests, sampler=sampler, sampler_name=sampler_name,
                      timeout=args.timeout, max_in_flight=args.max_in_flight, max_requests=args.max_requests,
                      poisson=args.poisson, cooldown_seconds=args.cooldown_seconds, seed=args.seed, out=out,
                      headers=client_headers(file=args.token_file))
    print(f"{'QPS':>6} {'sent':>6} {'ok':>6} {'err%':>6} {'p50':>8} {'p95':>8} {'p99':>8}")
    for s in result["steps"]:
        fmt = lambda v: f"{v:8.1f}" if v is not None else f"{'-':>8}"  # noqa: E731
        print(f"{s['target_qps']:6.1f} {s['sent']:6d} {s['ok']:6d} {100 * s['error_rate']:6.2f} "
              f"{fmt(s['p50_ms'])} {fmt(s['p95_ms'])} {fmt(s['p99_ms'])}")
    maxes: dict[str, int] = {}
    for smp in result["replicas"]:
        for name, n in smp.get("replicas", {}).items():
            maxes[name] = max(maxes.get(name, 0), n)
    if maxes:
        print("max replicas seen: " + ", ".join(f"{k}={v}" for k, v in sorted(maxes.items())))
    print(f"wrote {out}/loadtest.json and {out}/loadtest.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
