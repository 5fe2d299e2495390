"""Metric functions against hand-computed cases (AUC/GAUC live in test_ctr_metrics.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from karma_ray.eval.attention import first_key_mass, interest_row_concentration, sink_rates
from karma_ray.eval.fidelity import effective_rank, token_f1
from karma_ray.eval.stats import cluster_bootstrap_ci, paired_difference
from karma_ray.eval.retrieval import exclude_and_cut, hit_rate, ndcg, retrieval_metrics, target_ranks


def test_hr_and_ndcg_by_hand():
    ranks = np.array([1, 3, 0, 11])  # 0 = not retrieved
    assert hit_rate(ranks, 1) == 0.25 and hit_rate(ranks, 3) == 0.5 and hit_rate(ranks, 20) == 0.75
    # NDCG@10: (1/log2(2) + 1/log2(4) + 0 + 0) / 4 = (1 + 0.5) / 4
    assert ndcg(ranks, 10) == pytest.approx(0.375)
    m = retrieval_metrics(ranks, ks=(3,), prefix="test/")
    assert m == {"test/hr@3": 0.5, "test/ndcg@3": pytest.approx(0.375), "test/n": 4}


def test_exclusion_then_rank():
    ids = np.array([[7, 8, 9, 10]])
    topk, _ = exclude_and_cut(ids, np.array([[4.0, 3.0, 2.0, 1.0]]), [[7]], k=3)
    assert topk.tolist() == [[8, 9, 10]]
    assert target_ranks(topk, np.array([9])).tolist() == [2]  # 9 moves up once 7 (history) is removed


def _attn(first_key: float, T: int = 4) -> torch.Tensor:
    """(T, T) causal row-stochastic map: each query q ≥ 1 puts `first_key` on key 0, the rest uniform."""
    a = torch.zeros(T, T)
    a[0, 0] = 1.0
    for q in range(1, T):
        a[q, 0] = first_key
        a[q, 1 : q + 1] = (1 - first_key) / q
    return a


def test_sink_rate_on_a_constructed_tensor():
    # 2 samples × 2 heads in one layer: head 0 is a sink (0.9 > 0.3), head 1 is not (0.1).
    layer = torch.stack([torch.stack([_attn(0.9), _attn(0.1)])] * 2)  # (B=2, H=2, T=4, T=4)
    mask = torch.ones(2, 4, dtype=torch.long)
    assert first_key_mass(layer, mask)[0].tolist() == pytest.approx([0.9, 0.1])
    overall, per_layer = sink_rates([layer, layer * 0 + _attn(0.05)], mask)
    assert per_layer == [50.0, 0.0] and overall == 25.0


def test_sink_rate_ignores_query_zero_and_padding():
    a = _attn(0.2, T=4)  # mean over q=1..3 is 0.2 → no sink; q0 (always 1.0) would have made it 0.4
    mask = torch.tensor([[1, 1, 1, 1]])
    assert first_key_mass(a[None, None], mask).item() == pytest.approx(0.2)
    padded = a.clone()
    padded[3, 0] = 1.0  # a padded query row saying "sink" must not count
    assert first_key_mass(padded[None, None], torch.tensor([[1, 1, 1, 0]])).item() == pytest.approx(0.2)


def test_interest_row_entropy_and_top1():
    T = 5
    uniform = torch.zeros(T, T)
    uniform[4] = torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1])  # keys 1..4 uniform after renormalising
    onehot = torch.zeros(T, T)
    onehot[4] = torch.tensor([0.5, 0.0, 0.5, 0.0, 0.0])  # all mass after key 0 on key 2
    attn = torch.stack([uniform[None], onehot[None]])  # (B=2, H=1, T, T)
    ent, top = interest_row_concentration([attn], torch.tensor([4, 4]))
    assert ent[0] == pytest.approx((1.0 + 0.0) / 2, abs=1e-5)  # entropy 1 (uniform) and 0 (one-hot)
    assert top[0] == pytest.approx((0.25 + 1.0) / 2)


def test_token_f1_by_hand():
    # pred {toy, story, comedy}; ref {toy, story, 1995, animation, comedy}: 3 common
    # P = 3/3, R = 3/5, F1 = 2·1·0.6/1.6 = 0.75
    assert token_f1("Toy Story | Comedy", "Toy Story (1995) | Animation, Comedy") == pytest.approx(0.75)
    assert token_f1("", "Toy Story") == 0.0 and token_f1("", "") == 1.0
    assert token_f1("a a b", "a b b") == pytest.approx(2 / 3)  # multiset overlap: min counts (1 a + 1 b)


def test_effective_rank_is_a_participation_ratio():
    rng = np.random.default_rng(0)
    two = np.zeros((4000, 6))
    two[:, :2] = rng.normal(size=(4000, 2))  # covariance ≈ diag(1, 1, 0, 0, 0, 0)
    assert effective_rank(two) == pytest.approx(2.0, rel=0.05)
    assert effective_rank(np.outer(rng.normal(size=500), rng.normal(size=6))) == pytest.approx(1.0)
    assert effective_rank(rng.normal(size=(20000, 8))) == pytest.approx(8.0, rel=0.05)


def test_bootstrap_ci_brackets_the_mean_and_is_deterministic():
    hits = np.array([1, 0, 0, 1, 1, 0, 0, 0, 1, 0], dtype=float)
    lo, hi = cluster_bootstrap_ci(hits, n_boot=500, seed=3)
    assert lo <= hits.mean() <= hi and (lo, hi) == cluster_bootstrap_ci(hits, n_boot=500, seed=3)
    assert cluster_bootstrap_ci(np.ones(5)) == (1.0, 1.0)
    assert all(math.isnan(x) for x in cluster_bootstrap_ci(np.array([])))


def test_cluster_bootstrap_resamples_whole_clusters():
    """200 events on 4 items, all hits on one item: event resampling is far too confident."""
    values = np.repeat([1.0, 0.0, 0.0, 0.0], 50)
    clusters = np.repeat([7, 8, 9, 10], 50)
    event_lo, event_hi = cluster_bootstrap_ci(values, None, n_boot=2000, seed=0)
    lo, hi = cluster_bootstrap_ci(values, clusters, n_boot=2000, seed=0)
    assert event_hi - event_lo < 0.15 and hi - lo > 0.4
    # every replicate is a mean of whole clusters: only multiples of 1/4 can occur
    assert {lo * 4, hi * 4} <= {0.0, 1.0, 2.0, 3.0, 4.0}


def test_paired_difference_pairs_by_seed_and_event():
    a = np.array([[1, 1, 0, 1], [1, 0, 1, 1]], float)
    b = np.array([[0, 1, 0, 1], [0, 0, 1, 0]], float)
    d = paired_difference(a, b, clusters=np.array([1, 2, 3, 4]), n_boot=500, seed=0)
    assert d["diff"] == pytest.approx(3 / 8) and d["n_seeds"] == 2 and d["n_clusters"] == 4
    assert d["ci"][0] <= d["diff"] <= d["ci"][1]
    with pytest.raises(ValueError, match="shape"):
        paired_difference(a, b[:, :3], clusters=np.arange(3))
