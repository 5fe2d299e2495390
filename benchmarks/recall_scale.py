"""Recall at catalogue scale: flat vs IVF-Flat / IVF-PQ / IVF-PQ + exact re-rank / HNSW, sharded vs unsharded.

  python benchmarks/recall_scale.py                                 # artifacts/latest, 100k and 1M items
  python benchmarks/recall_scale.py --artifact DIR --sizes 100000 --queries 200
  python benchmarks/recall_scale.py --sizes 1000000 --kinds flat,ivf_pq_refine --unsharded-only --merge

Vectors look like trained ones: the artifact's trained item embeddings, and beyond their count, samples of
a Gaussian mixture (tied full covariance, numpy EM) fitted to them, at the trained dimension, scaled to
unit norm as the item head's are. Queries are fresh samples of the same mixture. Every index comes from
`karma_ray.artifact.faiss_index` (what export and the RecallShard deployments use).

Per (items, index, shards): build time (1 FAISS thread), serialised bytes per million items, p50/p99
latency of one top-200 query at a time on one FAISS thread, recall@200 against exact flat search, and
speedup = flat p50 / p50. Sharded rows search each shard in turn and merge (`ShardedIndex`); their
p50_ms is the critical path of a parallel scatter (the slowest shard per query + the merge), and
p50_serial_ms the one-core sum. The machine is shared: each row carries the 1-minute load average
before and after it. Writes benchmarks/results/recall_scale.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOP_N = 200


def fit_mixture(x: np.ndarray, k: int, iters: int = 30, seed: int = 0) -> dict[str, np.ndarray]:
    """Gaussian mixture with one shared full covariance, by EM (k components on N points of dim d; a
    tied covariance is what ~1,000 points can estimate in d=576). Returns weights, means, chol."""
    rng = np.random.default_rng(seed)
    n, d = x.shape
    means = x[rng.choice(n, k, replace=False)].astype(np.float64)
    cov = np.cov(x.T) + 1e-4 * np.eye(d)
    weights = np.full(k, 1.0 / k)
    for _ in range(iters):
        chol = np.linalg.cholesky(cov)
        white = np.linalg.solve(chol, x.T).T
        mwhite = np.linalg.solve(chol, means.T).T
        logp = np.log(weights) - 0.5 * ((white[:, None, :] - mwhite[None]) ** 2).sum(-1)
        resp = np.exp(logp - logp.max(1, keepdims=True))
        resp /= resp.sum(1, keepdims=True)
        nk = resp.sum(0) + 1e-9
        weights, means = nk / n, (resp.T @ x) / nk[:, None]
        centred = x - resp @ means  # soft residuals: E[(x - mu_z)(x - mu_z)^T] up to the within-weights term
        cov = (centred.T @ centred) / n + 1e-4 * np.eye(d)
    return {"weights": weights, "means": means.astype(np.float32), "chol": np.linalg.cholesky(cov).astype(np.float32)}


def sample_mixture(mix: dict[str, np.ndarray], n: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    d = mix["means"].shape[1]
    out = np.empty((n, d), np.float32)
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        z = rng.choice(len(mix["weights"]), m, p=mix["weights"])
        v = mix["means"][z] + rng.standard_normal((m, d), dtype=np.float32) @ mix["chol"].T
        out[lo : lo + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def catalogue(trained: np.ndarray, mix, n: int) -> np.ndarray:
    """The trained embeddings first, then mixture samples up to n."""
    if n <= len(trained):
        return np.ascontiguousarray(trained[:n], dtype=np.float32)
    return np.concatenate([trained.astype(np.float32), sample_mixture(mix, n - len(trained), seed=n)])


def time_queries(search, queries: np.ndarray) -> np.ndarray:
    """Milliseconds per single-query call."""
    out = []
    for q in queries:
        t0 = time.perf_counter()
        search(q[None])
        out.append((time.perf_counter() - t0) * 1e3)
    return np.array(out)


def sharded_latency(sharded, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(critical path, serial sum) in ms per query: each shard timed alone, plus the merge."""
    from karma_ray.artifact.faiss_index import merge_topn

    crit, serial = [], []
    for q in queries:
        parts, times = [], []
        for shard in sharded.shards:
            t0 = time.perf_counter()
            d, i = shard.search(q[None], TOP_N)
            times.append(time.perf_counter() - t0)
            parts.append((i[0], d[0]))
        t0 = time.perf_counter()
        merge_topn(parts, TOP_N)
        merge = time.perf_counter() - t0
        crit.append((max(times) + merge) * 1e3)
        serial.append((sum(times) + merge) * 1e3)
    return np.array(crit), np.array(serial)


