"""Real Ray Train runs on the session's local cluster: DDP on CPU, artifact contract, fault tolerance."""
from __future__ import annotations

import json
import math

import faiss
import numpy as np
import pytest

from karma_ray.allocator import fast_allocator_env
from karma_ray.artifact.layout import REQUIRED_FILES
from karma_ray.artifact.reader import load_artifact

pytestmark = pytest.mark.integration


def test_ddp_two_workers_report_each_loss_and_they_fall(tiny_run):
    _, reports = tiny_run
    assert reports and all(r["world_size"] == 2 for r in reports)
    assert reports[0]["malloc"] == ("tcmalloc" if fast_allocator_env() else "system")  # named in every worker's env
    assert reports[0]["gen_step0"] > 0 and "act_step0" in reports[0]  # every loss before the first update
    assert reports[0]["spent_startup_model_s"] > 0 and reports[0]["spent_startup_readout_s"] > 0
    assert any(r.get("spent_report_s", 0) > 0 for r in reports[1:])  # the checkpoint of the report before
    for key in ("loss", "act", "gen", "rec", "img", "tokens_per_s", "data_wait_frac"):
        assert all(math.isfinite(r[key]) for r in reports), key
    first, last = reports[0], reports[-1]
    assert last["step"] == 10
    for key in ("loss", "gen", "rec"):  # against the losses before the first update, where the loop has them
        start = first.get(f"{key}_step0", first[key])
        assert last[key] < start, (key, start, last[key])


def test_ddp_reduces_only_the_trainable_parameters(tiny_run):
    """trainable_layers=1 of 2: DDP all-reduces exactly the trainable bytes, far fewer than the model's."""
    first = tiny_run[1][0]
    assert first["ddp_reduced_bytes"] == first["trainable_param_bytes"] < 0.8 * first["param_bytes"]


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
    assert manifest["metrics"]["rejected_rows"]["rejected"] == 0


