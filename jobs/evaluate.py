"""Evaluate an artifact with the full offline protocol (DESIGN §4) and write a report next to it.

Writes <artifact>/eval/{metrics.json, report.md, hr_at_k.png, attention.png}:
  full-catalogue HR@{10,50,200} and NDCG@{10,50} with 95% bootstrap CIs, history excluded, on the
  last-click test split and on every held-out event whose target is a cold item; the attention-sink
  rate and the [INT] row's entropy / top-1 mass per layer; token-F1 of text decoded from h; the
  effective rank of h.

  python jobs/evaluate.py                                   # artifacts/latest on its own data
  python jobs/evaluate.py --artifact artifacts/ml100k-… --max-events 500 --no-progress
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default="artifacts/latest", help="artifact directory (default: artifacts/latest)")
    p.add_argument("--data", default=None, help="prepared data directory (default: the one in the artifact's manifest)")
    p.add_argument("--out", default=None, help="report directory (default: <artifact>/eval)")
    p.add_argument("--max-events", type=int, default=0,
                   help="evaluate at most this many seeded events per split (default 0: all of them)")
    p.add_argument("--probe-prompts", type=int, default=128, help="prompts for the attention diagnostics (default 128)")
    p.add_argument("--fidelity-samples", type=int, default=128, help="events decoded from h for token-F1 (default 128)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed for sub-sampling and the bootstrap (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in CI logs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from karma_ray.eval.evaluate import EvalConfig, evaluate_artifact

    try:
        cfg = EvalConfig(max_events=args.max_events, probe_prompts=args.probe_prompts,
                         fidelity_samples=args.fidelity_samples, n_boot=args.bootstrap, seed=args.seed)
        metrics, out = evaluate_artifact(args.artifact, cfg, args.out, args.data, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics["summary"], indent=2))
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
