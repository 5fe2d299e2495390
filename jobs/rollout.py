"""Roll the running search app to another artifact version (or back), without failing a request.

  python jobs/rollout.py --artifact artifacts/<run>     # roll out this version
  python jobs/rollout.py --rollback                     # back to the version before the last rollout
  python jobs/rollout.py --artifact DIR --address auto  # the Ray cluster to talk to (default: auto)

Every request is pinned to one version at the ingress and every stage answers from that version;
the rollout only changes `user_config`s, so no replica restarts (see karma_ray/serve/rollout.py).
Prints the config it deployed last: put its artifact into your YAML's `args.artifact` to keep it
across a later `serve deploy` of the file (which would otherwise bring back the file's version).
"""
from __future__ import annotations

import argparse
import json
import sys

from karma_ray.serve.app import APP_NAME
from karma_ray.serve.harness import deploy_config
from karma_ray.serve.rollout import live_config, previous_artifact, roll


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--artifact", help="artifact directory to roll out (artifacts/latest is followed)")
    what.add_argument("--rollback", action="store_true", help="roll back to the version before the last rollout")
    p.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    p.add_argument("--app", default=APP_NAME, help=f"Serve application name (default {APP_NAME})")
    p.add_argument("--drain-seconds", type=float, default=None,
                   help="wait before dropping the old version (default: the ingress's request_timeout_s)")
    args = p.parse_args(argv)

    from karma_ray.runtime import ensure_ray

    ensure_ray(args.address, log_to_driver=False)
    cfg = live_config()
    target = previous_artifact(cfg, args.app) if args.rollback else args.artifact
    out = roll(target, cfg=cfg, deploy=deploy_config, app=args.app, drain_s=args.drain_seconds)
    print(json.dumps({k: v for k, v in out.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
