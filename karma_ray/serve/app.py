"""Bind the search graph: SearchIngress → InterestEncoder → Recall → PreRank → Rank.

With `args.recall_shards: S > 1`, Recall scatters to RecallShard0…S-1 and merges (karma_ray/serve/recall.py);
the YAML then lists those deployments too (their replicas, CPUs and user_config, like Recall's).

  serve run serve_configs/search.yaml                                  # artifacts/latest
  KARMA_ARTIFACT=artifacts/<run> serve run serve_configs/search.yaml   # another artifact
  serve run karma_ray.serve.app:build_app artifact=artifacts/<run>     # code defaults (1 CPU per replica!)
  serve run karma_ray.serve.app:build_stage stage=Recall artifact=DIR  # one stage alone (profiling)
  python jobs/rollout.py --artifact artifacts/<run>                    # roll a running app to a new version

The artifact is `args["artifact"]`, in which `${VAR}` and `${VAR:-default}` are expanded (the YAML
ships `${KARMA_ARTIFACT:-artifacts/latest}`); empty or absent means `$KARMA_ARTIFACT`, else
`artifacts/latest`. A relative path is looked up from the current directory, then from the repo root.
It is resolved to an absolute path here, once, so every replica loads the same artifact even if
`latest` is repointed while the app runs. An `s3://bucket/prefix/latest` (or a version's URI) works
the same way: `latest` is followed here, and each replica downloads that version once per node
(`karma_ray.artifact.storage`; endpoint and credentials from the replicas' AWS_* environment).

Resources, autoscaling, queue limits and batching knobs live only in serve_configs/*.yaml
(`karma_ray.serve.harness.deploy_config` starts the same YAML from tests and benchmarks).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ray.serve import Application

from karma_ray.artifact import storage
from karma_ray.artifact.layout import REQUIRED_FILES, locate
from karma_ray.serve.encoder import InterestEncoder
from karma_ray.serve.ingress import SearchIngress
from karma_ray.serve.ranking import Ranker
from karma_ray.serve.recall import Recall, RecallShard

APP_NAME = "karma"
DEPLOYMENTS = ("SearchIngress", "InterestEncoder", "Recall", "PreRank", "Rank")  # + RecallShard<s> when sharded
REPO_ROOT = Path(__file__).resolve().parents[2]
_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand(value: str) -> str:
    """Shell-style `${VAR}` / `${VAR:-default}` in YAML args (Serve passes them through verbatim)."""
    return _VAR.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)


def artifact_path(args: dict[str, Any] | None) -> str | Path:
    """The artifact the args name (unchecked): an s3:// URI as given, else a path. A relative path is
    tried against the current directory, then the repo root (Serve builds the app in a worker whose cwd
    need not be where `serve run` was started)."""
    given = expand(str((args or {}).get("artifact") or "")) or os.environ.get("KARMA_ARTIFACT") or "artifacts/latest"
    if storage.is_remote(given):
        return given
    raw = Path(given).expanduser()
    if not raw.is_absolute() and not raw.exists() and (REPO_ROOT / raw).exists():
        raw = REPO_ROOT / raw
    return raw


def artifact_from_args(args: dict[str, Any] | None) -> str:
    """The complete artifact version (an absolute dir, or an s3:// URI with `latest` followed): fails here,
    with a clear message, before any replica starts. Replicas fetch an s3:// version on their own node."""
    return locate(artifact_path(args), REQUIRED_FILES)


def recall_shards(args: dict[str, Any] | None) -> int:
    """`args.recall_shards` (the YAML's; `${VAR}` expanded): how many RecallShard deployments hold the
    index. 1 (default) = one Recall deployment with the whole index."""
    raw = expand(str((args or {}).get("recall_shards") or 1))
    shards = int(raw)
    if shards < 1:
        raise ValueError(f"recall_shards must be >= 1, got {raw!r}")
    return shards


def shard_names(shards: int) -> list[str]:
    """Deployment names of the shards, as serve_configs/*.yaml must list them."""
    return [f"RecallShard{s}" for s in range(shards)]


def stages(artifact: str, shards: int = 1) -> dict[str, Application]:
    """The four stage deployments bound to one artifact, by deployment name; with shards > 1 Recall
    scatters to that many RecallShard deployments."""
    parts = [RecallShard.options(name=name).bind(artifact, s, shards) for s, name in enumerate(shard_names(shards))]
    return {"InterestEncoder": InterestEncoder.bind(artifact),
            "Recall": Recall.bind(artifact, parts) if shards > 1 else Recall.bind(artifact),
            "PreRank": Ranker.options(name="PreRank").bind(artifact, "prerank"),
            "Rank": Ranker.options(name="Rank").bind(artifact, "rank")}


def build_stage(args: dict[str, Any]) -> Application:
    """One stage alone: `serve run karma_ray.serve.app:build_stage stage=Recall artifact=DIR`."""
    bound = stages(artifact_from_args(args), recall_shards(args))
    if args.get("stage") not in bound:
        raise ValueError(f"stage must be one of {sorted(bound)}, not {args.get('stage')!r}")
    return bound[args["stage"]]


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve application builder (`import_path: karma_ray.serve.app:build_app`)."""
    artifact = artifact_from_args(args)
    s = stages(artifact, recall_shards(args))
    return SearchIngress.bind(s["InterestEncoder"], s["Recall"], s["PreRank"], s["Rank"], artifact)
