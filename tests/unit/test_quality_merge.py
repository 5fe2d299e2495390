"""The quality benchmark's merge on constructed parts: KARMA − action-only is paired by seed and event,
its CI resamples seeds and clusters, and the per-arm row averages seeds and records their spread."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from karma_ray.eval.quality import aggregate, paired, train_time


def _part(test_ranks, cold_ranks, hr50):
    return {"ranks": {"test": test_ranks, "test_cold": cold_ranks},
            "summary": {"hr@10": 0.1, "hr@50": hr50, "hr@50_cold": 0.2}, "training_rows": 64}


def test_paired_difference_pairs_each_seed_with_its_own_seed():
    # 4 test events (one cluster each); 4 cold events on 2 items (clusters 7, 7, 9, 9)
    splits = {"test": SimpleNamespace(clusters=np.arange(4)), "test_cold": SimpleNamespace(clusters=np.array([7, 7, 9, 9]))}
    raw = {"karma": {0: _part([1, 1, 0, 300], [5, 0, 0, 0], 0.5), 1: _part([1, 60, 2, 3], [5, 5, 0, 0], 0.75)},
           "action_only": {0: _part([0, 1, 0, 300], [0, 0, 0, 0], 0.25), 1: _part([1, 60, 2, 0], [5, 0, 0, 0], 0.5)}}
    row = paired(raw, splits, n_boot=200, seed=0)["karma-action_only"]
    assert row["seeds"] == [0, 1]
    hr50 = row["hr@50"]
    # seed 0: hits 1,1,0,0 vs 0,1,0,0 -> +1 on event 0; seed 1: 1,0,1,1 vs 1,0,1,0 -> +1 on event 3
    assert hr50["diff"] == 2 / 8 and hr50["n_seeds"] == 2 and hr50["n_events"] == 4
    assert hr50["ci"][0] <= hr50["diff"] <= hr50["ci"][1]
    cold = row["hr@50_cold"]
    assert cold["diff"] == 2 / 8 and cold["n_clusters"] == 2 < cold["n_events"]


def test_paired_difference_uses_only_seeds_both_arms_ran():
    splits = {"test": SimpleNamespace(clusters=np.arange(2))}
    raw = {"karma": {0: {"ranks": {"test": [1, 0]}}, 2: {"ranks": {"test": [1, 1]}}},
           "action_only": {0: {"ranks": {"test": [0, 0]}}, 1: {"ranks": {"test": [1, 1]}}}}
    row = paired(raw, splits, n_boot=50, seed=0)["karma-action_only"]
    assert row["seeds"] == [0] and row["hr@50"]["diff"] == 0.5


def test_aggregate_averages_seeds_and_records_their_spread():
    row = aggregate({0: _part([], [], 0.5), 1: _part([], [], 0.75)})
    assert row["hr@50"] == 0.625 and row["spread"]["hr@50"] == 0.25 and set(row["seeds"]) == {"0", "1"}
    assert row["training_rows"] == 64


def test_train_time_splits_an_arms_seconds_into_steps_loop_and_the_rest():
    # reports at steps 25 and 50; the second interval carries a validation pass (step_s well above optim_step_s)
    history = [{"step": 25, "step_s": 1.0, "optim_step_s": 0.8, "spent_startup_model_s": 2.0, "spent_valid_s": 3.0},
               {"valid_hr@50_step0": 0.1},
               {"step": 50, "step_s": 2.0, "optim_step_s": 0.8, "spent_valid_s": 4.5, "spent_report_s": 0.25}]
    assert train_time(history, train_s=100.0) == {
        "optimizer_steps_s": 40.0, "loop_s": 75.0, "outside_loop_s": 25.0,
        "worker_phases_s": {"report": 0.2, "startup_model": 2.0, "valid": 7.5}}
