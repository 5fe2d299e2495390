"""Evaluate an artifact with its offline protocol (docs/design.md §4) and write a report next to it.

Writes <artifact>/eval/{metrics.json, report.md, hr_at_k.png, attention.png}: full-catalogue HR@{10,50,200}
and NDCG@{10,50} with 95% cluster-bootstrap CIs, every earlier click excluded, on the validation and test
splits of the artifact's protocol (warm and cold), with and without the click-share prior (α chosen on
validation); the attention-sink rate and the [INT] row's entropy / top-1 mass per trainable layer; token-F1
of text decoded from h (P refit on the frozen h); the effective rank of h. The full-depth model runs.

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
    p.add_argument("--max-events", type=int, default=None,
                   help="evaluate at most this many seeded events per split, warm and cold (default: the artifact's "
                        "eval config: every warm event, 1000 per cold split)")
    p.add_argument("--probe-prompts", type=int, default=None, help="prompts for the attention diagnostics (default 128)")
    p.add_argument("--fidelity-samples", type=int, default=None, help="events decoded from h for token-F1 (default 128)")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples for the 95%% CIs (default 1000)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="eval.FIELD=VALUE",
                   help="any eval config field, e.g. --set eval.fidelity_fit_steps=0")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in CI logs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from karma_ray.artifact.layout import read_manifest, resolve
    from karma_ray.config import KarmaConfig
    from karma_ray.eval.evaluate import evaluate_artifact

    try:
        overrides = list(args.overrides)
        for value, keys in ((args.max_events, ("eval.max_events", "eval.max_cold_events")),
                            (args.probe_prompts, ("eval.probe_prompts",)), (args.fidelity_samples, ("eval.fidelity_samples",)),
                            (args.bootstrap, ("eval.n_boot",))):
            overrides += [f"{k}={value}" for k in keys] if value is not None else []
        if any(not o.startswith("eval.") for o in overrides):
            raise ValueError("--set takes eval.* fields only (the model is the artifact's)")
        cfg = KarmaConfig.from_dict(read_manifest(resolve(args.artifact))["config"]).with_overrides(overrides).eval
        metrics, out = evaluate_artifact(args.artifact, cfg, args.out, args.data, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics["summary"], indent=2))
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    from karma_ray.allocator import reexec_with_fast_allocator

    reexec_with_fast_allocator()  # this process evaluates and exports on CPU
    sys.exit(main())
