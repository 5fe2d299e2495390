"""Independent autoscaling under step load: serve_configs/search.yaml on a private local Ray.

  python benchmarks/serve_autoscale.py                          # artifacts/latest
  python benchmarks/serve_autoscale.py --steps 1,6,20 --step-seconds 40 --cooldown-seconds 90

Starts the YAML's app (its autoscaling_config per deployment) on free ports, drives POST /search
with the open-loop generator of `karma_ray.serve.loadgen`, samples RUNNING replicas of every deployment once
a second through `serve.status()`, keeps sampling through a cool-down so scale-down is visible, and
writes benchmarks/results/serve_autoscale.{json,png}:
  {"deployments": {NAME: {"min_replicas_seen", "max_replicas_seen", "final_replicas"}}, "steps": [...], ...}
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default=os.environ.get("KARMA_ARTIFACT", str(REPO / "artifacts" / "latest")))
    p.add_argument("--config", default=str(REPO / "serve_configs" / "search.yaml"))
    p.add_argument("--steps", default="2,8,16", help="target QPS per step")
    p.add_argument("--step-seconds", type=float, default=30.0)
    p.add_argument("--cooldown-seconds", type=float, default=60.0, help="idle time after the load (scale-down)")
    p.add_argument("--timeout", type=float, default=15.0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)

    from karma_ray.serve import loadgen
    from karma_ray.serve.harness import replica_counts, sample_requests, start_local, stop_local

    artifact = str(Path(args.artifact).resolve())
    steps = [float(x) for x in args.steps.split(",")]
    requests = sample_requests(artifact, n=3000, seed=1)
    t0 = time.time()
    info = start_local(args.config, artifact)
    print(f"serve up at {info['url']} in {time.time() - t0:.1f}s; load {steps} QPS × {args.step_seconds}s")
    try:
        sampler = partial(replica_counts)
        before = sampler()
        result = loadgen.run_load(info["url"], steps, args.step_seconds, requests, sampler=sampler,
                                   sampler_name="serve.status()", timeout=args.timeout,
                                   cooldown_seconds=args.cooldown_seconds)
    finally:
        stop_local()

    samples = [s for s in result["replicas"] if "replicas" in s]
    names = sorted({n for s in samples for n in s["replicas"]} | set(before))
    deployments = {}
    for name in names:
        seen = [s["replicas"].get(name, 0) for s in samples]
        deployments[name] = {"min_replicas_seen": min(seen), "max_replicas_seen": max(seen),
                             "final_replicas": seen[-1], "initial_replicas": before.get(name)}
    autoscaling = {d["name"]: d.get("autoscaling_config") for d in info["config"]["applications"][0]["deployments"]}
    scaled = [n for n, d in deployments.items() if d["min_replicas_seen"] == 1 and d["max_replicas_seen"] >= 2]
    came_down = [n for n in scaled if deployments[n]["final_replicas"] < deployments[n]["max_replicas_seen"]]
    out = {"deployments": deployments, "steps": result["steps"],
           "shown": {"scaled_up": scaled, "scaled_back_down": came_down,
                     "unchanged": [n for n, d in deployments.items() if d["min_replicas_seen"] == d["max_replicas_seen"]]},
           "load": {"steps_qps": steps, "step_seconds": args.step_seconds, "cooldown_seconds": args.cooldown_seconds,
                    "sending_ended_s": result["sending_ended_s"], "ended_s": result["ended_s"]},
           "autoscaling_config": autoscaling, "replica_timeline": result["replicas"], "timeline": result["timeline"],
           "artifact": artifact, "machine": {"cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)}}
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "serve_autoscale.json").write_text(json.dumps(out, indent=2) + "\n")
    loadgen.plot(result, outdir / "serve_autoscale.png")
    for name, d in deployments.items():
        print(f"{name:16s} min {d['min_replicas_seen']}  max {d['max_replicas_seen']}  final {d['final_replicas']}")
    for s in result["steps"]:
        print(f"step {s['target_qps']:5.1f} QPS: sent {s['sent']}, ok {s['ok']}, err {s['error_rate']:.2%}, "
              f"p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms")
    print(f"scaled up: {scaled}; back down: {came_down}; wrote {outdir}/serve_autoscale.json/.png")
    return 0 if scaled and came_down else 1


if __name__ == "__main__":
    sys.exit(main())
