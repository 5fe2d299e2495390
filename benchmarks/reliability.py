"""Reliability of the search service under bad input, overload, replica loss and a rollout, and the
cost of the serving path, measured on one private local Ray (loopback only, bounded in time).

  python benchmarks/reliability.py                       # artifacts/latest, every section (~10 min)
  python benchmarks/reliability.py --sections fuzz,serve_overhead --fuzz-cases 200

Writes benchmarks/results/reliability.{json,md}. One function per section, each taking the running
`Bench` and returning its dict (add a section: write `section_x(bench) -> dict` and list it in
SECTIONS). The JSON keys outside checks read:
  fuzz            {"cases", "status_counts": {CODE: n}}
  overload        {"offered_qps", "served_qps", "share_503", "share_5xx_other", "p99_ms_rejected",
                   "p99_ms_served", "p99_ms_baseline", "p99_ms_after_recovery"}
  replica_kill    {"requests", "failed_share"}
  rollout         {"requests", "failed", "mixed_versions"}
  serve_overhead  {"p50_ms_serve", "p50_ms_inprocess", "p50_ms_noop_chain", "mean_batch_size_16_clients"}
  resume          {"loss_delta", "hr@10_delta"}  (train workers killed mid-run vs an unbroken run)
  batch_tradeoff  {"settings": [{"max_wait_forwards", "mean_batch_size_16_clients", "p99_ratio", ...}]}
plus "calibration" (capacity and the steady load every section uses) and "machine" (CPUs and
load averages; each section also records its own before and after).
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from karma_ray.serve import harness
from karma_ray.serve.loadgen import run_load
from karma_ray.serve.rollout import live_config, roll

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Bench:
    url: str
    artifact: str
    config: dict[str, Any]
    requests: list[dict[str, Any]]
    args: argparse.Namespace
    capacity_qps: float = 0.0  # measured once: 16 closed-loop clients (see `calibrate`)
    light_qps: float = 0.0  # the steady load of every section: well below capacity on a busy machine too


def pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(xs, np.float64), q)), 2) if xs else None


def load(bench: Bench, qps: float, seconds: float, record_version: bool = False) -> dict[str, Any]:
    """Open-loop load at `qps` for `seconds` (bounded: timeout, in-flight cap, hard deadline)."""
    return run_load(bench.url, [qps], seconds, bench.requests, timeout=30.0, max_in_flight=512,
                    record_version=record_version)


def latencies(records: list[dict], status: int | None = 200) -> list[float]:
    return [r["ms"] for r in records if "ms" in r and (status is None or r.get("status") == status)]


# ---- sections ----------------------------------------------------------------------------------
def section_fuzz(bench: Bench) -> dict[str, Any]:
    """schemathesis cases from the app's own /openapi.json on /search and /explain."""
    out = harness.fuzz(bench.url, bench.args.fuzz_cases)
    out["share_5xx"] = round(sum(v for k, v in out["status_counts"].items() if k.startswith("5")) / max(1, out["cases"]), 4)
    return out


def section_serve_overhead(bench: Bench) -> dict[str, Any]:
    """Sequential p50 through Serve vs the same stages in-process vs a no-op 4-hop chain, alternating
    in blocks; then 16 closed-loop clients for the encoder's mean batch size."""
    import httpx

    from karma_ray.serve.schemas import SearchRequest

    pipe, _ = harness.inprocess_pipeline(bench.artifact, bench.config)
    loop = asyncio.new_event_loop()
    reqs = bench.requests[: bench.args.overhead_requests]
    times: dict[str, list[float]] = {"serve": [], "inprocess": [], "noop": []}
    with httpx.Client(base_url=bench.url, timeout=60) as client:
        def serve(r):
            client.post("/search", json=r).raise_for_status()

        def inprocess(r):
            loop.run_until_complete(pipe.search(SearchRequest.model_validate(r)))

        def noop(r):
            client.post("/noop/", json=r).raise_for_status()

        paths: dict[str, Callable] = {"serve": serve, "inprocess": inprocess, "noop": noop}
        for r in reqs[:10]:  # warm every path
            for fn in paths.values():
                fn(r)
        for start in range(0, len(reqs), 25):
            for name, fn in paths.items():
                for r in reqs[start : start + 25]:
                    t = time.perf_counter()
                    fn(r)
                    times[name].append((time.perf_counter() - t) * 1000)
    loop.close()
    _reset_encoder_stats()
    burst = harness.closed_loop(bench.url, bench.requests, clients=16, seconds=bench.args.batch_seconds)
    facts = encoder_facts()
    return {"p50_ms_serve": pct(times["serve"], 50), "p50_ms_inprocess": pct(times["inprocess"], 50),
            "p50_ms_noop_chain": pct(times["noop"], 50), "mean_batch_size_16_clients": mean_batch(facts),
            "overhead_p50_ms": round(pct(times["serve"], 50) - pct(times["inprocess"], 50), 2),
            "p99_ms": {k: pct(v, 99) for k, v in times.items()}, "requests_per_path": len(reqs),
            "closed_loop_16": {"qps": round(burst["qps"], 2), "status_counts": burst["status_counts"],
                               "p50_ms": pct(burst["latencies_ms"], 50), "p99_ms": pct(burst["latencies_ms"], 99)},
            "encoder_replicas_seen": facts["replicas"]}


