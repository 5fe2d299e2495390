"""A killed `jobs/train.py` driver, then `jobs/train.py --resume RUN`: the run continues from its latest
checkpoint with the config it was started with (Ray Train V2 resumes a run started again under the
same storage path and name). Both drivers join the session's Ray by address.

The resumed driver writes to a file, as under `ray job submit` or CI: its progress must be one plain line
per log step (with the loss parts, tokens/s and an ETA), never a redraw per update. No wall-clock assertions.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from karma_ray.progress import LOG_LINES_PER_BAR

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]
RUN = "driver-resume"
MAX_STEPS, LOG_EVERY = 12, 2


def _checkpoints(run_dir: Path) -> list:
    try:
        return json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


@pytest.fixture(scope="module")
def resumed(ray_cluster, tiny_data, tmp_path_factory) -> tuple[Path, str]:
    """(artifacts dir, the resumed driver's whole stdout+stderr) of a run whose first driver was killed."""
    tmp_path = tmp_path_factory.mktemp("resume")
    address = ray_cluster.get_runtime_context().gcs_address
    storage, artifacts = tmp_path / "runs", tmp_path / "artifacts"
    common = ["--storage-path", str(storage), "--address", address]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    first = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "jobs" / "train.py"), "--preset", "tiny", "--data", str(tiny_data),
         "--set", "data.image_dim=8", "--set", "model.image_dim=8", "--max-steps", str(MAX_STEPS),
         "--set", "train.checkpoint_every=4", "--set", f"train.log_every={LOG_EVERY}", "--artifacts-dir", str(artifacts),
         "--run-name", RUN, "--no-progress", *common], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    deadline = time.time() + 420
    while time.time() < deadline and not _checkpoints(storage / RUN) and first.poll() is None:
        time.sleep(0.2)
    assert _checkpoints(storage / RUN), "the first driver registered no checkpoint"
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert not (artifacts / RUN).exists()  # it died before exporting
    log = tmp_path / "resume.log"
    with log.open("w") as out:  # a file, not a terminal: progress as log lines
        second = subprocess.run([sys.executable, str(REPO_ROOT / "jobs" / "train.py"), "--resume", RUN, *common],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=600)
    assert second.returncode == 0, log.read_text()[-4000:]
    return artifacts, log.read_text()


def test_a_killed_driver_is_resumed_from_its_latest_checkpoint(resumed):
    artifacts, _ = resumed
    manifest = json.loads((artifacts / RUN / "manifest.json").read_text())  # the run's own config: its artifacts dir
    history = manifest["metrics"]["train_history"]
    assert history[-1]["step"] == MAX_STEPS
    assert min(r["resumed_from_step"] for r in history if r["resumed_from_step"] >= 0) >= 4


def progress_lines(text: str, desc: str) -> list[str]:
    """Lines of one bar; splitlines also splits on the \\r of a terminal-style redraw, so those count too."""
    return [line for line in text.splitlines() if line.startswith(f"{desc}:")]


def test_training_writes_one_line_per_log_step(resumed):
    lines = progress_lines(resumed[1], f"train {RUN}")
    assert 2 <= len(lines) <= MAX_STEPS // LOG_EVERY + 2, "\n".join(lines)  # + the first line and the final one
    last = lines[-1]
    assert f"{MAX_STEPS}/{MAX_STEPS} step" in last, last
    for part in ("loss=", "act=", "gen=", "rec=", "tok/s=", "ETA"):
        assert part in last, (part, last)


def test_item_embedding_writes_a_bounded_number_of_lines(resumed):
    lines = progress_lines(resumed[1], "embed items")
    assert 1 <= len(lines) <= LOG_LINES_PER_BAR + 2, "\n".join(lines)


def test_ray_train_does_not_log_every_report(resumed):
    """Each report's numbers are already in the progress line; Ray Train's INFO line per report is off."""
    assert "Reporting training result" not in resumed[1]
