"""`make demo`: train the embedded default, serve it, query it, print the results and the next steps.

Steps, all on one local Ray that this script starts and stops: (1) train the `demo` preset (synthetic
shop, SmolLM2 at full depth: frozen trunk, top layers trained) into artifacts/latest; (2) deploy serve_configs/search.yaml on
a free port (what `serve run` does); (3) a few /search and /explain requests; (4) `serve.shutdown()`
and `ray.shutdown()`, which stop Serve and exactly the Ray processes this script started, without
signals, so nothing prints a stack dump on the way out; (5) the commands to run next.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from karma_ray.serve.harness import deploy_config, free_port, load_config  # noqa: E402  (after the path)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-train", action="store_true", help="serve the existing artifacts/latest instead of training")
    p.add_argument("--port", type=int, default=0, help="HTTP port of the search service (default: a free one)")
    p.add_argument("--ready-timeout", type=float, default=240, help="seconds to wait for the service to be RUNNING")
    return p.parse_args()


def train() -> None:
    from karma_ray.config import get_preset
    from karma_ray.train.run import run

    run(get_preset("demo"))


def start_serve(port: int, timeout_s: float) -> str:
    """Deploy serve_configs/search.yaml (its replicas, autoscaling, batching) on the connected Ray."""
    cfg = load_config(REPO / "serve_configs" / "search.yaml", artifact=str(REPO / "artifacts" / "latest"),
                      http_port=port)
    return deploy_config(cfg, timeout_s=timeout_s)


def demo_requests() -> list[dict]:
    """The first three test events of the demo preset's split (what a returning shopper would send)."""
    import pyarrow.parquet as pq

    from karma_ray.config import get_preset

    test = pq.read_table(get_preset("demo").data_dir / "test.parquet").slice(0, 3).to_pylist()
    return [{"user_id": int(r["user_id"]), "query": r["query"], "history": list(r["history"])[-5:], "k": 5}
            for r in test]


def show(url: str) -> None:
    for req in demo_requests():
        r = httpx.post(f"{url}/search", json=req, timeout=30)
        r.raise_for_status()
        body = r.json()
        print(f"\nPOST /search query={req['query']!r} history={req['history']}")
        print(f"  stages={body['stages']} latency_ms={ {k: round(v, 1) for k, v in body['latency_ms'].items()} }")
        for it in body["items"]:
            print(f"  {it['score']:+.3f}  {it['item_id']:>6}  {it['title']}")
        ex = httpx.post(f"{url}/explain", json=req, timeout=60)
        if ex.status_code == 200:
            text = ex.json().get("text", "")
            print(f"  explain (decoded from h): {json.dumps(text)}")
            if not any(ch.isalpha() for ch in text):
                print(f"    {UNTRAINED_DECODER_NOTE}")


UNTRAINED_DECODER_NOTE = ("(no words yet: the demo's 30 steps barely train the decoder behind /explain; "
                          "README 'What h says' shows it on an ml100k run)")


SHUTDOWN_NOTE = ("(a '(raylet) Task ServeController.graceful_shutdown failed ... will be retried' line above is "
                 "how Ray Serve's controller ends its own shutdown call: not an error)")


def next_steps() -> str:
    """The three commands a user runs next, one line each, runnable from the repo root as printed once
    the placeholders in capitals are filled. They go through this interpreter's bin/, so no venv needs
    activating."""
    bin_dir = os.path.relpath(Path(sys.executable).parent, REPO)
    return "\n".join([
        f"\nnext (from {REPO}):",
        f"  {bin_dir}/python jobs/train.py --data DATA_DIR    # train on your data, in the layout of karma_ray/data/prepare.py",
        f"  {bin_dir}/ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/train.py "
        "--artifacts-dir /SHARED/artifacts --storage-path /SHARED/runs    # on a Ray cluster (README 'On a Ray cluster')",
        f"  {bin_dir}/serve run serve_configs/search.yaml    # serve artifacts/latest at http://127.0.0.1:8000/docs",
    ])


def main() -> int:
    args = parse_args()
    os.chdir(REPO)  # the preset's data/, runs/ and artifacts/ are relative to the repo
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, loopback-only Ray (README 'Auth')
    from karma_ray.progress import quiet_library_bars_in_logs

    quiet_library_bars_in_logs()
    import ray
    from ray import serve

    from karma_ray.runtime import ensure_ray

    ensure_ray()  # a private local Ray (never a `ray start` cluster), so ray.shutdown() stops all of it
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the requests are printed below, once each
    serving = False
    try:
        if not args.skip_train:
            train()
        serving = True  # from here on Serve may be (partly) up, so it is shut down below
        url = start_serve(args.port or free_port(), args.ready_timeout)
        print(f"\nserving {httpx.get(f'{url}/healthz', timeout=10).json().get('model_version')} at {url}  "
              f"(OpenAPI: {url}/docs)")
        show(url)
        print("\nmetrics: Ray exports Prometheus metrics (karma_stage_latency_ms, ray_serve_*) on each node's "
              "metrics port; see README 'Metrics' and deploy/prometheus.yml")
    finally:
        if serving:
            serve.shutdown()
        ray.shutdown()
    print(SHUTDOWN_NOTE)
    print(next_steps())
    return 0


if __name__ == "__main__":
    from karma_ray.allocator import reexec_with_fast_allocator

    reexec_with_fast_allocator()  # this process evaluates and exports on CPU
    sys.exit(main())
