"""Shared fixtures: one local Ray cluster per session, tiny prepared data, tiny model, a loopback S3 server."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s by default, and a run's end, a reported checkpoint and a
# dead worker are each noticed at a poll, and the suite trains about ten runs.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
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


S3_BUCKET = "karma-test"


@pytest.fixture(scope="session")
def s3_env(tmp_path_factory):
    """The standard AWS_* variables naming this session's S3-compatible server on loopback (`s3_server`
    starts it on first use), set before the session's Ray starts: its workers and replicas read storage
    settings from their own environment, as on a real node. KARMA_ARTIFACT_CACHE: the head's artifact copies."""
    from karma_ray.serve.harness import free_port

    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "karma-test",
           "AWS_SECRET_ACCESS_KEY": "karma-test-secret", "AWS_REGION": "us-east-1",
           "KARMA_ARTIFACT_CACHE": str(tmp_path_factory.mktemp("artifact-cache-head"))}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"]}
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3_server(s3_env, tmp_path_factory):
    """moto's S3 server (a real HTTP S3 endpoint, in memory) on the port `s3_env` names, with one bucket.
    Yields "s3://<bucket>"; stopped by its pid at the end of the session."""
    import boto3

    log = tmp_path_factory.mktemp("moto") / "server.log"
    port = s3_env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], region_name=s3_env["AWS_REGION"])
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                client.create_bucket(Bucket=S3_BUCKET)
                break
            except Exception:  # noqa: BLE001 — connection refused until the server listens
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto S3 server did not start; see {log}:\n{log.read_text()[-2000:]}")
                time.sleep(0.2)
        yield f"s3://{S3_BUCKET}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def ray_cluster(ray_metrics_port, s3_env):
    """One local Ray for the whole session (4 logical CPUs so Train + Data + Serve can co-schedule).

    It is a real head: `ray start --address <its GCS address>` joins another node to it (the two-node test)."""
    import ray

    from karma_ray.runtime import ensure_ray

    ensure_ray(num_cpus=4, metrics_port=ray_metrics_port, log_to_driver=False, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_run_cfg(tiny_cfg):
    """The config of `tiny_run`. lr=1e-2: the tiny random model's tied LM head is frozen and near-uniform
    (L_gen ≈ ln V), so at the preset's 1e-3 ten steps move L_gen by ~0.04 nats, the size of the batch-to-batch
    noise."""
    return tiny_cfg.with_overrides(["train.num_workers=2", "train.max_steps=10", "train.log_every=2",
                                    "train.checkpoint_every=5", "train.batch_size=4", "train.probe_every=4",
                                    "train.lr=1e-2"])


TINY_RUN = "tiny-ddp"  # tiny_run's run name: its checkpoints live under <storage_path>/tiny-ddp


@pytest.fixture(scope="session")
def tiny_run(ray_cluster, tiny_run_cfg):
    """One real 2-worker DDP training run (gloo) → artifact; shared by every test that needs one.

    Returns (artifact_dir, reports) where reports are the rank-0 `ray.train.report` dicts.
    """
    from karma_ray.train.run import run_with_history

    return run_with_history(tiny_run_cfg, run_name=TINY_RUN, show_progress=False)


@pytest.fixture(scope="session")
def tiny_run_dir(tiny_run, tiny_run_cfg) -> Path:
    """Ray Train's directory of `tiny_run` (its checkpoints): the killed-worker drill's unbroken run."""
    return Path(tiny_run_cfg.train.storage_path) / TINY_RUN


@pytest.fixture(scope="session")
def tiny_artifact(tiny_run) -> Path:
    return tiny_run[0]
