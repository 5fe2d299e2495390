"""Roll a running search app to another artifact version, with no failed request and no mixed answer.

  python jobs/rollout.py --artifact artifacts/<run>     # roll out
  python jobs/rollout.py --rollback                     # back to the version before (one command)

Why not `serve deploy` with a new `args.artifact`: Serve would roll the five deployments
independently, so for a while an old ingress would meet new stages (a new encoder's h against an
old index). Instead every request is pinned to one artifact at the ingress and every stage answers
from exactly that version (versions.py). A rollout changes only `user_config`s, which Serve applies
to running replicas (`reconfigure`) without restarting them, in three waits:

  1. stages hold [old, new]   every stage replica loads the new version beside the old one;
  2. ingress pins new         new requests use the new version; running ones finish on the old;
  3. stages hold [new]        after a drain of the ingress's request_timeout_s, the old is dropped.

The ingress's user_config keeps `previous_artifact`, so `--rollback` knows where to go back to.
Serve deploys the whole config in each phase; this module only edits the live config's dict.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Callable

from karma_ray.serve.app import APP_NAME, artifact_path
from karma_ray.serve.versions import artifact_key

STAGE_DEPLOYMENTS = ("InterestEncoder", "Recall", "PreRank", "Rank")
INGRESS = "SearchIngress"


def live_config(app: str = APP_NAME) -> dict[str, Any]:
    """The deployed Serve config (every application), as `serve deploy` would take it, with `app`'s
    `args.artifact` pinned to the path its replicas were built with: re-resolving `latest` while
    rolling would change every deployment's init args and make Serve restart them all."""
    from ray import serve
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    apps = [a["deployed_app_config"] for a in details["applications"].values() if a.get("deployed_app_config")]
    cfg: dict[str, Any] = {"applications": apps, "proxy_location": details.get("proxy_location", "HeadOnly")}
    if details.get("http_options"):
        cfg["http_options"] = details["http_options"]
    cfg = _without_nulls(cfg)
    built = serve.get_deployment_handle(INGRESS, app).artifacts.remote().result(timeout_s=60)
    next(a for a in cfg["applications"] if a["name"] == app).setdefault("args", {})["artifact"] = built["initial"]
    return cfg


def stage_names(cfg: dict[str, Any], app: str = APP_NAME) -> list[str]:
    """The stages that hold versions in this config: the four, plus RecallShard<s> when sharded."""
    from karma_ray.serve.app import recall_shards, shard_names

    app_cfg = next((a for a in cfg["applications"] if a["name"] == app), {})
    shards = recall_shards(app_cfg.get("args"))
    return [*STAGE_DEPLOYMENTS, *(shard_names(shards) if shards > 1 else [])]


def _without_nulls(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _without_nulls(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_without_nulls(v) for v in x]
    return x


def _deployment(cfg: dict[str, Any], name: str, app: str) -> dict[str, Any]:
    app_cfg = next((a for a in cfg["applications"] if a["name"] == app), None)
    if app_cfg is None:
        raise KeyError(f"no application {app!r} in the Serve config")
    deps = app_cfg.setdefault("deployments", [])
    dep = next((d for d in deps if d["name"] == name), None)
    if dep is None:
        dep = {"name": name}
        deps.append(dep)
    dep["user_config"] = dict(dep.get("user_config") or {})
    return dep


def pinned_artifact(cfg: dict[str, Any], app: str = APP_NAME) -> str:
    """The artifact the ingress pins requests to in this config."""
    uc = _deployment(copy.deepcopy(cfg), INGRESS, app)["user_config"]
    app_cfg = next(a for a in cfg["applications"] if a["name"] == app)
    return artifact_key(uc.get("artifact") or artifact_path(app_cfg.get("args")))


def phases(cfg: dict[str, Any], new: str, app: str = APP_NAME) -> list[tuple[str, dict[str, Any]]]:
    """The three configs of a rollout from the ingress's current version to `new`, in order."""
    old, new = pinned_artifact(cfg, app), artifact_key(new)
    out = []
    both = copy.deepcopy(cfg)
    for name in stage_names(cfg, app):
        _deployment(both, name, app)["user_config"]["artifacts"] = list(dict.fromkeys([old, new]))
    out.append(("stages hold old and new", both))
    switched = copy.deepcopy(both)
    ingress = _deployment(switched, INGRESS, app)["user_config"]
    ingress["artifact"], ingress["previous_artifact"] = new, old
    out.append(("ingress pins new", switched))
    final = copy.deepcopy(switched)
    for name in stage_names(cfg, app):
        _deployment(final, name, app)["user_config"]["artifacts"] = [new]
    out.append(("stages drop old", final))
    return out


def previous_artifact(cfg: dict[str, Any], app: str = APP_NAME) -> str:
    prev = _deployment(copy.deepcopy(cfg), INGRESS, app)["user_config"].get("previous_artifact")
    if not prev:
        raise ValueError("this app has not been rolled out with jobs/rollout.py yet: nothing to roll back to")
    return prev


def drain_seconds(cfg: dict[str, Any], app: str = APP_NAME) -> float:
    """How long a request pinned to the old version may still run: the ingress's whole-request budget."""
    uc = _deployment(copy.deepcopy(cfg), INGRESS, app)["user_config"]
    return float(uc.get("request_timeout_s") or uc.get("stage_timeout_s") or 30.0)


def wait_until_held(artifact: str, app: str = APP_NAME, timeout_s: float = 300.0) -> None:
    """Until every stage replica that answers holds `artifact` (Serve may report RUNNING before
    each replica's `reconfigure` has loaded it)."""
    from karma_ray.serve.harness import replica_info

    key, deadline = artifact_key(artifact), time.monotonic() + timeout_s
    while True:
        missing = [name for name in STAGE_DEPLOYMENTS
                   if any(key not in info.get("versions", {}) for info in replica_info(name, app, tries=6))]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"stages {missing} do not hold {key} after {timeout_s:g} s")
        time.sleep(1.0)


def roll(new: str, *, cfg: dict[str, Any], deploy: Callable[[dict[str, Any]], None], app: str = APP_NAME,
         drain_s: float | None = None, log: Callable[[str], None] = print,
         confirm: Callable[[str, str], None] | None = wait_until_held) -> dict[str, Any]:
    """Deploy the three phases in order; `deploy(cfg)` must return once the app is RUNNING again,
    and `confirm(new, app)` once every stage replica holds the new version (after phase 1)."""
    from karma_ray.artifact.layout import REQUIRED_FILES, locate

    new = artifact_key(locate(new, REQUIRED_FILES))  # fails before anything is touched if it is incomplete
    old = pinned_artifact(cfg, app)
    timings = {}
    for i, (name, phase_cfg) in enumerate(phases(cfg, new, app)):
        if i == 2:
            wait = drain_seconds(cfg, app) if drain_s is None else drain_s
            log(f"draining {wait:g} s for requests still pinned to the old version")
            time.sleep(wait)
        t0 = time.monotonic()
        log(f"phase {i + 1}/3: {name}")
        deploy(phase_cfg)
        if i == 0 and confirm is not None:
            confirm(new, app)
        timings[name] = round(time.monotonic() - t0, 2)
    return {"from": old, "to": new, "phase_seconds": timings, "config": phase_cfg}
