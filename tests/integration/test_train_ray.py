"""Real Ray Train runs on the session's local cluster: DDP on CPU, artifact contract, fault tolerance."""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import psutil
import pytest

from karma_ray.artifact.layout import REQUIRED_FILES
from karma_ray.artifact.reader import load_artifact

pytestmark = pytest.mark.integration


def test_ddp_two_workers_report_each_loss_and_they_fall(tiny_run):
    _, reports = tiny_run
    assert reports and all(r["world_size"] == 2 for r in reports)
    for key in ("loss", "act", "gen", "rec", "img", "tokens_per_s", "data_wait_frac"):
        assert all(math.isfinite(r[key]) for r in reports), key
    first, last = reports[0], reports[-1]
    assert last["step"] == 10
    for key in ("loss", "gen", "rec"):
        assert last[key] < first[key], (key, first[key], last[key])


def test_artifact_has_every_file_and_a_manifest_with_metrics(tiny_artifact):
    assert (tiny_artifact.parent / "latest").resolve() == tiny_artifact.resolve()
    for name in REQUIRED_FILES:
        assert (tiny_artifact / name).exists(), name
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    assert manifest["config"]["preset"] == "tiny"
    assert manifest["data"]["data_hash"]
    assert {"loss", "act", "gen", "rec"} <= set(manifest["metrics"]["train"])
    assert 0.0 <= manifest["metrics"]["test/hr@50"] <= 1.0
    assert manifest["versions"]["torch"] and manifest["versions"]["ray"]


def test_artifact_loads_without_pickle_and_its_index_agrees_with_the_embeddings(tiny_artifact):
    art = load_artifact(tiny_artifact)
    ids = art.items.column("item_id").to_numpy()
    assert art.item_emb.shape == (len(ids), art.config.model.emb_dim)
    assert np.allclose(np.linalg.norm(art.item_emb, axis=1), 1.0, atol=1e-4)
    scores, found = art.index.search(art.item_emb[:5], 1)
    assert (found[:, 0] == ids[:5]).all()  # an item's nearest neighbour is itself
    assert isinstance(art.index, faiss.Index)


def _train_worker_pids() -> list[int]:
    """Train workers of *this* session's cluster: descendants of the test process (ray.init spawned it)."""
    return [p.pid for p in psutil.Process().children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline())]


