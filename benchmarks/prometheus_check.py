"""A real Prometheus scraping the running search app shows karma_stage_latency_ms for all four stages.

  sudo apt-get install -y prometheus        # once (the binary; the packaged service is not used)
  python benchmarks/prometheus_check.py     # artifacts/latest; --artifact DIR for another

Steps: private local Ray with a known metrics export port → serve_configs/search.yaml on a free HTTP
port → Prometheus started from deploy/prometheus.yml (same scrape job and file_sd mechanism; the SD
file is a temp copy listing only this Ray's metrics port, because /tmp/ray/prom_metrics_service_discovery.json
is shared by every Ray on the machine) on a free port with a temp TSDB → /search, /explain and a few
invalid requests → poll Prometheus' HTTP API until `ray_karma_stage_latency_ms_bucket` has series
for encode, recall, prerank and rank → also evaluate every query of deploy/grafana/karma-ray.json →
write benchmarks/results/prometheus_check.json. Prometheus and Serve are stopped at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from karma_ray.serve.harness import prom_query, prometheus, sample_requests, start_local, stop_local
from karma_ray.serve.metrics import STAGES

REPO = Path(__file__).resolve().parents[1]


def dashboard_queries(path: Path) -> list[tuple[str, str]]:
    dash = json.loads(path.read_text())
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            expr = t["expr"].replace("$application", ".*").replace("$__rate_interval", "1m")
            out.append((f"{p['title']} [{t['legendFormat']}]", expr))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default=os.environ.get("KARMA_ARTIFACT", str(REPO / "artifacts" / "latest")))
    p.add_argument("--config", default=str(REPO / "serve_configs" / "search.yaml"))
    p.add_argument("--prometheus", default=shutil.which("prometheus") or "prometheus")
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--wait-seconds", type=float, default=120.0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "prometheus_check.json"))
    args = p.parse_args(argv)
    if not shutil.which(args.prometheus):
        print("prometheus binary not found: `sudo apt-get install -y prometheus` (or pass --prometheus PATH)")
        return 2

    artifact = str(Path(args.artifact).resolve())
    version = subprocess.run([args.prometheus, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    result: dict = {"prometheus": version}
    try:
        info = start_local(args.config, artifact)
        target = f"127.0.0.1:{info['metrics_port']}"
        with prometheus(info["metrics_port"], args.prometheus) as prom:
            print(f"serve {info['url']}, Ray metrics {target}, Prometheus {prom}")
            result.update(check(prom, info["url"], artifact, args))
    finally:
        stop_local()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"stages with buckets: {result.get('stages_found')}; quantiles {result.get('quantiles_ms')}")
    print(f"requests_total: {result.get('requests_total')}")
    empty = [k for k, v in result.get("dashboard_queries_series", {}).items() if v == 0 or isinstance(v, str)]
    print(f"dashboard queries without data: {empty}")
    print(f"wrote {args.out}")
    return 0 if result.get("ok") else 1


def check(prom: str, url: str, artifact: str, args) -> dict:
    """Send requests, wait for Prometheus to see them, and read back buckets, quantiles and labels."""
    import httpx

    result: dict = {}
    with httpx.Client(base_url=url, timeout=60) as c:
        codes: dict[str, int] = {}
        for body in sample_requests(artifact, args.requests, seed=2):
            code = c.post("/search", json=body).status_code
            codes[str(code)] = codes.get(str(code), 0) + 1
        for body in ({"query": "x", "k": 0}, {"history": ["a"]}, {}):
            code = c.post("/search", json=body).status_code
            codes[str(code)] = codes.get(str(code), 0) + 1
        codes["explain_" + str(c.post("/explain", json={"query": "running shoes"}).status_code)] = 1
    result["sent"] = codes

    deadline = time.monotonic() + args.wait_seconds
    found: set[str] = set()
    while time.monotonic() < deadline:
        try:
            series = prom_query(prom, "sum by (stage) (ray_karma_stage_latency_ms_count)")
            found = {s["metric"].get("stage") for s in series if float(s["value"][1]) > 0}
            if set(STAGES) <= found:
                break
        except httpx.HTTPError:
            pass  # Prometheus still starting
        time.sleep(2)
    expected = sum(v for k, v in codes.items() if not k.startswith("explain"))
    while time.monotonic() < deadline:  # counters of the last requests arrive a report later
        got = sum(float(s["value"][1]) for s in prom_query(prom, 'ray_karma_requests_total{endpoint="search"}'))
        result["requests_counted"] = got
        if got >= expected:
            break
        time.sleep(2)
    time.sleep(6)  # two more scrapes, so rate() windows hold more than one point
    result["waited_s"] = round(args.wait_seconds - (deadline - time.monotonic()), 1)
    up = prom_query(prom, 'up{job="ray"}')
    result["scrape_targets"] = [{"instance": s["metric"].get("instance"), "up": s["value"][1]} for s in up]
    buckets = {}
    for s in prom_query(prom, "sum by (stage, le) (ray_karma_stage_latency_ms_bucket)"):
        buckets.setdefault(s["metric"]["stage"], {})[s["metric"]["le"]] = float(s["value"][1])
    result["stages_found"] = sorted(buckets)
    result["buckets"] = {st: dict(sorted(b.items(), key=lambda kv: float(kv[0]))) for st, b in sorted(buckets.items())}
    result["quantiles_ms"] = {}
    for q in (0.5, 0.99):
        for s in prom_query(prom, f"histogram_quantile({q}, sum by (le, stage) (ray_karma_stage_latency_ms_bucket))"):
            result["quantiles_ms"].setdefault(s["metric"]["stage"], {})[f"p{int(q * 100)}"] = round(float(s["value"][1]), 2)
    result["requests_total"] = {f"{s['metric'].get('endpoint')} {s['metric'].get('status')}": float(s["value"][1])
                                for s in prom_query(prom, "sum by (endpoint, status) (ray_karma_requests_total)")}
    result["metric_labels"] = {}
    for name in ("ray_serve_num_http_requests_total", "ray_serve_deployment_replica_healthy",
                 "ray_serve_actual_batch_size_bucket", "ray_serve_num_http_error_requests_total",
                 "ray_karma_requests_total"):
        r = httpx.get(f"{prom}/api/v1/series", params={"match[]": name}, timeout=10).json().get("data", [])
        result["metric_labels"][name] = sorted({k for m in r for k in m} - {"__name__"})
    dq = {}
    for name, expr in dashboard_queries(REPO / "deploy" / "grafana" / "karma-ray.json"):
        try:
            dq[name] = len(prom_query(prom, expr))
        except Exception as e:  # noqa: BLE001
            dq[name] = f"error: {e}"
    result["dashboard_queries_series"] = dq
    result["ok"] = set(STAGES) <= set(buckets)
    return result


if __name__ == "__main__":
    sys.exit(main())
