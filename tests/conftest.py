"""Shared fixtures: one local Ray cluster per session, tiny prepared data, tiny model."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic shop with image embeddings, prepared once per session (the `cold` protocol's split
    lives in <data.path>/cold)."""
    from karma_ray.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare_dataset("synthetic", out / "cold", protocol="cold", n_items=200, n_users=60, image_dim=8, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_cfg(tiny_data, tmp_path_factory):
    """The `tiny` preset pointed at the session's data, storage and artifacts dirs."""
    from karma_ray.config import get_preset

    root = tmp_path_factory.mktemp("run")
    return get_preset("tiny").with_overrides([
        f"data.path={tiny_data}", "data.image_dim=8", "model.image_dim=8", f"train.storage_path={root / 'runs'}", f"train.artifacts_dir={root / 'artifacts'}",
    ])


@pytest.fixture(scope="session")
def ray_metrics_port() -> int:
    """The port where this session's Ray serves its Prometheus metrics (the real-scrape test reads it)."""
    from karma_ray.serve.harness import free_port

    return free_port()


@pytest.fixture(scope="session")
def ray_cluster(ray_metrics_port):
    """One local Ray for the whole session (4 logical CPUs so Train + Data + Serve can co-schedule)."""
    import ray

    from karma_ray.runtime import ensure_ray

    ensure_ray(num_cpus=4, metrics_port=ray_metrics_port, log_to_driver=False, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_run(ray_cluster, tiny_cfg):
    """One real 2-worker DDP training run (gloo) → artifact; shared by every test that needs one.

    Returns (artifact_dir, reports) where reports are the rank-0 `ray.train.report` dicts.
    lr=1e-2: the tiny random model's tied LM head is frozen and near-uniform (L_gen ≈ ln V), so at the
    preset's 1e-3 ten steps move L_gen by ~0.04 nats, the size of the batch-to-batch noise.
    """
    from karma_ray.train.run import run_with_history

    cfg = tiny_cfg.with_overrides(["train.num_workers=2", "train.max_steps=10", "train.log_every=2",
                                   "train.checkpoint_every=5", "train.batch_size=4", "train.probe_every=4",
                                   "train.lr=1e-2"])
    return run_with_history(cfg, run_name="tiny-ddp", show_progress=False)


@pytest.fixture(scope="session")
def tiny_artifact(tiny_run) -> Path:
    return tiny_run[0]