def recall_at(truth: np.ndarray, got: np.ndarray) -> float:
    """Mean share of the exact top-N that the index found."""
    return float(np.mean([len(set(t.tolist()) & set(g[g >= 0].tolist())) / len(t) for t, g in zip(truth, got)]))


def set_knobs(index, setting) -> None:
    """One search setting on an index or every shard (the serve user_config's knobs): None = as built,
    an int = IVF nprobe, a dict = {"nprobe": …, "k_factor": …} (the re-rank depth of ivf_pq_refine)."""
    from karma_ray.artifact.faiss_index import set_search_knobs

    if setting is not None:
        set_search_knobs(index, **(setting if isinstance(setting, dict) else {"nprobe": setting}))


def label_of(name: str, setting) -> str:
    knobs = setting if isinstance(setting, dict) else {"nprobe": setting}
    return name.format(shard_nprobe=knobs.get("nprobe"), **knobs)


def measure(items: int, name: str, cfg, shards: int, settings: list, emb, ids, queries, lat_queries, truth) -> list[dict]:
    """Build once, then one row per search setting (see `set_knobs`)."""
    from karma_ray.artifact.faiss_index import ShardedIndex, build_faiss, build_shards, index_bytes

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    index = build_faiss(emb, ids, cfg) if shards == 1 else ShardedIndex(build_shards(emb, ids, cfg, shards))
    build_s = time.perf_counter() - t0
    nbytes = sum(index_bytes(p) for p in ([index] if shards == 1 else index.shards))
    rows = []
    for setting in settings:
        set_knobs(index, setting)
        _, got = index.search(queries, TOP_N)
        label = label_of(name, setting)
        row = {"items": items, "index": label, "kind": cfg.kind, "shards": shards, "build_s": round(build_s, 2),
               "mem_mb_per_million": round(nbytes / 2**20 / items * 1e6, 1), "recall_vs_flat": round(recall_at(truth, got), 4)}
        if shards == 1:
            lat = time_queries(lambda q: index.search(q, TOP_N), lat_queries)
            row.update(p50_ms=round(float(np.percentile(lat, 50)), 3), p99_ms=round(float(np.percentile(lat, 99)), 3))
        else:
            crit, serial = sharded_latency(index, lat_queries)
            row.update(p50_ms=round(float(np.percentile(crit, 50)), 3), p99_ms=round(float(np.percentile(crit, 99)), 3),
                       p50_serial_ms=round(float(np.percentile(serial, 50)), 3))
        row.update(latency_queries=len(lat_queries), recall_queries=len(queries),
                   load_1min=[round(load0, 2), round(os.getloadavg()[0], 2)])
        rows.append(row)
        load0 = os.getloadavg()[0]
    return rows