def light_seconds(bench: Bench) -> float:
    """A light phase long enough for `light_samples` requests: a p99 of a few samples is only their max."""
    return max(bench.args.phase_seconds, bench.args.light_samples / max(bench.light_qps, 1e-3))


def mean_batch(facts: dict[str, Any]) -> float:
    """The encoder replicas' mean batch size, weighted by their batch counts (from `encoder_facts`)."""
    sizes = [(m, n) for m, n in zip(facts["mean_batch_size"], facts["batches"]) if m]
    return round(sum(m * n for m, n in sizes) / max(1, sum(n for _, n in sizes)), 2)


def _reset_encoder_stats() -> None:
    from ray import serve

    handle = serve.get_deployment_handle("InterestEncoder", harness.APP_NAME)
    for _ in range(8):  # reaches every replica with high probability (the router spreads calls)
        handle.reset_stats.remote().result(timeout_s=60)


def stage_percentiles(records: list[dict]) -> dict[str, dict[str, float | None]]:
    """p50/p99 of each stage's time (as the ingress saw it) over the served requests."""
    per_stage: dict[str, list[float]] = {}
    for r in records:
        for stage, ms in (r.get("stages_ms") or {}).items():
            per_stage.setdefault(stage, []).append(ms)
    return {stage: {"p50": pct(v, 50), "p99": pct(v, 99)} for stage, v in per_stage.items()}


def encoder_facts() -> dict[str, Any]:
    """Encoder replicas seen and their batches since the last `_reset_encoder_stats`."""
    infos = harness.replica_info("InterestEncoder")
    return {"replicas": len(infos), "batches": [i["batches"] for i in infos],
            "mean_batch_size": [i["mean_batch_size"] for i in infos],
            "forward_p50_ms": [i["forward_p50_ms"] for i in infos], "forward_p99_ms": [i["forward_p99_ms"] for i in infos],
            "held_p99_ms": [i["held_p99_ms"] for i in infos], "rejected": [i["rejected"] for i in infos],
            "forward_ms_by_size": [i["forward_ms_by_size"] for i in infos]}


def section_overload(bench: Bench) -> dict[str, Any]:
    """Baseline at a light rate, then `overload_factor` × the measured capacity, then idle, then the
    light rate again; with each phase's stage times and the encoder's batches, to show where time goes."""
    a = bench.args
    light_s = light_seconds(bench)
    _reset_encoder_stats()
    base = load(bench, bench.light_qps, light_s)
    encoder_base = encoder_facts()
    _reset_encoder_stats()
    offered = a.offered_qps or round(max(4 * bench.light_qps, a.overload_factor * bench.capacity_qps), 1)
    over = load(bench, offered, a.phase_seconds)
    encoder_over = encoder_facts()
    time.sleep(a.recovery_seconds)
    after = load(bench, bench.light_qps, light_s)
    recs = [r for r in over["records"] if r.get("status") != "skipped"]
    n = max(1, len(recs))
    n503 = sum(r.get("status") == 503 for r in recs)
    other5 = sum(isinstance(r.get("status"), int) and r["status"] >= 500 and r["status"] != 503 for r in recs)
    ok = latencies(recs)
    return {"offered_qps": offered, "served_qps": round(len(ok) / a.phase_seconds, 2),
            "share_503": round(n503 / n, 4), "share_5xx_other": round(other5 / n, 4),
            "p99_ms_rejected": pct(latencies(recs, 503), 99), "p99_ms_served": pct(ok, 99),
            "p99_ms_baseline": pct(latencies(base["records"]), 99),
            "p99_ms_after_recovery": pct(latencies(after["records"]), 99),
            "capacity_qps_16_clients": bench.capacity_qps, "light_qps": bench.light_qps,
            "status_counts": over["steps"][0]["status_counts"], "seconds_per_phase": a.phase_seconds,
            "seconds_per_light_phase": round(light_s, 1),
            "baseline_status_counts": base["steps"][0]["status_counts"],
            "after_status_counts": after["steps"][0]["status_counts"],
            "stages_ms": {"baseline": stage_percentiles(base["records"]), "overload": stage_percentiles(recs),
                          "after": stage_percentiles(after["records"])},
            "encoder": {"baseline": encoder_base, "overload": encoder_over}}


