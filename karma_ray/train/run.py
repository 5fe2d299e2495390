"""End-to-end training run: connect Ray → ensure data → fit → export artifact → print a summary."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from karma_ray.artifact import storage
from karma_ray.config import KarmaConfig
from karma_ray.data.prepare import ensure_prepared
from karma_ray.runtime import ensure_ray
from karma_ray.train.trainer import fit, run_name_for

log = logging.getLogger(__name__)


RUN_CONFIG = "karma_config.json"  # written beside Ray Train's files in <storage_path>/<run>/


def resumable_config(storage_path: str, run_name: str) -> KarmaConfig:
    """The config a run was started with, for `jobs/train.py --resume RUN` after its driver died.

    Ray Train V2 resumes a run that is started again under the same (storage_path, name) from its latest
    checkpoint; this gives it the same config too. `storage_path` is a local dir or an s3:// URI.
    """
    base = storage_path if storage.is_remote(storage_path) else Path(storage_path).expanduser().resolve()
    path = storage.join(base, run_name, RUN_CONFIG)
    if not storage.exists(path):
        raise FileNotFoundError(f"no run {run_name!r} to resume under {base} (looked for {path})")
    return KarmaConfig.from_dict(json.loads(storage.read_text(path)))


def _record_config(cfg: KarmaConfig, run_name: str) -> None:
    storage.write_text(storage.join(cfg.train.storage_path, run_name, RUN_CONFIG), json.dumps(cfg.to_dict(), indent=2))


def run(cfg: KarmaConfig, address: str | None = None, run_name: str | None = None,
        show_progress: bool = True) -> str | Path:
    """Train, export, and return the artifact version (a directory, or an s3:// URI)."""
    return run_with_history(cfg, address, run_name, show_progress)[0]


def run_with_history(cfg: KarmaConfig, address: str | None = None, run_name: str | None = None,
                     show_progress: bool = True) -> tuple[str | Path, list[dict[str, Any]]]:
    """Like `run`, also returning every rank-0 report (tests and benchmarks plot/inspect them)."""
    from karma_ray.train.export import export_artifact

    import ray

    from karma_ray.train.trainer import RejectTally

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = cfg.with_absolute_paths()
    ensure_prepared(cfg)
    ensure_ray(address)
    cache = None
    if cfg.model.trainable_layers:  # the frozen trunk's output for fixed text, shared by every run that matches
        from karma_ray.cache.build import ensure_cache

        cache = ensure_cache(cfg, show_progress)
    name = run_name or run_name_for(cfg)
    _record_config(cfg, name)
    tally = RejectTally.remote()
    result, history = fit(cfg, name, show_progress, cache_root=str(cache.root) if cache else None, tally=tally)
    if result.checkpoint is None:
        raise RuntimeError(f"run {name} finished without a checkpoint")
    rejected = ray.get(tally.get.remote())
    final = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    remote = storage.is_remote(cfg.train.storage_path)
    with result.checkpoint.as_directory() as ckpt:  # on S3: downloaded to a local temporary directory
        out = export_artifact(cfg, ckpt, name, {"train": final, "train_history": history, "rejected_rows": rejected,
                                                "trunk_cache": str(cache.root) if cache else None}, show_progress, cache,
                              checkpoint_uri=f"s3://{result.checkpoint.path}" if remote else None)
    print_summary(out, final)
    return out, history


def print_summary(out: str | Path, final: dict[str, Any]) -> None:
    from karma_ray.artifact.layout import read_manifest

    metrics = read_manifest(out)["metrics"]
    shown = {k: round(v, 4) for k, v in final.items() if k in ("step", "loss", "act", "gen", "rec", "img", "tokens_per_s")}
    print(f"final train metrics: {shown}")
    print("retrieval: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in metrics.items() if k.startswith("test")))
