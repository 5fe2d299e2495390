"""A killed `jobs/train.py` driver, then `jobs/train.py --resume RUN`: the run continues from its latest
checkpoint with the config it was started with (Ray Train V2 resumes a run started again under the
same storage path and name). Both drivers join the session's Ray by address."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]
RUN = "driver-resume"


def _checkpoints(run_dir: Path) -> list:
    try:
        return json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


def test_a_killed_driver_is_resumed_from_its_latest_checkpoint(ray_cluster, tiny_data, tmp_path):
    address = ray_cluster.get_runtime_context().gcs_address
    storage, artifacts = tmp_path / "runs", tmp_path / "artifacts"
    common = ["--storage-path", str(storage), "--address", address, "--no-progress"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    first = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "jobs" / "train.py"), "--preset", "tiny", "--data", str(tiny_data),
         "--set", "data.image_dim=8", "--set", "model.image_dim=8", "--max-steps", "12",
         "--set", "train.checkpoint_every=4", "--set", "train.log_every=2", "--artifacts-dir", str(artifacts),
         "--run-name", RUN, *common], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 420
    while time.time() < deadline and not _checkpoints(storage / RUN) and first.poll() is None:
        time.sleep(0.2)
    assert _checkpoints(storage / RUN), "the first driver registered no checkpoint"
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert not (artifacts / RUN).exists()  # it died before exporting
    log = tmp_path / "resume.log"
    with log.open("w") as out:
        second = subprocess.run([sys.executable, str(REPO_ROOT / "jobs" / "train.py"), "--resume", RUN, *common],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=600)
    assert second.returncode == 0, log.read_text()[-4000:]
    manifest = json.loads((artifacts / RUN / "manifest.json").read_text())  # the run's own config: its artifacts dir
    history = manifest["metrics"]["train_history"]
    assert history[-1]["step"] == 12
    assert min(r["resumed_from_step"] for r in history if r["resumed_from_step"] >= 0) >= 4
