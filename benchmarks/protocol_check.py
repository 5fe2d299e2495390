"""Popularity and SASRec on the `standard` protocol, next to peer code's figures (RecBole 1.2.1, ML-100K).

  python benchmarks/protocol_check.py            # ~10-20 min on 2 cores (SASRec trains to convergence)
  python benchmarks/protocol_check.py --no-sasrec

The protocol: a rating >= 4 is a click; leave-last-out per user (ties in time broken by the log's own
order); full ranking over all items with every earlier click of the user excluded; no cold hold-out.
Writes benchmarks/results/protocol_check.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
# Measured with RecBole 1.2.1's own code on ML-100K under this protocol (942 test users).
PEER = {"popularity": {"hr@10": 0.0807, "hr@50": 0.2304, "hr@200": 0.4947},
        "sasrec": {"hr@10": 0.109, "hr@50": 0.342}, "gru4rec": {"hr@10": 0.117, "hr@50": 0.357}}
TOLERANCE = 0.005  # popularity must match each peer figure within this
SASREC_GOAL = 0.31  # HR@50; RecBole's SASRec does not exclude history, which can only lower its figure


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ml100k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-sasrec", action="store_true", help="popularity only (seconds)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override, e.g. baselines.sasrec_lr=0.002")
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from karma_ray.config import get_preset
    from karma_ray.data.catalog import ItemCatalog
    from karma_ray.data.events import load_items
    from karma_ray.data.prepare import ensure_prepared
    from karma_ray.eval.baselines import popularity_arm, sasrec_arm
    from karma_ray.eval.evaluate import load_splits

    cfg = get_preset(args.preset).with_overrides(["eval.protocol=standard", *args.overrides])
    data_dir = ensure_prepared(cfg)
    catalog = ItemCatalog(load_items(data_dir))
    splits = load_splits(data_dir, cfg.eval)
    load0, t0 = os.getloadavg(), time.perf_counter()
    result = {"protocol": "standard", "n_test": len(splits["test"].targets), "n_valid": len(splits["valid"].targets),
              "peer": PEER, "peer_source": "RecBole 1.2.1 on ML-100K, this protocol (issue 9)"}

    def row(arm: dict) -> dict:
        return {k: arm["splits"]["test"][k] for k in ("hr@10", "hr@50", "hr@200")} | {
            "valid": {k: arm["splits"]["valid"][k] for k in ("hr@10", "hr@50", "hr@200")},
            "ci95": {k: arm["splits"]["test"][f"{k}_ci95"] for k in ("hr@10", "hr@50", "hr@200")}}

    pop = popularity_arm(data_dir, catalog, splits, cfg.eval)
    result["popularity"] = row(pop) | {"within_tolerance": {k: abs(pop["splits"]["test"][k] - v) <= TOLERANCE
                                                            for k, v in PEER["popularity"].items()}}
    print("popularity", json.dumps(result["popularity"]))
    if not args.no_sasrec:
        sas = sasrec_arm(data_dir, catalog, splits, cfg, seed=args.seed)
        result["sasrec"] = row(sas) | {"epochs": sas["epochs"], "best_epoch": sas["best_epoch"],
                                       "train_seconds": sas["train_seconds"], "learning_curve": sas["learning_curve"],
                                       "meets_goal_hr@50": sas["splits"]["test"]["hr@50"] >= SASREC_GOAL}
        print("sasrec", json.dumps({k: v for k, v in result["sasrec"].items() if k != "learning_curve"}))
    result["machine"] = {"cpus": os.cpu_count(), "load_before": load0, "load_after": os.getloadavg(),
                         "seconds": round(time.perf_counter() - t0, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "protocol_check.json").write_text(json.dumps(result, indent=2))
    (out / "protocol_check.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    def f(x):
        return "–" if x is None else f"{x:.4f}"

    lines = ["# Protocol check: the `standard` protocol against peer code", "",
             f"ML-100K, ratings >= 4 are clicks, leave-last-out with time ties broken by the log's order, full ranking "
             f"with every earlier click excluded. n = {r['n_test']} test users ({r['n_valid']} validation). "
             "95% CIs resample users.", "",
             "| arm | HR@10 | HR@50 | HR@200 | peer HR@10 | peer HR@50 | peer HR@200 |", "|---|---|---|---|---|---|---|"]
    for arm in ("popularity", "sasrec"):
        if arm in r:
            a, p = r[arm], r["peer"][arm]
            lines.append(f"| {arm} | {f(a['hr@10'])} | {f(a['hr@50'])} | {f(a['hr@200'])} | {f(p.get('hr@10'))} | "
                         f"{f(p.get('hr@50'))} | {f(p.get('hr@200'))} |")
    lines.append(f"| gru4rec (peer only) | – | – | – | {r['peer']['gru4rec']['hr@10']} | {r['peer']['gru4rec']['hr@50']} | – |")
    lines += ["", f"Popularity within ±{TOLERANCE} of the peer: {r['popularity']['within_tolerance']}."]
    if "sasrec" in r:
        s = r["sasrec"]
        lines += [f"SASRec: {s['epochs']} epochs (best {s['best_epoch']}, early stopping on validation HR@10), "
                  f"{s['train_seconds']} s; HR@50 goal >= {SASREC_GOAL}: {'met' if s['meets_goal_hr@50'] else 'missed'}."]
    m = r["machine"]
    lines += ["", f"Machine: {m['cpus']} CPUs, load {m['load_before'][0]:.1f} before / {m['load_after'][0]:.1f} after, "
              f"{m['seconds']} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
