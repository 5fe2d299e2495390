"""Build and run the Ray Train `TorchTrainer` (Train V2), with progress on the driver.

Workers report through `ray.train.report`; a controller-side `UserCallback` forwards each report to
a tiny `ProgressTracker` actor, which the driver polls to advance `karma_ray.progress.progress_bar`
(a live bar on a terminal, one line per log step in a job log). Distribution lives here and in the
loop, never in the model.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchConfig, TorchTrainer

from karma_ray.artifact import storage
from karma_ray.config import KarmaConfig
from karma_ray.data.pipeline import build_train_dataset
from karma_ray.progress import progress_bar
from karma_ray.train.loop import train_loop_per_worker


@ray.remote(num_cpus=0)
class ProgressTracker:
    """Holds the latest rank-0 metrics so the driver can show them."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []

    def update(self, metrics: dict[str, Any]) -> None:
        self.latest = metrics
        self.history.append(metrics)

    def get(self) -> dict[str, Any]:
        return self.latest

    def get_history(self) -> list[dict[str, Any]]:
        return self.history


class ProgressCallback(UserCallback):
    def __init__(self, tracker) -> None:
        self.tracker = tracker

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if metrics:
            self.tracker.update.remote(metrics[0])


def scaling_config(cfg: KarmaConfig) -> ScalingConfig:
    resources = {"CPU": cfg.train.cpus_per_worker, **cfg.train.worker_resources}
    if cfg.train.use_gpu:
        resources["GPU"] = 1
    return ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources)




@ray.remote(num_cpus=0)
class RejectTally:
    """Rows the tokeniser rejected, summed over its actors: reported every log step and kept in the manifest."""

    def __init__(self) -> None:
        self.report: dict[str, Any] = {"rejected": 0, "reasons": {}, "examples": []}

    def add(self, report: dict[str, Any]) -> None:
        self.report["rejected"] += report.get("rejected", 0)
        for reason, n in report.get("reasons", {}).items():
            self.report["reasons"][reason] = self.report["reasons"].get(reason, 0) + n
        self.report["examples"] = (self.report["examples"] + report.get("examples", []))[:10]

    def total(self) -> int:
        return self.report["rejected"]

    def get(self) -> dict[str, Any]:
        return self.report


def train_dataset(cfg: KarmaConfig, cache_root: str | None, tally) -> ray.data.Dataset:
    """Cached trunk states (frozen trunk) or tokenised events, in a block order seeded by train.seed."""
    if cache_root:
        ds = ray.data.read_parquet(str(Path(cache_root) / "kind=train"), num_cpus=cfg.data.read_num_cpus)
    else:
        ds = build_train_dataset(cfg, tally)
    return ds.randomize_block_order(seed=cfg.train.seed)


def build_trainer(cfg: KarmaConfig, run_name: str, callbacks: list[UserCallback] | None = None,
                  cache_root: str | None = None, tally=None) -> TorchTrainer:
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # a seed fixes the row order
    path, filesystem = storage.ray_storage(cfg.train.storage_path)  # local dir, or s3:// from the environment
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"karma": cfg.to_dict(), "cache_root": cache_root, "reject_tally": tally},
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=run_name,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets={"train": train_dataset(cfg, cache_root, tally)},
    )


def fit(cfg: KarmaConfig, run_name: str, show_progress: bool = True, cache_root: str | None = None,
        tally=None) -> tuple[ray.train.Result, list[dict[str, Any]]]:
    """Run training to completion; returns the Result and every rank-0 report (for plots/manifests)."""
    tracker = ProgressTracker.remote()
    trainer = build_trainer(cfg, run_name, callbacks=[ProgressCallback(tracker)], cache_root=cache_root, tally=tally)
    box: dict[str, Any] = {}

    def _fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # re-raised on the driver thread below
            box["error"] = e

    thread = threading.Thread(target=_fit, daemon=True)
    thread.start()
    bar = progress_bar(total=cfg.train.max_steps, desc=f"train {run_name}", unit="step", enabled=show_progress,
                       log_every=cfg.train.log_every)
    while thread.is_alive():
        thread.join(timeout=0.5)
        m = ray.get(tracker.get.remote())
        if m:
            bar.set_postfix(progress_postfix(m), refresh=False)
        bar.update(int(m.get("step", bar.n)) - bar.n)  # 0 between reports: a terminal bar still ticks
    bar.close()
    history = ray.get(tracker.get_history.remote())
    ray.kill(tracker)
    if "error" in box:
        raise box["error"]
    result = box["result"]
    if result.error:
        raise result.error
    return result, history


def progress_postfix(metrics: dict[str, Any]) -> dict[str, str]:
    """The loss parts and throughput of one report, as the bar's postfix."""
    shown = {k: f"{metrics[k]:.3f}" for k in ("loss", "act", "gen", "rec") if k in metrics}
    if "tokens_per_s" in metrics:
        shown["tok/s"] = f"{metrics['tokens_per_s']:.0f}"
    return shown


def run_name_for(cfg: KarmaConfig) -> str:
    return f"{cfg.train.name}-{time.strftime('%Y%m%d-%H%M%S')}"
