"""Hot refresh: re-embed items from their text with the running app's item tower and add them to its
live index (Recall, or every RecallShard), without restarting a replica.

  python jobs/refresh_items.py --items changed.parquet                  # item_id, title, category, attributes
  python jobs/refresh_items.py --items changed.parquet --out-dir /shared/refresh --address auto

The vectors go to a Parquet file under --out-dir (every index replica must be able to read it: a
shared path on a cluster), which is appended to the index deployments' user_config `refresh` list
(karma_ray/serve/refresh.py). Scope: ids of the served catalogue; brand-new ids need an export.
"""
from __future__ import annotations

import argparse
import json
import sys

from karma_ray.serve.app import APP_NAME
from karma_ray.serve.harness import deploy_config
from karma_ray.serve.refresh import refresh
from karma_ray.serve.rollout import live_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", required=True, help="Parquet with item_id, title, category, attributes")
    p.add_argument("--out-dir", default="artifacts/refresh", help="where the refresh file goes (shared on a cluster)")
    p.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    p.add_argument("--app", default=APP_NAME, help=f"Serve application name (default {APP_NAME})")
    args = p.parse_args(argv)
    import pyarrow.parquet as pq

    from karma_ray.runtime import ensure_ray

    ensure_ray(args.address, log_to_driver=False)
    out = refresh(pq.read_table(args.items), args.out_dir, cfg=live_config(args.app), deploy=deploy_config, app=args.app)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
