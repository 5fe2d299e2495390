"""Write deploy/kuberay/rayservice.yaml's `serveConfigV2` from serve_configs/search-gpu.yaml.

  python deploy/kuberay/generate.py           # rewrite the block in place
  python deploy/kuberay/generate.py --check   # exit 1 if the file is out of date (tests/unit/test_kuberay.py)

Every Serve knob (deployment names, replica resources, autoscaling, max_ongoing_requests, queue limits,
user_config) comes from the one YAML that `serve run` uses, so the cluster and a laptop run the same
graph. Only what differs on Kubernetes is changed here (`K8S_OVERRIDES`): the proxy listens on all pod
interfaces behind the serve Service, and the artifact is the shared volume's `latest`. The rest of
rayservice.yaml (pods, volumes, groups) is written by hand; this script replaces only the block.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "serve_configs" / "search-gpu.yaml"
TARGET = REPO / "deploy" / "kuberay" / "rayservice.yaml"
ARTIFACT = "/artifacts/latest"  # the PVC every pod mounts (rayservice.yaml volumes); the RayJob writes it
BLOCK_KEY = "  serveConfigV2: |"
BLOCK_INDENT = " " * 4


def serve_config(source: Path = SOURCE) -> dict[str, Any]:
    """The Serve config of `source` with the Kubernetes differences applied."""
    cfg = copy.deepcopy(yaml.safe_load(source.read_text()))
    cfg["http_options"] = {**cfg.get("http_options", {}), "host": "0.0.0.0"}  # behind the serve Service
    cfg["proxy_location"] = "EveryNode"  # KubeRay's serve Service selects every pod with a healthy proxy
    for app in cfg["applications"]:
        app["args"] = {**app.get("args", {}), "artifact": ARTIFACT}
    return cfg


def render(text: str, cfg: dict[str, Any]) -> str:
    """`text` (rayservice.yaml) with the serveConfigV2 block replaced by `cfg` as YAML."""
    lines = text.splitlines(keepends=True)
    try:
        start = next(i for i, line in enumerate(lines) if line.rstrip("\n") == BLOCK_KEY)
    except StopIteration:
        raise ValueError(f"{TARGET} has no line {BLOCK_KEY!r}") from None
    end = start + 1
    while end < len(lines) and (lines[end].startswith(BLOCK_INDENT) or not lines[end].strip()):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # keep the blank line before the next key
        end -= 1
    body = yaml.safe_dump(cfg, sort_keys=False, width=120)
    block = [BLOCK_INDENT + line + "\n" if line else "\n" for line in body.splitlines()]
    return "".join(lines[: start + 1] + block + lines[end:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if rayservice.yaml is not what this script writes")
    args = p.parse_args(argv)
    current = TARGET.read_text()
    wanted = render(current, serve_config())
    if args.check:
        if current != wanted:
            print(f"{TARGET} is out of date with {SOURCE}: run python deploy/kuberay/generate.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(wanted)
    print(f"wrote serveConfigV2 of {TARGET} from {SOURCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
