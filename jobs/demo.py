"""`make demo`: train the embedded default, serve it with `serve run`, query it, print, shut down.

Steps: (1) python jobs/train.py (demo preset: synthetic shop, real SmolLM2 cut to 4 layers) writes
artifacts/latest; (2) `serve run serve_configs/search.yaml` in a child process; (3) a few /search and
/explain requests; (4) SIGTERM to the child (it ignores SIGINT after shutdown, see RAY_NOTES) and
`ray stop` of the cluster it started.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-train", action="store_true", help="serve the existing artifacts/latest instead of training")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the search service (default 8000)")
    p.add_argument("--ready-timeout", type=float, default=240, help="seconds to wait for the service to answer")
    return p.parse_args()


def train() -> None:
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--preset", "demo"], cwd=REPO, env=env, check=True)


def start_serve(port: int) -> subprocess.Popen:
    config = REPO / "serve_configs" / "search.yaml"
    if port != 8000:  # serve run reads the port from the YAML; write a copy with the asked port
        text = config.read_text().replace("port: 8000", f"port: {port}")
        config = REPO / "runs" / "search-demo.yaml"
        config.parent.mkdir(exist_ok=True)
        config.write_text(text)
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"),
               KARMA_ARTIFACT=str(REPO / "artifacts" / "latest"))
    serve_bin = Path(sys.executable).with_name("serve")
    return subprocess.Popen([str(serve_bin), "run", str(config)], cwd=REPO, env=env)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`serve run` exited with code {proc.returncode}")
        try:
            r = httpx.get(f"{url}/healthz", timeout=2)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"search service at {url} not ready after {timeout:.0f}s")


def demo_requests() -> list[dict]:
    import pyarrow.parquet as pq

    test = pq.read_table(REPO / "data" / "demo" / "test.parquet").slice(0, 3).to_pylist()
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
            print(f"  explain (decoded from h): {json.dumps(ex.json().get('text', ex.json()))}")


def main() -> int:
    args = parse_args()
    if not args.skip_train:
        train()
    url = f"http://127.0.0.1:{args.port}"
    proc = start_serve(args.port)
    try:
        health = wait_ready(url, proc, args.ready_timeout)
        print(f"\nserving {health.get('model_version')} at {url}  (OpenAPI: {url}/docs)")
        show(url)
        print("\nmetrics: Ray exports Prometheus metrics (karma_stage_latency_ms, ray_serve_*) on each node's "
              "metrics port; see README 'Metrics' and deploy/prometheus.yml")
    finally:
        stop_serve(proc)
    return 0


def stop_serve(proc: subprocess.Popen) -> None:
    """SIGTERM `serve run` and the local Ray it started (only its own descendants, not other clusters)."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    for child in family:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=15)
    for child in alive:
        child.kill()


if __name__ == "__main__":
    sys.exit(main())
