"""Bind the search graph: SearchIngress → InterestEncoder → Recall → PreRank → Rank.

  serve run serve_configs/search.yaml                                  # artifacts/latest
  KARMA_ARTIFACT=artifacts/<run> serve run serve_configs/search.yaml   # another artifact
  serve run karma_ray.serve.app:build_app artifact=artifacts/<run>     # code defaults (1 CPU per replica!)

The artifact is `args["artifact"]`, in which `${VAR}` and `${VAR:-default}` are expanded (the YAML
ships `${KARMA_ARTIFACT:-artifacts/latest}`); empty or absent means `$KARMA_ARTIFACT`, else
`artifacts/latest`. A relative path is looked up from the current directory, then from the repo root.
It is resolved to an absolute path here, once, so every replica loads the same artifact even if
`latest` is repointed while the app runs.

Resources, autoscaling, queue limits and batching knobs live only in serve_configs/*.yaml. Tests and
benchmarks start the same YAML through `deploy_config` (what `serve run config.yaml` does, with
the HTTP port and artifact overridable).
"""
from __future__ import annotations

import copy
import os
import re
import time
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

APP_NAME = "karma"
DEPLOYMENTS = ("SearchIngress", "InterestEncoder", "Recall", "PreRank", "Rank")


def default_artifact() -> str:
    return os.environ.get("KARMA_ARTIFACT") or "artifacts/latest"


REPO_ROOT = Path(__file__).resolve().parents[2]
_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand(value: str) -> str:
    """Shell-style `${VAR}` / `${VAR:-default}` in YAML args (Serve passes them through verbatim)."""
    return _VAR.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)


def resolve(args: dict[str, Any] | None) -> str:
    """Absolute artifact dir. A relative path is tried against the current directory, then the repo
    root (Serve builds the app in a worker whose cwd need not be where `serve run` was started)."""
    from karma_ray.serve.catalog import resolve_artifact

    raw = Path(expand(str((args or {}).get("artifact") or "")) or default_artifact()).expanduser()
    if not raw.is_absolute() and not raw.exists() and (REPO_ROOT / raw).exists():
        raw = REPO_ROOT / raw
    return str(resolve_artifact(raw))  # fails here, with a clear message, before any replica starts


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve application builder (`import_path: karma_ray.serve.app:build_app`)."""
    from karma_ray.serve.encoder import InterestEncoder
    from karma_ray.serve.ingress import SearchIngress
    from karma_ray.serve.prerank import PreRank
    from karma_ray.serve.rank import Rank
    from karma_ray.serve.recall import Recall

    artifact = resolve(args)
    return SearchIngress.bind(InterestEncoder.bind(artifact), Recall.bind(artifact), PreRank.bind(artifact),
                              Rank.bind(artifact), artifact)


# ---- start the YAML programmatically (tests, benchmarks, demo) --------------------------------
def load_config(path: str | Path, *, artifact: str | None = None, http_port: int | None = None,
                overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The YAML as a dict with the artifact, HTTP port and per-deployment fields optionally replaced."""
    import yaml

    cfg = yaml.safe_load(Path(path).read_text())
    cfg = copy.deepcopy(cfg)
    app_cfg = cfg["applications"][0]
    if artifact is not None:
        app_cfg.setdefault("args", {})["artifact"] = str(Path(artifact).resolve())
    if http_port is not None:
        cfg.setdefault("http_options", {})["port"] = int(http_port)
    for name, fields in (overrides or {}).items():
        dep = next((d for d in app_cfg.get("deployments", []) if d["name"] == name), None)
        if dep is None:
            dep = {"name": name}
            app_cfg.setdefault("deployments", []).append(dep)
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(dep.get(key), dict):
                dep[key] = {**dep[key], **value}
            else:
                dep[key] = value
    return cfg


def deploy_config(cfg: dict[str, Any], timeout_s: float = 180.0) -> str:
    """Deploy a Serve config dict on the connected Ray, as `serve run config.yaml` does; wait until RUNNING.

    Returns the base URL. Uses Serve's config-deploy path (the YAML's deployment options, user_config
    and autoscaling apply), which `serve.run(app)` would ignore.
    """
    import ray
    from ray.serve._private import api as _private_api  # the same calls `serve run config.yaml` makes
    from ray.serve.schema import ServeDeploySchema

    if not ray.is_initialized():
        raise RuntimeError("connect to Ray first, e.g. ray.init(address='local', num_cpus=4)")
    schema = ServeDeploySchema.model_validate(cfg)
    client = _private_api.serve_start(http_options=schema.http_options.model_dump(),
                                      proxy_location=schema.proxy_location)
    client.deploy_apps(schema, _blocking=False)
    names = [a.name for a in schema.applications]
    wait_running(names, timeout_s)
    http = schema.http_options
    return f"http://{http.host}:{http.port}"


def wait_running(app_names: list[str], timeout_s: float = 180.0) -> None:
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        apps = serve.status().applications
        last = {n: (apps[n].status if n in apps else "NOT_STARTED") for n in app_names}
        bad = {n: apps[n].message for n in app_names if n in apps and apps[n].status == ApplicationStatus.DEPLOY_FAILED}
        if bad:
            raise RuntimeError(f"Serve application failed to deploy: {bad}")
        if all(s == ApplicationStatus.RUNNING for s in last.values()):
            return
        time.sleep(0.5)
    raise TimeoutError(f"Serve applications not RUNNING after {timeout_s}s: {last}")


def replica_counts(app_name: str = APP_NAME) -> dict[str, int]:
    """RUNNING replicas per deployment of one app (from the Serve controller; needs a Ray connection)."""
    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    out = {}
    for name, dep in app.deployments.items():
        counts = getattr(dep, "replica_states", None) or {}
        out[name] = int(sum(v for k, v in counts.items() if str(getattr(k, "value", k)) == "RUNNING"))
    return out