def plan(items: int, dim: int, full: bool, refine_m: int = 0) -> list[tuple[str, dict, int, list]]:
    """(label, IndexConfig fields, shards, search settings): flat, IVF-Flat at several nprobe, 4 shards of
    flat (exactness), 4 and 8 shards of IVF-Flat (nlist split over them), IVF-PQ fast scan with an exact
    re-rank at several (nprobe, k_factor) (`refine_m` 4-bit codes, default one per 2 dimensions), and with `full` IVF-PQ and HNSW (their builds are the slowest here;
    their memory per million does not depend on the size). nlist ~ sqrt(items), rounded to a power of two."""
    nlist = int(2 ** round(np.log2(np.sqrt(items))))
    pq_m = next(m for m in (96, 72, 64, 48, 32, 16, 8) if dim % m == 0)
    out = [("flat", {"kind": "flat"}, 1, [None]), ("flat", {"kind": "flat"}, 4, [None]),
           (f"ivf_flat nlist{nlist} nprobe{{nprobe}}", {"kind": "ivf_flat", "nlist": nlist}, 1, [8, 16, 32, 64, 128, 256]),
           *[(f"ivf_flat nlist{nlist} as {s} shards of nlist{nlist // s} nprobe{{shard_nprobe}}",
              {"kind": "ivf_flat", "nlist": nlist}, s, probes) for s, probes in ((4, [8, 16, 32, 48]), (8, [8, 16, 24]))]]
    fs_m = refine_m or (dim // 2 if dim % 2 == 0 else dim)  # 2 dims per 4-bit code (3 per code: recall 0.946 at 1M)
    out.append((f"ivf_pq_refine nlist{nlist} m{fs_m}x4fs nprobe{{nprobe}} kf{{k_factor}}",
                {"kind": "ivf_pq_refine", "nlist": nlist, "pq_m": fs_m, "pq_bits": 4}, 1,
                [{"nprobe": p, "k_factor": k} for p in (nlist // 8, nlist * 3 // 16, nlist // 4) for k in (4, 8, 16)]))
    if full:
        out.append((f"ivf_pq nlist{nlist} nprobe{{nprobe}} m{pq_m}x8", {"kind": "ivf_pq", "nlist": nlist, "pq_m": pq_m}, 1, [32, 64]))
        out.append(("hnsw M32 efC80 efS256", {"kind": "hnsw", "hnsw_m": 32, "hnsw_ef_construction": 80, "hnsw_ef_search": 256},
                    1, [None]))
    return out


def kept_rows(out: Path, sizes: list[int], merge: bool = False) -> list[dict]:
    """Rows of an earlier run's results file, marked earlier_run: those of other sizes (--append), or
    all of them (--merge: a new run's rows are added next to them, each run's speedups against its own flat)."""
    path = out / "recall_scale.json"
    if not path.exists():
        return []
    earlier = json.loads(path.read_text())
    return [{**r, "earlier_run": True} for r in earlier["runs"] if merge or r["items"] not in sizes]


def run_size(items: int, trained, mix, args, log) -> None:
    """Every planned row at `items` items, each passed to `log` as soon as it is measured."""
    import faiss

    from karma_ray.artifact.faiss_index import build_faiss
    from karma_ray.config import IndexConfig

    emb = catalogue(trained, mix, items)
    ids = np.arange(items, dtype=np.int64)
    nq = args.queries if items <= 200_000 else args.queries_large
    queries = sample_mixture(mix, nq, seed=10**9 + items)
    lat_queries = queries[: min(nq, args.latency_queries)]
    faiss.omp_set_num_threads(1)  # builds too: OpenMP's spinning threads ran 4x slower on the shared 2 cores
    _, truth = build_faiss(emb, ids, IndexConfig(kind="flat")).search(queries, TOP_N)  # exact top-200
    rows = []
    kinds = set(args.kinds.split(",")) if args.kinds else None
    for label, fields, shards, settings in plan(items, emb.shape[1], items <= args.full_plan_max_items, args.refine_m):
        if (kinds and fields["kind"] not in kinds) or (args.unsharded_only and shards > 1):
            continue
        for row in measure(items, label, IndexConfig(**fields), shards, settings, emb, ids, queries, lat_queries, truth):
            flat = next((r for r in rows if r["index"] == "flat" and r["shards"] == 1), row)
            row["speedup_vs_flat"] = round(flat["p50_ms"] / row["p50_ms"], 1)
            row["run"] = args.run_id
            rows.append(row)
            log(row)


def extrapolate(rows: list[dict], to_items: int) -> list[dict]:
    """Rows at `to_items` from the largest measured size, linear in N at the same nlist/nprobe ratio
    (flat and IVF scan a fixed share of the catalogue, so time and memory grow with N; recall and speedup
    stay). Marked extrapolated: not measured."""
    base = max(r["items"] for r in rows)
    f = to_items / base
    out, seen = [], set()
    for r in rows:  # not HNSW (log-like search) nor the re-rank (a fixed k·factor candidates per query)
        if r["items"] != base or r["kind"] in ("hnsw", "ivf_pq_refine") or (r["index"], r["shards"]) in seen:
            continue
        seen.add((r["index"], r["shards"]))
        out.append({**{k: r[k] for k in ("index", "kind", "shards", "mem_mb_per_million", "recall_vs_flat", "speedup_vs_flat")},
                    "items": to_items, "build_s": round(r["build_s"] * f, 1), "p50_ms": round(r["p50_ms"] * f, 3),
                    "p99_ms": round(r["p99_ms"] * f, 3), "extrapolated": True, "from_items": base})
    return out


def write(out: Path, result: dict) -> None:
    (out / "recall_scale.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Recall at catalogue scale", "", result["note"], "",
             "| run | items | index | shards | build s | MB / 1M items | p50 ms | p99 ms | recall@200 vs flat | speedup vs flat | load (1 min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r.get('run', 'earlier')} | {r['items']:,} | {r['index']} | {r['shards']} | {r['build_s']} | "
                     f"{r['mem_mb_per_million']} | {r['p50_ms']} | {r['p99_ms']} | {r['recall_vs_flat']} | "
                     f"{r['speedup_vs_flat']}x | {r['load_1min'][0]} → {r['load_1min'][1]} |")
    if result.get("extrapolated"):
        lines += ["", "## Extrapolated (NOT measured)", "", result["extrapolation_note"], "",
                  "| items | index | shards | build s | MB / 1M items | p50 ms | recall@200 vs flat | speedup vs flat |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['items']:,} | {r['index']} | {r['shards']} | {r['build_s']} | {r['mem_mb_per_million']} | "
                  f"{r['p50_ms']} | {r['recall_vs_flat']} | {r['speedup_vs_flat']}x |" for r in result["extrapolated"]]
    (out / "recall_scale.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default="artifacts/latest", help="its item_emb.npy gives the trained vectors")
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--extrapolate-to", type=int, default=5_000_000, help="0 = none; marked extrapolated")
    p.add_argument("--queries", type=int, default=300, help="recall queries up to 200k items")
    p.add_argument("--queries-large", type=int, default=200, help="recall queries above 200k items")
    p.add_argument("--latency-queries", type=int, default=100, help="timed one at a time (the first ones)")
    p.add_argument("--components", type=int, default=16, help="mixture components")
    p.add_argument("--full-plan-max-items", type=int, default=200_000,
                   help="IVF-PQ and HNSW only up to this size (their builds take the longest on a shared 2-core box)")
    p.add_argument("--append", action="store_true",
                   help="keep the rows of other sizes already in the results file (a size re-run alone)")
    p.add_argument("--merge", action="store_true",
                   help="keep every row already in the results file and add this run's next to them (column run)")
    p.add_argument("--kinds", default="", help="only these index kinds, e.g. flat,ivf_pq_refine (default: the whole plan)")
    p.add_argument("--unsharded-only", action="store_true", help="skip the sharded rows")
    p.add_argument("--refine-m", type=int, default=0, help="ivf_pq_refine: 4-bit codes per vector (0 = one per 2 dimensions)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    args.run_id = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())
    from karma_ray.artifact.layout import resolve

    art = resolve(args.artifact, ("item_emb.npy",))
    trained = np.load(Path(art) / "item_emb.npy", allow_pickle=False).astype(np.float64)
    mix = fit_mixture(trained, args.components)
    sizes = [int(s) for s in args.sizes.split(",")]
    runs: list[dict] = kept_rows(Path(args.out), sizes, args.merge) if args.append or args.merge else []
    t_start = time.time()

    def log(row: dict) -> None:  # every row is written at once: a later one may not finish
        runs.append(row)
        print(json.dumps(row), flush=True)
        write(Path(args.out), summary(runs, art, trained, args, t_start))

    for items in sizes:
        run_size(items, trained, mix, args, log)
    print((Path(args.out) / "recall_scale.md").read_text())
    return 0


def summary(runs: list[dict], art: Path, trained: np.ndarray, args, t_start: float) -> dict:
    result = {
        "runs": runs, "artifact": str(art), "trained_items": len(trained), "dim": int(trained.shape[1]),
        "top_n": TOP_N, "cpus": os.cpu_count(), "wall_s": round(time.time() - t_start, 1),
        "note": (f"{len(trained)} trained item embeddings (d={trained.shape[1]}) from {art.name}, then samples of a "
                 f"{args.components}-component tied-covariance Gaussian mixture fitted to them (unit norm); queries "
                 f"are fresh mixture samples. Builds and searches on 1 FAISS thread; latency: one top-{TOP_N} query at a time. Sharded rows: p50/p99 = slowest shard + merge (parallel scatter), p50_serial_ms = "
                 "all shards on one core. The machine (2 cores) was shared with other benchmarks: see load. "
                 "Rows marked earlier_run (run 'earlier' or an earlier run's start time) come from earlier invocations kept by --append/--merge "
                 "(same vectors and index code); each row's speedup is against the flat row of its own run, measured side by side."),
    }
    if args.extrapolate_to:
        result["extrapolated"] = extrapolate(runs, args.extrapolate_to)
        result["extrapolation_note"] = (f"{args.extrapolate_to:,} items did not fit this machine's memory next to its other "
                                        "jobs (flat + IVF copies of 11.5 GB each): linear in N from the largest measured "
                                        "size at the same nlist/nprobe, recall and speedup carried over.")
    return result


if __name__ == "__main__":
    sys.exit(main())