def _registered_checkpoints(run_dir: Path) -> list[dict]:
    """Checkpoints the Train controller has registered (a dir on disk alone may not be yet)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snapshot.read_text())["checkpoint_results"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


def test_killed_worker_resumes_from_last_checkpoint_and_finishes(ray_cluster, tiny_cfg, tmp_path):
    """SIGKILL a training worker after its first checkpoint; Ray Train restarts and resumes from it."""
    from karma_ray.train.trainer import fit

    cfg = tiny_cfg.with_overrides([f"train.storage_path={tmp_path}", "train.max_steps=16", "train.log_every=2",
                                   "train.checkpoint_every=4", "train.max_failures=2"])
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(out=fit(cfg, "fault", show_progress=False)), daemon=True)
    thread.start()
    run_dir = tmp_path / "fault"
    deadline = time.time() + 240
    while time.time() < deadline and not _registered_checkpoints(run_dir):
        time.sleep(0.1)
    assert _registered_checkpoints(run_dir), "no checkpoint was registered"
    killed = _train_worker_pids()
    assert killed, "no RayTrainWorker process found"
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    thread.join(timeout=400)
    assert not thread.is_alive() and "out" in box
    result, reports = box["out"]
    assert result.error is None
    assert reports[-1]["step"] == 16
    resumed = [r["resumed_from_step"] for r in reports if r["resumed_from_step"] >= 0]
    assert resumed and resumed[0] >= 4 and resumed[0] % 4 == 0  # restarted from a checkpoint, not step 0


def test_collapse_probe_reports_sink_rate_against_the_frozen_model(tiny_run):
    """probe_every=4: steps 4, 8 and the last step carry the probe reading and the frozen baseline."""
    _, reports = tiny_run
    probed = [r for r in reports if "sink_rate" in r]
    assert [r["step"] for r in probed] == [4, 8, 10]
    for r in probed:
        assert 0.0 <= r["sink_rate"] <= 100.0 and 0.0 <= r["int_attn_entropy"] <= 1.0
        assert r["sink_rate_frozen"] == probed[0]["sink_rate_frozen"]  # measured once, before step 1
        assert r["collapse_alarm"] in (0.0, 1.0)


def test_evaluate_job_writes_metrics_report_and_plots(tiny_artifact, tmp_path):
    """jobs/evaluate.py end to end on a trained artifact (smoke: capped events)."""
    import json

    from jobs.evaluate import main

    out = tmp_path / "eval"
    assert main(["--artifact", str(tiny_artifact), "--out", str(out), "--max-events", "30", "--probe-prompts", "8",
                 "--fidelity-samples", "4", "--bootstrap", "50", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("test", "test_cold"):
        r = metrics["splits"][split]
        assert r["n"] == 30 and 0.0 <= r["hr@10"] <= r["hr@50"] <= r["hr@200"] <= 1.0
        assert r["hr@50_ci95"][0] <= r["hr@50"] <= r["hr@50_ci95"][1]
    att = metrics["attention"]
    assert len(att["sink_rate_per_layer"]) == 2 and att["n_prompts"] == 8
    assert metrics["fidelity"]["n"] == 4 and 0.0 <= metrics["fidelity"]["fidelity_f1"] <= 1.0
    assert metrics["effective_rank"] >= 1.0
    assert set(metrics["summary"]) >= {"hr@10", "hr@50_cold", "sink_rate", "int_attn_entropy", "fidelity_f1"}
    assert (out / "report.md").read_text().startswith("# Evaluation") and (out / "hr_at_k.png").stat().st_size > 0
    assert (out / "attention.png").exists()


def test_evaluate_job_on_a_demo_preset_artifact(ray_cluster, tmp_path):
    """The `demo` preset's pipeline (synthetic shop with queries) trained for 3 steps with the tiny
    backbone in place of SmolLM2, then jobs/evaluate.py on its artifact (smoke caps)."""
    import json

    from jobs.evaluate import main
    from karma_ray.config import get_preset
    from karma_ray.train.run import run

    cfg = get_preset("demo").with_overrides([
        f"data.path={tmp_path / 'demo'}", "model.backbone=tiny", "model.num_layers=null", "model.emb_dim=32",
        "model.tiny_hidden=64", "train.max_steps=3", "train.checkpoint_every=3", "train.warmup_steps=1",
        "train.log_every=1", f"train.storage_path={tmp_path / 'runs'}", f"train.artifacts_dir={tmp_path / 'artifacts'}"])
    art = run(cfg, run_name="demo-tiny", show_progress=False)
    assert main(["--artifact", str(art), "--max-events", "20", "--probe-prompts", "4", "--fidelity-samples", "4",
                 "--bootstrap", "20", "--no-progress"]) == 0
    metrics = json.loads((art / "eval" / "metrics.json").read_text())
    assert metrics["splits"]["test"]["n"] == 20 and metrics["summary"]["hr@200"] is not None
    assert (art / "eval" / "report.md").exists() and (art / "eval" / "hr_at_k.png").exists()


def test_evaluate_job_names_a_missing_artifact(tmp_path, capsys):
    from jobs.evaluate import main

    assert main(["--artifact", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_quality_benchmark_smoke_runs_every_arm(ray_cluster, tiny_cfg, tmp_path):
    """benchmarks/quality.py --smoke: all seven arms on the tiny model; the results carry the contract keys."""
    import json

    from benchmarks import quality

    out = tmp_path / "results"
    assert quality.main(["--smoke", "--seeds", "0", "--out", str(out), "--tag", "q",
                         "--set", f"data.path={tiny_cfg.data.path}", "--set", "data.image_dim=8",
                         "--set", f"train.storage_path={tmp_path / 'runs'}"]) == 0
    result = json.loads((out / "q.json").read_text())
    assert list(result["arms"]) == list(quality.ARMS)
    keys = {"hr@10", "hr@50", "hr@200", "ndcg@10", "hr@10_cold", "hr@50_cold", "sink_rate", "int_attn_entropy",
            "int_attn_top1", "fidelity_f1", "effective_rank"}
    for arm, row in result["arms"].items():
        assert keys <= set(row), arm
    assert result["arms"]["popularity"]["sink_rate"] is None and result["arms"]["frozen"]["fidelity_f1"] is None
    assert result["arms"]["karma"]["fidelity_f1"] is not None
    assert result["budget"]["steps"] == 4 and result["budget"]["seeds"] == [0]
    for png in ("q_hr_at_k.png", "q_sink.png", "q_fidelity.png"):
        assert (out / png).stat().st_size > 0