def section_replica_kill(bench: Bench) -> dict[str, Any]:
    """Two replicas of InterestEncoder and Rank under steady load; SIGKILL one of each mid-run."""
    a = bench.args
    cfg = json.loads(json.dumps(bench.config))
    for name in ("InterestEncoder", "Rank"):
        harness.set_deployment_fields(cfg, name, {"autoscaling_config": {"min_replicas": 2, "max_replicas": 2}})
    harness.deploy_config(cfg)
    _wait_replicas({"InterestEncoder": 2, "Rank": 2}, 180)
    killed: list[dict[str, Any]] = []
    seconds = a.kill_seconds

    def killer() -> None:
        for name, at in (("InterestEncoder", seconds * 0.25), ("Rank", seconds * 0.5)):
            time.sleep(max(0.0, at - (time.monotonic() - t0)))
            killed.append({"deployment": name, "pid": harness.kill_one_replica(name),
                           "t": round(time.monotonic() - t0, 1)})

    t0 = time.monotonic()
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    res = load(bench, bench.light_qps, seconds)
    thread.join(timeout=60)
    replaced_s = _wait_replicas({"InterestEncoder": 2, "Rank": 2}, 180)
    recs = [r for r in res["records"] if r.get("status") != "skipped"]
    failed = [r for r in recs if r.get("status") != 200]
    tl = res["timeline"]
    third = max(1, len(tl) // 3)
    harness.deploy_config(bench.config)  # back to the YAML's replica bounds
    return {"requests": len(recs), "failed_share": round(len(failed) / max(1, len(recs)), 4),
            "failed_status_counts": _counts(failed), "killed": killed, "qps": bench.light_qps,
            "replicas_back_after_s": replaced_s,
            "p99_ms_first_third": pct([p["p99_ms"] for p in tl[:third] if p["p99_ms"]], 50),
            "p99_ms_last_third": pct([p["p99_ms"] for p in tl[-third:] if p["p99_ms"]], 50)}


def _counts(records: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        out[str(r.get("status"))] = out.get(str(r.get("status")), 0) + 1
    return out


def _wait_replicas(want: dict[str, int], timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        counts = harness.replica_counts()
        if all(counts.get(k, 0) >= v for k, v in want.items()):
            return round(time.monotonic() - t0, 1)
        time.sleep(1)
    raise TimeoutError(f"replicas {harness.replica_counts()} did not reach {want} in {timeout_s}s")


def section_rollout(bench: Bench) -> dict[str, Any]:
    """Steady load while jobs/rollout.py's phases move the app to a second version, then back."""
    a = bench.args
    tmp = Path(tempfile.mkdtemp(prefix="karma-rollout-", dir=Path(bench.artifact).parent))
    v2 = tmp / (Path(bench.artifact).name + "-v2")
    shutil.copytree(bench.artifact, v2, copy_function=os.link)  # artifacts are immutable: share the bytes
    (v2 / "manifest.json").unlink()
    manifest = json.loads((Path(bench.artifact) / "manifest.json").read_text())
    (v2 / "manifest.json").write_text(json.dumps({**manifest, "run_name": manifest.get("run_name", "v1") + "-v2"}))
    result: dict[str, Any] = {}

    def do_roll() -> None:
        time.sleep(3)
        t = time.monotonic()
        out = roll(str(v2), cfg=live_config(), deploy=harness.deploy_config, drain_s=2.0, log=lambda _: None)
        back = roll(str(Path(bench.artifact).resolve()), cfg=live_config(), deploy=harness.deploy_config,
                    drain_s=2.0, log=lambda _: None)
        result.update(rollout_s=round(time.monotonic() - t, 1), phases=out["phase_seconds"],
                      rollback_phases=back["phase_seconds"])

    thread = threading.Thread(target=do_roll, daemon=True)
    thread.start()
    res = load(bench, bench.light_qps, a.rollout_seconds, record_version=True)
    thread.join(timeout=600)
    shutil.rmtree(tmp, ignore_errors=True)
    recs = [r for r in res["records"] if r.get("status") != "skipped"]
    versions = [r.get("version") for r in sorted(recs, key=lambda r: r.get("done", 0)) if r.get("status") == 200]
    known = {manifest.get("run_name"), manifest.get("run_name", "v1") + "-v2"}
    failed = [r for r in recs if r.get("status") != 200]
    return {"requests": len(recs), "failed": len(failed), "failed_status_counts": _counts(failed),
            # a response is answered from one pinned version by construction; a stage that answers
            # from another version is a 500 "version mismatch": counted here, with unknown versions
            "mixed_versions": sum(v not in known for v in versions) + sum(r.get("status") == 500 for r in recs),
            "answers_per_version": {v: versions.count(v) for v in sorted(set(versions), key=str)},
            "rollout_finished": bool(result), **result}


def calibrate(bench: Bench) -> dict[str, Any]:
    """Capacity with 16 closed-loop clients, and the steady load every section uses: at most
    `--light-qps`, at most `--light-share` of capacity (the figures mean the same on a busy machine)."""
    probe = harness.closed_loop(bench.url, bench.requests, clients=16, seconds=10)
    bench.capacity_qps = round(probe["qps"], 2)
    bench.light_qps = round(min(bench.args.light_qps, bench.args.light_share * bench.capacity_qps), 2)
    time.sleep(bench.args.recovery_seconds)  # let the probe's queues drain
    return {"capacity_qps_16_clients": bench.capacity_qps, "light_qps": bench.light_qps,
            "status_counts": probe["status_counts"]}


def section_resume(bench: Bench) -> dict[str, Any]:
    """Training faults: SIGKILL every train worker (2, DDP over gloo) after the first checkpoint of a tiny
    run, and compare its end with the same seed's unbroken run (`karma_ray.train.faults.resume_drill`, the
    code the test suite asserts on). Runs on the same local Ray as the service; the figure is the deltas."""
    from karma_ray.config import get_preset
    from karma_ray.data.prepare import ensure_prepared
    from karma_ray.train.faults import resume_drill

    with tempfile.TemporaryDirectory(prefix="karma-resume-") as tmp:
        cfg = get_preset("tiny").with_overrides([
            f"data.path={tmp}/data", f"train.artifacts_dir={tmp}/artifacts", "train.num_workers=2",
            "train.max_steps=12", "train.log_every=2", "train.checkpoint_every=4", "train.max_failures=2",
            "eval.max_events=60"])
        ensure_prepared(cfg)
        return resume_drill(cfg, Path(tmp) / "runs").summary()


def section_batch_tradeoff(bench: Bench) -> dict[str, Any]:
    """The encoder's batch against served latency at 16 closed-loop clients, for each `max_wait_forwards`
    in `--tradeoff-waits` (max_batch_size raised so only that bound limits the batch), each with its own
    light-load baseline p99: does a mean batch > 2 come with served p99 ≤ 2× the baseline on this machine?
    The config is restored afterwards."""
    a = bench.args
    shipped = harness.user_configs(bench.config)["InterestEncoder"]
    rows = []
    try:
        for wait in [float(w) for w in a.tradeoff_waits.split(",") if w]:
            cfg = copy.deepcopy(bench.config)
            harness.set_deployment_fields(cfg, "InterestEncoder", {"user_config": {
                "max_wait_forwards": wait, "max_batch_size": max(int(shipped.get("max_batch_size", 3)), int(wait) + 2),
                "max_pending": max(int(shipped.get("max_pending", 6)), 2 * (int(wait) + 2))}})
            harness.deploy_config(cfg)
            base = load(bench, bench.light_qps, light_seconds(bench))
            _reset_encoder_stats()
            burst = harness.closed_loop(bench.url, bench.requests, clients=16, seconds=a.batch_seconds)
            enc = encoder_facts()
            base_p99, served_p99 = pct(latencies(base["records"]), 99), pct(burst["latencies_ms"], 99)
            rows.append({"max_wait_forwards": wait, "mean_batch_size_16_clients": mean_batch(enc),
                         "p99_ms_baseline": base_p99, "p50_ms_served_16": pct(burst["latencies_ms"], 50),
                         "p99_ms_served_16": served_p99,
                         "p99_ratio": round(served_p99 / base_p99, 2) if base_p99 and served_p99 else None,
                         "served_qps_16": round(burst["qps"], 2), "status_counts_16": burst["status_counts"],
                         "forward_ms_by_size": enc["forward_ms_by_size"]})
            print(f"  batch_tradeoff: {json.dumps({k: v for k, v in rows[-1].items() if k != 'forward_ms_by_size'})}")
    finally:
        harness.deploy_config(bench.config)
    return {"settings": rows, "shipped_max_wait_forwards": shipped.get("max_wait_forwards")}



SECTIONS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "fuzz": section_fuzz, "serve_overhead": section_serve_overhead, "overload": section_overload,
    "replica_kill": section_replica_kill, "rollout": section_rollout, "resume": section_resume,
    "batch_tradeoff": section_batch_tradeoff,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default=os.environ.get("KARMA_ARTIFACT", str(REPO / "artifacts" / "latest")))
    p.add_argument("--config", default=str(harness.SEARCH_YAML))
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {list(SECTIONS)}")
    p.add_argument("--fuzz-cases", type=int, default=1000)
    p.add_argument("--overhead-requests", type=int, default=150)
    p.add_argument("--batch-seconds", type=float, default=15.0)
    p.add_argument("--light-qps", type=float, default=4.0, help="steady load, at most (QPS)")
    p.add_argument("--light-share", type=float, default=0.3, help="steady load, at most this share of capacity")
    p.add_argument("--overload-factor", type=float, default=3.0)
    p.add_argument("--offered-qps", type=float, default=0.0, help="overload rate (QPS); 0 = overload-factor x capacity")
    p.add_argument("--phase-seconds", type=float, default=20.0)
    p.add_argument("--light-samples", type=int, default=60, help="requests in each light phase of overload, at least")
    p.add_argument("--recovery-seconds", type=float, default=10.0)
    p.add_argument("--kill-seconds", type=float, default=40.0)
    p.add_argument("--rollout-seconds", type=float, default=90.0)
    p.add_argument("--tradeoff-waits", default="2,3,4,6", help="batch_tradeoff: encoder max_wait_forwards values")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}")

    artifact = str(Path(args.artifact).resolve())
    # /explain's decode length only bounds the fuzz section's time; every other knob is the YAML's
    overrides = {"InterestEncoder": {"user_config": {"max_new_tokens": 4}}}
    t0 = time.time()
    info = harness.start_local(args.config, artifact, overrides=overrides)
    result: dict[str, Any] = {"artifact": artifact, "config": args.config, "overrides": overrides,
                              "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}}
    try:
        search_app = info["config"]["applications"][0]
        cfg = dict(info["config"], applications=info["config"]["applications"]
                   + [harness.noop_chain_app(runtime_env=search_app.get("runtime_env"))])
        harness.deploy_config(cfg)
        print(f"serve up at {info['url']} in {time.time() - t0:.0f}s")
        bench = Bench(info["url"], artifact, cfg, harness.sample_requests(artifact, 3000, seed=3), args)
        result["calibration"] = calibrate(bench)
        print(f"calibration: {result['calibration']}")
        for name in sections:
            t = time.time()
            load_before = os.getloadavg()
            result[name] = SECTIONS[name](bench)
            result[name]["seconds"] = round(time.time() - t, 1)
            result[name]["loadavg_before_after"] = [round(x, 2) for x in (*load_before, *os.getloadavg())]
            print(f"{name}: {json.dumps({k: v for k, v in result[name].items() if not isinstance(v, (dict, list))})}")
    finally:
        harness.stop_local()
    result["machine"]["loadavg_end"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = json.loads((out / "reliability.json").read_text()) if (out / "reliability.json").exists() else {}
    merged = {**previous, **result}  # a run of some sections keeps the others' last figures
    (out / "reliability.json").write_text(json.dumps(merged, indent=2, default=float) + "\n")
    (out / "reliability.md").write_text(report_md(merged))
    print(f"wrote {out}/reliability.json and .md")
    return 0


def report_md(r: dict[str, Any]) -> str:
    lines = ["# Reliability and serving cost (benchmarks/reliability.py)", "",
             f"Artifact `{Path(r.get('artifact', '')).name}`, machine {r['machine']['cpus']} CPUs, "
             f"1/5/15-min load average at the start {tuple(round(x, 1) for x in r['machine']['loadavg_start'])}.", ""]
    for name in ("calibration", *SECTIONS):
        if name not in r:
            continue
        lines += [f"## {name}", "", "| figure | value |", "|---|---|"]
        for k, v in r[name].items():
            if not isinstance(v, (dict, list)):
                lines.append(f"| {k} | {v} |")
        rows = r[name].get("settings") if isinstance(r[name].get("settings"), list) else []
        if rows:  # one table row per setting (its flat figures)
            cols = [k for k, v in rows[0].items() if not isinstance(v, (dict, list))]
            lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(str(row.get(c)) for c in cols) + " |" for row in rows]
        nested = {k: v for k, v in r[name].items() if isinstance(v, (dict, list))}
        if nested:
            lines += ["", "```json", json.dumps(nested, indent=1, default=float)[:3000], "```"]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