def test_artifact_stores_only_what_training_changed_and_checks_the_backbone(tiny_artifact, tmp_path):
    """The frozen trunk is not in the artifact; loading rebuilds it from its source and checks its hash."""
    import shutil

    from safetensors.torch import load_file

    stored = load_file(str(tiny_artifact / "encoder" / "lm.safetensors"))
    assert stored and all(".layers.1." in k or k.endswith("model.norm.weight") for k in stored)  # the top layer
    meta = json.loads((tiny_artifact / "karma_model.json").read_text())
    assert len(meta["backbone"]["frozen_sha256"]) == 64
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_artifact, tampered)
    meta["backbone"]["frozen_sha256"] = "0" * 64
    (tampered / "karma_model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="differs from the one this artifact was trained on"):
        load_artifact(tampered)


def test_artifact_loads_without_pickle_and_its_index_agrees_with_the_embeddings(tiny_artifact):
    art = load_artifact(tiny_artifact)
    ids = art.items.column("item_id").to_numpy()
    assert art.item_emb.shape == (len(ids), art.config.model.emb_dim) and (np.diff(ids) > 0).all()
    assert np.allclose(np.linalg.norm(art.item_emb, axis=1), 1.0, atol=1e-4)
    scores, found = art.index.search(art.item_emb[:5], 1)
    assert (found[:, 0] == ids[:5]).all()  # an item's nearest neighbour is itself
    assert isinstance(art.index, faiss.Index)


def test_item_embeddings_exported_from_the_cache_are_what_the_full_depth_model_computes(tiny_artifact):
    """A cached run's export embeds the catalogue from the cached trunk states (only the top runs); serving
    and refresh embed from text at full depth. Both must give the same e_i."""
    from karma_ray.models.inference import embed_items

    art = load_artifact(tiny_artifact)
    ids = art.items.column("item_id").to_numpy()
    full_depth = embed_items(art.model, art.builder, ids, show_progress=False)
    np.testing.assert_allclose(art.item_emb, full_depth, atol=1e-4)


def test_killed_worker_resumes_with_data_order_and_rng_and_ends_where_an_unbroken_run_does(tiny_run_dir, tiny_run_cfg,
                                                                                           tmp_path):
    """SIGKILL both DDP workers after their first checkpoint; Ray Train restarts them from that checkpoint
    (weights, optimiser, RNG, position in the seeded data order). The session's `tiny_run`, the same config
    without a kill, must end at the same place: the resumed run replays exactly the batches and updates the
    lost steps made. The tolerance (1e-3 on the loss, one hit in the HR@10 count) only absorbs float
    summation order."""
    from karma_ray.train.faults import resume_drill

    cfg = tiny_run_cfg.with_overrides(["train.max_failures=2"])
    drill = resume_drill(cfg, tmp_path, unbroken_run=tiny_run_dir)
    assert len(drill.killed_pids) == 2 and drill.error is None and drill.final_step == 10
    assert drill.resumed_from_step and drill.resumed_from_step[0] == 5  # from its checkpoint, not from 0
    assert drill.loss_delta < 1e-3
    assert drill.hr10_delta <= 1 / drill.n_valid + 1e-9


def test_a_run_with_rejected_rows_finishes_and_reports_them(ray_cluster, tiny_cfg, tmp_path):
    """Bad rows in the training parquet are dropped by the tokeniser (full fine-tuning reads tokens, not the
    cache): the run must not wait for rows that never come, and the counts reach the reports and manifest."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from karma_ray.train.run import run_with_history

    data = tmp_path / "data"
    shutil.copytree(tiny_cfg.data_dir, data / "cold")
    part = sorted((data / "cold" / "train").glob("*.parquet"))[0]
    t = pq.read_table(part)
    bad = t.slice(0, 40).set_column(t.schema.get_field_index("target"), "target", pa.array([10**9] * 40, pa.int64()))
    pq.write_table(pa.concat_tables([bad, t]), part)
    cfg = tiny_cfg.with_overrides([f"data.path={data}", "model.trainable_layers=0", "train.max_steps=6",
                                   f"train.storage_path={tmp_path / 'runs'}", f"train.artifacts_dir={tmp_path / 'art'}"])
    art, reports = run_with_history(cfg, run_name="bad-rows", show_progress=False)
    assert reports[-1]["step"] == 6 and reports[-1]["rejected_rows"] >= 40
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["metrics"]["rejected_rows"]["reasons"] == {"unknown_target": 40}
    assert manifest["metrics"]["rejected_rows"]["examples"]


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
    for split in ("valid", "test", "valid_cold", "test_cold"):
        r = metrics["splits"][split]
        assert r["n"] == 30 and 0.0 <= r["hr@10"] <= r["hr@50"] <= r["hr@200"] <= 1.0
        assert r["hr@50_ci95"][0] <= r["hr@50"] <= r["hr@50_ci95"][1]
    assert set(metrics["prior"]["alpha"]) == set(metrics["splits"])  # α chosen on validation, per split family
    att = metrics["attention"]
    assert len(att["sink_rate_per_layer"]) == 1 and att["n_prompts"] == 8  # the one trainable layer
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
        f"data.path={tmp_path / 'demo'}", "model.backbone=tiny", "model.trainable_layers=1", "model.trunk_dtype=fp32",
        "model.emb_dim=32", "model.tiny_hidden=64", "train.max_steps=3", "train.checkpoint_every=3", "train.warmup_steps=1",
        "train.log_every=1", f"train.storage_path={tmp_path / 'runs'}", f"train.artifacts_dir={tmp_path / 'artifacts'}"])
    art = run(cfg, run_name="demo-tiny", show_progress=False)
    assert main(["--artifact", str(art), "--max-events", "20", "--probe-prompts", "4", "--fidelity-samples", "4",
                 "--bootstrap", "20", "--set", "eval.fidelity_fit_steps=5", "--no-progress"]) == 0
    metrics = json.loads((art / "eval" / "metrics.json").read_text())
    assert metrics["splits"]["test"]["n"] == 20 and metrics["summary"]["hr@200"] is not None
    assert (art / "eval" / "report.md").exists() and (art / "eval" / "hr_at_k.png").exists()


def test_evaluate_job_names_a_missing_artifact(tmp_path, capsys):
    from jobs.evaluate import main

    assert main(["--artifact", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_quality_library_runs_every_arm_and_pairs_karma_with_action_only(ray_cluster, tiny_cfg, tmp_path):
    """What benchmarks/quality.py runs, on the tiny model: every kind of arm through the library, then the
    merge. gen_only and recon_only are KARMA with one λ set to 0 (arm_config, checked here without training)."""
    from karma_ray.cache.build import ensure_cache
    from karma_ray.eval.quality import ARMS, Context, arm_config, merge, run_arm

    for arm, (gen, rec) in {"gen_only": (0.5, 0.0), "recon_only": (0.0, 0.5), "action_only": (0.0, 0.0)}.items():
        lam = arm_config(tiny_cfg.with_overrides(["loss.lambda_gen=0.5", "loss.lambda_rec=0.5"]), arm, 3).loss
        assert (lam.lambda_gen, lam.lambda_rec) == (gen, rec), arm
    arms = tuple(a for a in ARMS if a not in ("gen_only", "recon_only"))

    cfg = tiny_cfg.with_overrides([
        "train.max_steps=4", "train.checkpoint_every=4", "train.log_every=2", "train.valid_every=2",
        "eval.max_events=30", "eval.max_cold_events=30", "eval.probe_prompts=8", "eval.fidelity_samples=4",
        "eval.fidelity_fit_steps=2", "eval.n_boot=50", "baselines.sasrec_max_epochs=2",
        f"train.storage_path={tmp_path / 'runs'}", f"train.artifacts_dir={tmp_path / 'art'}"])
    ctx = Context.create(cfg, ensure_cache(cfg, progress=False))
    parts = [{"arm": arm, "seed": 0, "metrics": run_arm(ctx, arm, 0, log=lambda *_: None)} for arm in arms]
    result = merge(parts, ctx, {"steps": 4})  # pairing over several seeds: tests/unit/test_quality_merge.py
    assert list(result["arms"]) == list(arms) and result["protocol"] == "cold"
    keys = {"hr@10", "hr@50", "hr@200", "ndcg@10", "hr@10_cold", "hr@50_cold", "sink_rate", "int_attn_entropy",
            "int_attn_top1", "fidelity_f1", "effective_rank", "valid"}
    for arm, row in result["arms"].items():
        assert keys <= set(row), arm
        assert {"hr@50", "hr@50_cold"} <= set(row["valid"])
    assert result["arms"]["popularity"]["sink_rate"] is None
    for arm in ("frozen", "action_only", "karma"):  # every LM arm gets the fair (refit P) fidelity
        assert result["arms"][arm]["fidelity_f1"] is not None
    pair = result["paired"]["karma-action_only"]
    assert pair["seeds"] == [0] and pair["hr@50"]["ci"][0] <= pair["hr@50"]["diff"] <= pair["hr@50"]["ci"][1]
    assert pair["hr@50_cold"]["n_clusters"] < pair["hr@50_cold"]["n_events"]  # cold CIs resample items
    karma = result["details"]["karma"]["0"]
    assert karma["learning_curve"][0]["rows_seen"] == 0 and len(karma["learning_curve"]) >= 2
    frozen = result["details"]["frozen"]["0"]
    assert result["budget"]["l_gen_step0"] > 0 and frozen["readout"] in ("mean", "token")
    assert set(frozen["readout_valid"]) == {"mean", "token"} and set(frozen["readout_valid"]["mean"]) == {"hr@10", "hr@50", "hr@200"}


def test_fsdp_two_workers_shard_the_model_train_and_export(ray_cluster, tiny_cfg, tmp_path):
    """train.strategy=fsdp (FSDP2 over gloo): two workers shard every layer, step, checkpoint the whole
    trainable state, and the export loads it."""
    from karma_ray.train.run import run_with_history

    cfg = tiny_cfg.with_overrides(["train.strategy=fsdp", "train.num_workers=2", "train.max_steps=3",
                                   "train.checkpoint_every=3", "train.log_every=1", "train.probe_every=0",
                                   f"train.storage_path={tmp_path / 'runs'}", f"train.artifacts_dir={tmp_path / 'art'}"])
    art, reports = run_with_history(cfg, run_name="fsdp", show_progress=False)
    assert [r["step"] for r in reports] == [1, 2, 3] and all(r["world_size"] == 2 for r in reports)
    assert all(math.isfinite(r["loss"]) for r in reports)
    loaded = load_artifact(art)
    assert loaded.item_emb.shape[0] == len(loaded.catalog)
