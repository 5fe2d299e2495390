"""Pre-ranker / ranker models, their features, persistence (no pickle) and learnability (no Ray)."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from karma_ray.eval.ctr import auc
from karma_ray.models.rankers import (ITEM_FEATURES, USER_FEATURES, FeatureSpace, PreRanker, PreRankerConfig, Ranker,
                                      RankerBundle, RankerConfig, load_rankers, save_rankers)

D = 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread avoids oversubscription on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _features(n_items: int = 40, n_cats: int = 4) -> FeatureSpace:
    items = pa.table({"item_id": np.arange(100, 100 + n_items), "category": [f"c{i % n_cats}" for i in range(n_items)]})
    clicks = np.r_[np.full(5, 100), np.full(2, 101), [102]]
    imp = pa.table({"item_id": np.r_[clicks, [103, 103]], "label": np.r_[np.ones(len(clicks)), [0, 0]].astype(np.int8)})
    return FeatureSpace.from_tables(items, imp)


def _models(fs: FeatureSpace) -> tuple[PreRanker, Ranker]:
    torch.manual_seed(0)
    return PreRanker(PreRankerConfig(emb_dim=D)), Ranker(RankerConfig(emb_dim=D, n_categories=fs.n_categories))


def _artifact_dir(tmp_path, fs: FeatureSpace):
    """The artifact files load_rankers cross-checks: items.parquet and item_emb.npy."""
    pq.write_table(pa.table({"item_id": fs.item_ids}), tmp_path / "items.parquet")
    np.save(tmp_path / "item_emb.npy", np.zeros((len(fs.item_ids), D), np.float32), allow_pickle=False)
    return tmp_path


# ---- features ------------------------------------------------------------------------------


def test_feature_space_lookups_and_popularity():
    fs = _features()
    assert fs.n_categories == 4 and fs.categories == ["c0", "c1", "c2", "c3"]
    assert fs.rows_of([102, 999, 100]).tolist() == [2, -1, 0]
    assert fs.item_clicks[:4].tolist() == [5, 2, 1, 0]  # label-0 impressions do not count
    assert fs.history_rows_of([[100, 999, 101]]) == [[0, 1]]


def test_history_matrix_keeps_the_newest_items():
    fs = _features()
    fs.max_history = 3
    H = fs.history_matrix([[1, 2, 3, 4, 5], [], [7]])
    assert H.tolist() == [[3, 4, 5], [-1, -1, -1], [7, -1, -1]]


def test_item_features_by_hand():
    fs = _features()  # categories: row r -> c{r % 4}
    hist = [[0, 1, 4]]  # cats c0, c1, c0 (newest = row 4, c0); recency weights .64, .8, 1
    f = fs.item_features(np.array([[8, 1, 4, -1]]), hist)[0]
    col = {name: f[:, i] for i, name in enumerate(ITEM_FEATURES)}
    assert col["category"].tolist() == [0, 1, 0, 4]  # -1 padding -> "unknown" bucket K
    np.testing.assert_allclose(col["hist_cat_share"], [2 / 3, 1 / 3, 2 / 3, 0], rtol=1e-6)
    np.testing.assert_allclose(col["hist_cat_recency"], [1.64 / 2.44, 0.8 / 2.44, 1.64 / 2.44, 0], rtol=1e-6)
    assert col["last_cat_match"].tolist() == [1, 0, 1, 0]
    assert col["in_history"].tolist() == [0, 1, 1, 0]
    np.testing.assert_allclose(col["log_pop"], [0, np.log(3) / np.log(6), 0, 0], rtol=1e-6)


def test_user_features_shapes_and_empty_history():
    fs = _features()
    u = fs.user_features([[0, 1, 4], []])
    assert u.shape == (2, len(USER_FEATURES)) and u.dtype == np.float32
    assert np.all(u[1] == 0)
    assert u[0, USER_FEATURES.index("hist_top_cat_share")] == pytest.approx(2 / 3)


# ---- models --------------------------------------------------------------------------------


def test_forward_shapes():
    fs = _features()
    pre, rank = _models(fs)
    B, C = 3, 7
    h, e = torch.randn(B, D), torch.randn(B, C, D)
    rows = np.random.default_rng(0).integers(0, 40, (B, C))
    hist = [[0, 1], [], [5]]
    itf, uf = torch.from_numpy(fs.item_features(rows, hist)), torch.from_numpy(fs.user_features(hist))
    assert pre(h, e, itf, uf).shape == (B, C)
    assert rank(h, e, itf, uf).shape == (B, C)


def test_untrained_prerank_keeps_the_recall_order():
    fs = _features()
    pre, _ = _models(fs)
    bundle = RankerBundle(pre, _models(fs)[1], fs, {})
    rng = np.random.default_rng(1)
    h = rng.normal(size=D).astype(np.float32)
    e = rng.normal(size=(20, D)).astype(np.float32)
    scores = bundle.prerank_scores(h, e, np.arange(20), [0, 1])  # single request: (C,)
    assert scores.shape == (20,)
    assert np.argsort(-scores).tolist() == np.argsort(-(e @ h)).tolist()


# ---- persistence ---------------------------------------------------------------------------


def test_save_load_round_trip_without_pickle(tmp_path, monkeypatch):
    fs = _features()
    pre, rank = _models(fs)
    art = _artifact_dir(tmp_path, fs)
    save_rankers(art, pre, rank, fs, {"note": "unit"})
    assert sorted(p.name for p in art.glob("rankers.*")) == ["rankers.json", "rankers.safetensors"]

    def _no_pickle(*a, **k):
        raise AssertionError("load_rankers must not unpickle")

    monkeypatch.setattr(pickle, "load", _no_pickle)
    monkeypatch.setattr(pickle, "loads", _no_pickle)
    monkeypatch.setattr(torch, "load", _no_pickle)
    bundle = load_rankers(art)
    assert bundle is not None and bundle.meta == {"note": "unit"}
    rng = np.random.default_rng(2)
    h, e = rng.normal(size=(2, D)).astype(np.float32), rng.normal(size=(2, 5, D)).astype(np.float32)
    rows, hist = rng.integers(0, 40, (2, 5)), [[1, 2], [3]]
    ref = RankerBundle(pre, rank, fs, {})
    np.testing.assert_allclose(bundle.rank_scores(h, e, rows, hist), ref.rank_scores(h, e, rows, hist), rtol=1e-6)
    np.testing.assert_allclose(bundle.prerank_scores(h, e, rows, hist), ref.prerank_scores(h, e, rows, hist), rtol=1e-6)
    assert bundle.features.categories == fs.categories
    np.testing.assert_array_equal(bundle.features.item_clicks, fs.item_clicks)


def test_load_returns_none_without_files(tmp_path):
    assert load_rankers(tmp_path) is None


@pytest.mark.parametrize("damage", ["weights", "json", "missing_json", "version", "catalogue", "emb_dim"])
def test_corrupt_or_mismatched_files_raise_value_error(tmp_path, damage):
    fs = _features()
    pre, rank = _models(fs)
    art = _artifact_dir(tmp_path, fs)
    save_rankers(art, pre, rank, fs, {})
    meta = art / "rankers.json"
    if damage == "weights":
        (art / "rankers.safetensors").write_bytes(b"\x00garbage" * 10)
    elif damage == "json":
        meta.write_text("{not json")
    elif damage == "missing_json":
        meta.unlink()
    elif damage == "version":
        doc = json.loads(meta.read_text())
        doc["format_version"] = 999
        meta.write_text(json.dumps(doc))
    elif damage == "catalogue":
        pq.write_table(pa.table({"item_id": fs.item_ids + 1}), art / "items.parquet")
    elif damage == "emb_dim":
        np.save(art / "item_emb.npy", np.zeros((len(fs.item_ids), D + 1), np.float32), allow_pickle=False)
    with pytest.raises(ValueError):
        load_rankers(art)


# ---- learnability --------------------------------------------------------------------------


def _synthetic_ctr(fs: FeatureSpace, n: int, seed: int):
    """Clicks depend on h·e and on whether the item's category is the user's latest one."""
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(n, D)).astype(np.float32) / float(np.sqrt(D))
    e = rng.normal(size=(n, 1, D)).astype(np.float32) / float(np.sqrt(D))
    rows = rng.integers(0, len(fs.item_ids), (n, 1))
    hist = [list(rng.integers(0, len(fs.item_ids), rng.integers(1, 6))) for _ in range(n)]
    itf, uf = fs.item_features(rows, hist), fs.user_features(hist)
    logit = 4 * (h * e[:, 0]).sum(1) * np.sqrt(D) + 3 * itf[:, 0, ITEM_FEATURES.index("last_cat_match")] - 1.5
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return [torch.from_numpy(x) for x in (h, e, itf, uf, y)]


def test_ranker_learns_a_synthetic_ctr_problem():
    fs = _features()
    _, rank = _models(fs)
    h, e, itf, uf, y = _synthetic_ctr(fs, 1500, seed=0)
    th, te, titf, tuf, ty = _synthetic_ctr(fs, 600, seed=1)
    opt = torch.optim.Adam(rank.parameters(), lr=3e-3)
    losses = []
    for epoch in range(6):
        for s in range(0, 1500, 150):
            loss = F.binary_cross_entropy_with_logits(rank(h[s:s+150], e[s:s+150], itf[s:s+150], uf[s:s+150])[:, 0], y[s:s+150])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    rank.eval()
    with torch.no_grad():
        test_auc = auc(ty.numpy(), rank(th, te, titf, tuf)[:, 0].numpy())
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert test_auc > 0.75


def test_prerank_learns_to_use_history_category():
    """The clicked candidate shares the newest history item's category; h·e carries no signal."""
    fs = _features()
    pre, _ = _models(fs)
    rng = np.random.default_rng(3)
    n, C = 128, 20

    def batch():
        rows = np.stack([rng.choice(40, C, replace=False) for _ in range(n)])
        cats = fs.item_cat[rows]
        hist_item = rows[:, 0]  # target = candidate 0 ...
        tgt_pos = rng.integers(0, C, n)
        rows[np.arange(n), [0] * n], rows[np.arange(n), tgt_pos] = rows[np.arange(n), tgt_pos], rows[np.arange(n), [0] * n]
        # ... history's newest item: any other item of the target's category
        same = [rng.choice(np.flatnonzero((fs.item_cat == cats[i, 0]) & (np.arange(40) != hist_item[i]))) for i in range(n)]
        hist = [[int(s)] for s in same]
        x = [torch.from_numpy(a) for a in (rng.normal(size=(n, D)).astype(np.float32) / 4,
                                           rng.normal(size=(n, C, D)).astype(np.float32) / 4,
                                           fs.item_features(rows, hist), fs.user_features(hist))]
        return x, torch.from_numpy(tgt_pos)

    opt = torch.optim.Adam(pre.parameters(), lr=1e-2)
    first = last = None
    for step in range(40):
        x, t = batch()
        loss = F.cross_entropy(pre(*x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
    assert last < first - 0.5  # chance is log(20) ≈ 3.0; category match narrows it to ~C/4 candidates
