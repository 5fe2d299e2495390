"""Full-catalogue ranking with history exclusion, the per-arm summary row, and the SASRec baseline."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from karma_ray.config import BaselinesConfig, EvalConfig
from karma_ray.eval.evaluate import exact_ranks, retrieval_report, summarize
from karma_ray.models.sasrec import SASRec, dropout, train_sasrec

ITEMS = np.array([10, 20, 30, 40, 50])


def test_exact_ranks_exclude_history_and_count_ties_against_the_target():
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5],   # target 30 is 3rd; history {10} removed → 2nd
                       [0.5, 0.5, 0.5, 0.1, 0.0],   # target 20 ties with 10 and 30 → pessimistic rank 3
                       [0.1, 0.2, 0.3, 0.4, 0.5]])  # target 99 is not in the catalogue → 0 (a miss)
    ranks = exact_ranks(scores, ITEMS, [[10], [], [50]], np.array([30, 20, 99]))
    assert ranks.tolist() == [2, 3, 0]


def test_every_earlier_click_is_excluded_however_long_the_history():
    items = np.arange(1, 201)
    scores = -items[None, :].astype(float)  # item 1 scores best, item 200 worst
    history = list(range(1, 151))  # 150 earlier clicks: all of them leave the ranking, not only the last 50
    assert exact_ranks(scores, items, [history], np.array([160])).tolist() == [10]


def test_a_target_that_also_sits_in_the_history_is_still_ranked():
    ranks = exact_ranks(np.array([[0.1, 0.9, 0.2, 0.3, 0.4]]), ITEMS, [[20, 40]], np.array([20]))
    assert ranks.tolist() == [1]


def test_retrieval_report_hr_ndcg_ci_and_curve():
    cfg = EvalConfig(ks=(1, 3), ndcg_ks=(3,), n_boot=200)
    r = retrieval_report(np.array([1, 2, 0, 4]), cfg)
    assert r["n"] == 4 and r["hr@1"] == 0.25 and r["hr@3"] == 0.5
    assert r["ndcg@3"] == pytest.approx((1 + 1 / np.log2(3)) / 4)  # ranks 1 and 2 inside the top 3
    assert r["hr@3_ci95"][0] <= 0.5 <= r["hr@3_ci95"][1]
    assert r["hr_curve"] == [0.25, 0.5, 0.5]


def test_summary_row_has_null_where_a_metric_does_not_apply():
    cfg = EvalConfig(ks=(10, 50, 200), ndcg_ks=(10,), n_boot=10)
    row = summarize({"splits": {"test": retrieval_report(np.array([5]), cfg),
                                "test_cold": retrieval_report(np.array([0]), cfg)}, "attention": None, "fidelity": None})
    assert row["hr@10"] == 1.0 and row["hr@10_cold"] == 0.0
    assert row["sink_rate"] is None and row["fidelity_f1"] is None and row["effective_rank"] is None


def test_eval_config_rejects_nonsense():
    with pytest.raises(ValueError, match="ks"):
        EvalConfig(ks=(0, 10))
    with pytest.raises(ValueError, match="max_events"):
        EvalConfig(max_events=-1)
    with pytest.raises(ValueError, match="protocol"):
        EvalConfig(protocol="random")


def test_sasrec_learns_a_deterministic_next_item_and_never_returns_nan():
    items = np.arange(1, 21)
    histories = [[i] for i in range(1, 20)] * 20  # the next item is always id + 1
    targets = np.array([h[0] + 1 for h in histories])
    cfg = BaselinesConfig(sasrec_dim=32, sasrec_layers=1, sasrec_heads=2, sasrec_max_len=4, sasrec_dropout=0.0,
                          sasrec_lr=1e-2, sasrec_batch_size=64, sasrec_max_epochs=12)
    model, log = train_sasrec(items, histories, targets, cfg)
    assert log[-1]["loss"] < log[0]["loss"]
    scores = model.scores([[3], [], [7, 8]])
    assert not np.isnan(scores).any()  # an empty history is a row of padding, not NaN
    assert items[scores[0].argmax()] == 4 and items[scores[2].argmax()] == 9


def test_sasrec_maps_unknown_ids_to_padding():
    model = SASRec(np.array([5, 7, 9]), BaselinesConfig(sasrec_dim=8, sasrec_heads=2, sasrec_max_len=3))
    assert model.rows([7, 6, 9, 100]).tolist() == [2, 0, 3, 0]


def test_sasrec_is_initialised_like_recbole():
    model = SASRec(np.arange(1, 101), BaselinesConfig())
    assert abs(float(model.item.weight.detach().std()) - 0.02) < 0.003  # N(0, 0.02), no √d scaling
    loss = model.loss(*model.sequences([[1, 2, 3]] * 8), model.rows([4] * 8) - 1)
    assert loss.item() < np.log(100) + 0.5  # a fresh model is near uniform, not far above it


def test_sasrec_dropout_has_nn_dropouts_distribution():
    torch.manual_seed(0)
    x = torch.ones(200_000)
    y = dropout(x, 0.5, training=True)
    assert abs(float((y == 0).float().mean()) - 0.5) < 0.01 and abs(float(y.mean()) - 1.0) < 0.01
    assert set(y.unique().tolist()) == {0.0, 2.0}
    assert dropout(x, 0.5, training=False) is x


def test_sasrec_stops_early_on_validation_and_keeps_the_best_epoch():
    items = np.arange(1, 21)
    histories = [[i] for i in range(1, 20)] * 5
    targets = np.array([h[0] + 1 for h in histories])
    scores = iter([0.1, 0.3, 0.2, 0.2, 0.2, 0.2])
    cfg = BaselinesConfig(sasrec_dim=16, sasrec_layers=1, sasrec_max_len=4, sasrec_max_epochs=50, sasrec_patience=3)
    _, log = train_sasrec(items, histories, targets, cfg, validate=lambda m: next(scores))
    assert len(log) == 5 and max(r["valid"] for r in log) == 0.3
