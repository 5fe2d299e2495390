"""`jobs/train.py` writing to a file, as under `ray job submit` or CI: progress is one plain line per
log step (with the loss parts, tokens/s and an ETA), never a redraw per update.

The entry point runs in a subprocess (its output really is a file, not a terminal) and joins the
session's Ray by address instead of starting a second one. No wall-clock assertions.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from karma_ray.progress import LOG_LINES_PER_BAR

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS, LOG_EVERY = 6, 2
RUN_NAME = "progress-log"


@pytest.fixture(scope="module")
def train_log(ray_cluster, tiny_data, tmp_path_factory) -> str:
    """The whole stdout+stderr of one tiny `jobs/train.py` run, written to a file."""
    root = tmp_path_factory.mktemp("progress")
    cmd = [sys.executable, str(REPO_ROOT / "jobs" / "train.py"), "--preset", "tiny", "--data", str(tiny_data),
           "--set", "data.image_dim=8", "--set", "model.image_dim=8", "--num-workers", "1",
           "--max-steps", str(MAX_STEPS), "--set", f"train.log_every={LOG_EVERY}",
           "--set", f"train.checkpoint_every={MAX_STEPS}", "--storage-path", str(root / "runs"),
           "--artifacts-dir", str(root / "artifacts"), "--run-name", RUN_NAME,
           "--address", ray_cluster.get_runtime_context().gcs_address]
    log = root / "train.log"
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT, timeout=600,
                              env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def progress_lines(text: str, desc: str) -> list[str]:
    """Lines of one bar; splitlines also splits on the \\r of a terminal-style redraw, so those count too."""
    return [line for line in text.splitlines() if line.startswith(f"{desc}:")]


def test_training_writes_one_line_per_log_step(train_log):
    lines = progress_lines(train_log, f"train {RUN_NAME}")
    assert 2 <= len(lines) <= MAX_STEPS // LOG_EVERY + 2, "\n".join(lines)  # + the 0/N line and the final one
    last = lines[-1]
    assert f"{MAX_STEPS}/{MAX_STEPS} step" in last, last
    for part in ("loss=", "act=", "gen=", "rec=", "tok/s=", "ETA"):
        assert part in last, (part, last)


def test_item_embedding_writes_a_bounded_number_of_lines(train_log):
    lines = progress_lines(train_log, "embed items")
    assert 1 <= len(lines) <= LOG_LINES_PER_BAR + 2, "\n".join(lines)


def test_ray_train_does_not_log_every_report(train_log):
    """Each report's numbers are already in the progress line; Ray Train's INFO line per report is off."""
    assert "Reporting training result" not in train_log
