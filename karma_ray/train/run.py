"""End-to-end training run: connect Ray → ensure data → fit → export artifact → print a summary."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from karma_ray.config import KarmaConfig
from karma_ray.runtime import ensure_ray
from karma_ray.train.trainer import fit, run_name_for

log = logging.getLogger(__name__)


def ensure_data(cfg: KarmaConfig) -> None:
    """Prepare the preset's dataset on first use, so `python jobs/train.py` needs no other step."""
    if (Path(cfg.data.path) / "meta.json").exists():
        return
    from karma_ray.data.prepare import prepare_dataset

    log.warning("no prepared data at %s; preparing %s now", cfg.data.path, cfg.data.dataset)
    prepare_dataset(cfg.data.dataset, cfg.data.path, n_items=cfg.data.n_items, n_users=cfg.data.n_users,
                    image_dim=cfg.data.image_dim, cold_frac=cfg.data.cold_frac, seed=cfg.data.seed)


def run(cfg: KarmaConfig, address: str | None = None, run_name: str | None = None, show_progress: bool = True) -> Path:
    """Train, export, and return the artifact directory."""
    return run_with_history(cfg, address, run_name, show_progress)[0]


def run_with_history(cfg: KarmaConfig, address: str | None = None, run_name: str | None = None,
                     show_progress: bool = True) -> tuple[Path, list[dict[str, Any]]]:
    """Like `run`, also returning every rank-0 report (tests and benchmarks plot/inspect them)."""
    from karma_ray.train.export import export_artifact

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ensure_data(cfg)
    ensure_ray(address)
    name = run_name or run_name_for(cfg)
    result, history = fit(cfg, name, show_progress)
    if result.checkpoint is None:
        raise RuntimeError(f"run {name} finished without a checkpoint")
    final = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    with result.checkpoint.as_directory() as ckpt:
        out = export_artifact(cfg, ckpt, name, {"train": final, "train_history": history}, show_progress)
    print_summary(out, final)
    return out, history


def print_summary(out: Path, final: dict[str, Any]) -> None:
    import json

    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    shown = {k: round(v, 4) for k, v in final.items() if k in ("step", "loss", "act", "gen", "rec", "img", "tokens_per_s")}
    print(f"final train metrics: {shown}")
    print("retrieval: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in metrics.items() if k.startswith("test")))
