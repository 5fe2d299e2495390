"""End-to-end training run: connect Ray → ensure data → fit → export artifact → print a summary."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from karma_ray.config import KarmaConfig
from karma_ray.data.prepare import ensure_prepared
from karma_ray.runtime import ensure_ray
from karma_ray.train.trainer import fit, run_name_for

log = logging.getLogger(__name__)


RUN_CONFIG = "karma_config.json"  # written beside Ray Train's files in <storage_path>/<run>/


def resumable_config(storage_path: str, run_name: str) -> KarmaConfig:
    """The config a run was started with, for `jobs/train.py --resume RUN` after its driver died.

    Ray Train V2 resumes a run that is started again under the same (storage_path, name) from its latest
    checkpoint; this gives it the same config too.
    """
    path = Path(storage_path).expanduser().resolve() / run_name / RUN_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"no run {run_name!r} to resume under {path.parent.parent} (looked for {path})")
    return KarmaConfig.from_dict(json.loads(path.read_text()))


def _record_config(cfg: KarmaConfig, run_name: str) -> None:
    if "://" in cfg.train.storage_path:
        return  # remote storage: the run resumes from its checkpoint; pass the same preset and overrides
    path = Path(cfg.train.storage_path) / run_name / RUN_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg.to_dict(), indent=2))


def run(cfg: KarmaConfig, address: str | None = None, run_name: str | None = None, show_progress: bool = True) -> Path:
    """Train, export, and return the artifact directory."""
    return run_with_history(cfg, address, run_name, show_progress)[0]


def run_with_history(cfg: KarmaConfig, address: str | None = None, run_name: str | None = None,
                     show_progress: bool = True) -> tuple[Path, list[dict[str, Any]]]:
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
    with result.checkpoint.as_directory() as ckpt:
        out = export_artifact(cfg, ckpt, name, {"train": final, "train_history": history, "rejected_rows": rejected,
                                                "trunk_cache": str(cache.root) if cache else None}, show_progress, cache)
    print_summary(out, final)
    return out, history


def print_summary(out: Path, final: dict[str, Any]) -> None:
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    shown = {k: round(v, 4) for k, v in final.items() if k in ("step", "loss", "act", "gen", "rec", "img", "tokens_per_s")}
    print(f"final train metrics: {shown}")
    print("retrieval: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in metrics.items() if k.startswith("test")))
