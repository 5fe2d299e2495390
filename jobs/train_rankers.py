"""Train the pre-ranker and ranker of the search cascade on top of a KARMA artifact.

Reads the artifact's encoder, item embeddings and FAISS index, embeds the impression prompts once,
trains both rankers, reports pre-ranker HR@50 and ranker AUC/GAUC on the test split, and writes a
NEW artifact version `<artifact>-rankers-<time>` beside it: the same files (hard-linked) plus
rankers.safetensors + rankers.json and a manifest with its own run_name and a "rankers" key. The
source version is never modified (a replica may be serving it); `latest` moves to the new version
if it pointed at the source. Serve it with `python jobs/rollout.py --artifact <new version>`.

  python jobs/train_rankers.py                                  # artifacts/latest, its own data dir
  python jobs/train_rankers.py --artifact artifacts/demo-2026… --epochs 3 --no-progress
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default="artifacts/latest",
                   help="artifact directory written by jobs/train.py (default: artifacts/latest)")
    p.add_argument("--data", default=None,
                   help="prepared data directory with impressions/{train,test}.parquet and test.parquet "
                        "(default: the data path recorded in the artifact's manifest.json)")
    p.add_argument("--epochs", type=int, default=5, help="passes over the training data for each ranker (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, shuffling and sub-sampling (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (e.g. in CI logs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.epochs < 1:
        raise SystemExit("--epochs must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from karma_ray.train.rankers import summary_line, train_rankers

    out = train_rankers(args.artifact, data_dir=args.data, epochs=args.epochs, seed=args.seed,
                        show_progress=not args.no_progress)
    metrics = out["rankers"]
    print(json.dumps({k: v for k, v in metrics.items() if not k.endswith("_train_loss")}, indent=2))
    print(summary_line(metrics))
    print(f"new artifact version with rankers: {out['artifact']} (from {out['source']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
