"""Fault drills for training: kill the train workers mid-run and compare with an unbroken run.

The test suite and `benchmarks/reliability.py` (its `resume` section) both call `resume_drill`, so the
figure in the results and the assertion in the tests come from the same code path.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from karma_ray.config import KarmaConfig


def registered_checkpoints(run_dir: Path) -> list[dict]:
    """Checkpoints the Train controller has registered (a directory on disk alone may not be yet)."""
    snapshot = Path(run_dir) / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snapshot.read_text())["checkpoint_results"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


def train_worker_pids() -> list[int]:
    """Train workers of the cluster this process started: its descendants named RayTrainWorker.

    Only descendants, so that a drill never touches another user's Ray on the same machine."""
    return [p.pid for p in psutil.Process().children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline())]


def checkpoint_valid_hr(cfg: KarmaConfig, checkpoint, k: int = 10) -> float:
    """Validation HR@k of a training checkpoint, at full depth from token ids (no cache)."""
    from safetensors.torch import load_file

    from karma_ray.data.catalog import ItemCatalog
    from karma_ray.data.events import load_items
    from karma_ray.data.prompts import PromptBuilder
    from karma_ray.eval.evaluate import SplitEvents, embedding_scores, split_ranks
    from karma_ray.eval.stats import hits_at
    from karma_ray.models.inference import embed_interests, embed_items
    from karma_ray.models.karma import build_model

    model, tok = build_model(cfg.model, cfg.loss)
    with checkpoint.as_directory() as d:
        model.load_trainable_state(load_file(str(Path(d) / "model.safetensors")), d)
    catalog = ItemCatalog(load_items(cfg.data_dir, cfg.model.image_dim))
    builder = PromptBuilder(tok, catalog, cfg.data, cfg.model.image_dim)
    split = SplitEvents.load(cfg.data_dir, "valid", cfg.eval)
    h = {"valid": embed_interests(model, builder, [q or "" for q in split.events["query"].to_pylist()], split.histories)}
    e = embed_items(model, builder, catalog.ids, show_progress=False)
    return float(hits_at(split_ranks(split, catalog.ids, embedding_scores(h, e)("valid")), k).mean())


@dataclass(kw_only=True)
class ResumeDrill:
    """An unbroken run and the same-seed run whose workers were SIGKILLed after its first checkpoint."""

    killed_pids: list[int]
    resumed_from_step: list[int]  # every restart's starting step (>= 0), in order
    final_step: int
    error: str | None
    loss_unbroken: float
    loss_resumed: float
    hr10_unbroken: float
    hr10_resumed: float
    n_valid: int
    seconds: float

    @property
    def loss_delta(self) -> float:
        return abs(self.loss_resumed - self.loss_unbroken)

    @property
    def hr10_delta(self) -> float:
        return abs(self.hr10_resumed - self.hr10_unbroken)

    def summary(self) -> dict[str, Any]:
        return {"loss_delta": self.loss_delta, "hr@10_delta": self.hr10_delta, "killed_workers": len(self.killed_pids),
                "resumed_from_step": self.resumed_from_step, "final_step": self.final_step, "error": self.error,
                "loss": {"unbroken": self.loss_unbroken, "resumed": self.loss_resumed},
                "hr@10": {"unbroken": self.hr10_unbroken, "resumed": self.hr10_resumed}, "n_valid": self.n_valid,
                "seconds": round(self.seconds, 1)}


def resume_drill(cfg: KarmaConfig, storage: Path, timeout_s: float = 500.0,
                 unbroken_run: Path | None = None) -> ResumeDrill:
    """Train `cfg` with every train worker SIGKILLed as soon as its first checkpoint is registered, and
    compare its end with the same config's unbroken run. Ray Train restarts the workers from that checkpoint
    (weights, optimiser, RNG, position in the seeded data order), so both runs must end at the same place;
    what differs is float summation order only. Needs `train.max_failures >= 1` and a running Ray.

    The unbroken run is trained here under `storage`, or is `unbroken_run`: the directory of a finished run
    of this very config (max_failures aside), e.g. one a test session trained already. Both train from the
    trunk cache when the config has one, as `jobs/train.py` does.
    """
    from ray.train import Checkpoint

    from karma_ray.train.trainer import fit

    if cfg.train.max_failures < 1:
        raise ValueError("resume_drill needs train.max_failures >= 1 (a killed run could not restart)")
    t0 = time.time()
    cfg = cfg.with_overrides([f"train.storage_path={storage}"])
    cache_root = None
    if cfg.model.trainable_layers:
        from karma_ray.cache.build import ensure_cache

        cache_root = str(ensure_cache(cfg, progress=False).root)
    if unbroken_run is None:
        plain, plain_reports = fit(cfg, "unbroken", show_progress=False, cache_root=cache_root)
        loss_unbroken, plain_ckpt = plain_reports[-1]["loss"], plain.checkpoint
    else:
        done = registered_checkpoints(unbroken_run)
        if not done:
            raise ValueError(f"{unbroken_run} holds no registered checkpoint of a finished run")
        loss_unbroken = done[-1]["metrics"]["loss"]
        plain_ckpt = Checkpoint.from_directory(str(Path(unbroken_run) / done[-1]["checkpoint_dir_name"]))
    box: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: box.update(out=fit(cfg, "fault", show_progress=False, cache_root=cache_root)),
                              daemon=True)
    thread.start()
    deadline = time.time() + timeout_s
    while time.time() < deadline and not registered_checkpoints(Path(storage) / "fault"):
        time.sleep(0.1)
    if not registered_checkpoints(Path(storage) / "fault"):
        raise TimeoutError(f"no checkpoint registered under {storage}/fault within {timeout_s:.0f}s")
    killed = train_worker_pids()
    if not killed:
        raise RuntimeError("no RayTrainWorker process among this process's descendants")
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    thread.join(timeout=timeout_s)
    if thread.is_alive() or "out" not in box:
        raise TimeoutError(f"the killed run did not finish within {timeout_s:.0f}s")
    result, reports = box["out"]
    from karma_ray.eval.evaluate import SplitEvents

    return ResumeDrill(
        killed_pids=killed, resumed_from_step=[r["resumed_from_step"] for r in reports if r["resumed_from_step"] >= 0],
        final_step=reports[-1]["step"], error=None if result.error is None else str(result.error),
        loss_unbroken=loss_unbroken, loss_resumed=reports[-1]["loss"],
        hr10_unbroken=checkpoint_valid_hr(cfg, plain_ckpt), hr10_resumed=checkpoint_valid_hr(cfg, result.checkpoint),
        n_valid=len(SplitEvents.load(cfg.data_dir, "valid", cfg.eval).targets), seconds=time.time() - t0)
