"""Leave-last-out splits under the two protocols, the cold-item hold-out and the prepared dataset directory."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from karma_ray.data.prepare import compute_data_hash, prepare_dataset
from karma_ray.data.schema import EVENTS_SCHEMA, IMPRESSIONS_SCHEMA, items_schema, read_table
from karma_ray.data.split import build_splits
from karma_ray.data.synthetic import SyntheticConfig, generate_synthetic

from karma_ray.data.schema import CLICKS_SCHEMA as CLICK_TYPES


def _items(ids) -> pa.Table:
    ids = list(ids)
    return pa.table({"item_id": pa.array(ids, pa.int64()), "title": [f"t{i}" for i in ids],
                     "category": ["c"] * len(ids), "attributes": [""] * len(ids)})  # fmt: skip


def _clicks(rows: list[tuple]) -> pa.Table:
    """rows: (user, ts, item[, negatives]); query = f"q{item}"."""
    return pa.Table.from_pylist(
        [{"user_id": r[0], "ts": r[1], "item_id": r[2], "query": f"q{r[2]}", "negatives": list(r[3]) if len(r) > 3 else []}
         for r in rows], schema=CLICK_TYPES,
    )  # fmt: skip


def _ids(table: pa.Table, col: str) -> list:
    return table.column(col).to_pylist()


def test_leave_last_out_positions_and_history_order():
    clicks = _clicks([
        (1, 5, 10), (1, 1, 11), (1, 3, 12), (1, 2, 13), (1, 4, 14),  # user 1 unsorted on purpose
        (2, 1, 20),  # 1 click -> train only
        (3, 7, 32), (3, 7, 31), (3, 9, 30),  # a tie on ts keeps the log's order: 32 before 31
    ])  # fmt: skip
    s = build_splits(_items(range(10, 40)), clicks, protocol="standard", max_history=50)
    assert s.cold_item_ids.size == 0 and s.test_cold_events.num_rows == 0 and s.valid_cold_events.num_rows == 0
    assert s.test_events.select(["user_id", "target", "history", "query"]).to_pylist() == [
        {"user_id": 1, "target": 10, "history": [11, 13, 12, 14], "query": "q10"},
        {"user_id": 3, "target": 30, "history": [32, 31], "query": "q30"},
    ]
    assert s.valid_events.select(["user_id", "target", "history"]).to_pylist() == [
        {"user_id": 1, "target": 14, "history": [11, 13, 12]},
        {"user_id": 3, "target": 31, "history": [32]},
    ]
    assert s.train_events.select(["user_id", "target", "history"]).to_pylist() == [
        {"user_id": 1, "target": 11, "history": []},
        {"user_id": 1, "target": 13, "history": [11]},
        {"user_id": 1, "target": 12, "history": [11, 13]},
        {"user_id": 2, "target": 20, "history": []},
        {"user_id": 3, "target": 32, "history": []},
    ]
    for t in s.events().values():
        assert t.schema.equals(EVENTS_SCHEMA)


def test_ties_in_time_are_broken_by_the_log_order_not_the_item_id():
    """The same three same-second clicks in two log orders: the last one *in the log* is the test target."""
    a = build_splits(_items(range(1, 10)), _clicks([(1, 0, 5), (1, 9, 2), (1, 9, 7), (1, 9, 3)]), protocol="standard")
    b = build_splits(_items(range(1, 10)), _clicks([(1, 0, 5), (1, 9, 3), (1, 9, 7), (1, 9, 2)]), protocol="standard")
    assert _ids(a.test_events, "target") == [3] and _ids(a.valid_events, "target") == [7]
    assert _ids(b.test_events, "target") == [2] and _ids(b.test_events, "history") == [[5, 3, 7]]


def test_users_with_two_clicks_are_tested_and_three_are_validated_too():
    s = build_splits(_items(range(1, 10)), _clicks([(1, 0, 1), (1, 1, 2), (2, 0, 3), (2, 1, 4), (2, 2, 5)]),
                     protocol="standard")
    assert _ids(s.test_events, "user_id") == [1, 2] and _ids(s.valid_events, "user_id") == [2]


def test_evaluation_histories_hold_every_earlier_click_training_histories_the_last_max_history():
    clicks = _clicks([(1, t, 100 + t) for t in range(80)])
    s = build_splits(_items(range(100, 180)), clicks, protocol="standard", max_history=3)
    assert _ids(s.test_events, "history") == [list(range(100, 179))]  # all 79 earlier clicks are excluded
    assert _ids(s.valid_events, "history") == [list(range(100, 178))]
    assert _ids(s.train_events, "history")[-1] == [174, 175, 176]


def _reference_split(clicks: pa.Table, cold: set, max_history: int, in_valid_cold) -> dict[str, list[dict]]:
    """Brute-force statement of the `cold` protocol, one user at a time (rows in log order)."""
    by_user: dict[int, list[dict]] = {}
    for r in sorted(clicks.to_pylist(), key=lambda r: (r["user_id"], r["ts"])):  # sorted() is stable
        by_user.setdefault(r["user_id"], []).append(r)
    out = {"train": [], "valid": [], "test": [], "valid_cold": [], "test_cold": []}
    for seq in by_user.values():
        warm = [r for r in seq if r["item_id"] not in cold]
        for i, r in enumerate(seq):
            ev = {"user_id": r["user_id"], "ts": r["ts"], "query": r["query"], "history": [x["item_id"] for x in seq[:i]],
                  "target": r["item_id"], "negatives": r["negatives"]}  # fmt: skip
            if r["item_id"] in cold:
                out["valid_cold" if in_valid_cold(r["user_id"]) else "test_cold"].append(ev)
                continue
            j = next(k for k, w in enumerate(warm) if w is r)
            from_end = len(warm) - 1 - j
            if from_end == 0 and len(warm) >= 2:
                out["test"].append(ev)
            elif from_end == 1 and len(warm) >= 3:
                out["valid"].append(ev)
            else:
                hist = [w["item_id"] for w in warm[:j]][-max_history:]
                out["train"].append(ev | {"history": hist, "negatives": [n for n in r["negatives"] if n not in cold]})
    return out


def test_cold_protocol_matches_reference_and_keeps_cold_items_out_of_training_and_warm_sets():
    rng = np.random.default_rng(3)
    rows = []
    for u in range(30):
        for t in rng.choice(1000, size=rng.integers(1, 15), replace=False):
            rows.append((u, int(t), int(rng.integers(0, 40)), rng.choice(40, size=rng.integers(0, 4), replace=False).tolist()))
    rows = [r[:3] + ([n for n in r[3] if n != r[2]],) for r in rows]
    clicks = _clicks(rows)
    s = build_splits(_items(range(40)), clicks, protocol="cold", cold_frac=0.25, max_history=4, seed=5)
    cold = set(s.cold_item_ids.tolist())
    assert len(cold) == 10 and list(s.cold_item_ids) == sorted(cold)
    valid_cold_users = set(_ids(s.valid_cold_events, "user_id"))
    assert not valid_cold_users & set(_ids(s.test_cold_events, "user_id"))  # selection and report never share a user
    ref = _reference_split(clicks, cold, 4, lambda u: u in valid_cold_users)
    for name, table in s.events().items():
        assert table.to_pylist() == ref[name], name
    train = s.train_events
    used = set(_ids(train, "target")) | {i for h in _ids(train, "history") for i in h} | {
        i for n in _ids(train, "negatives") for i in n}  # fmt: skip
    assert not used & cold
    assert not set(_ids(s.train_impressions, "item_id")) & cold
    assert not (set(_ids(s.test_events, "target")) | set(_ids(s.valid_events, "target"))) & cold  # warm sets are warm
    assert set(_ids(s.test_cold_events, "target")) | set(_ids(s.valid_cold_events, "target")) <= cold
    assert s.test_cold_events.num_rows + s.valid_cold_events.num_rows == sum(r[2] in cold for r in rows)


def test_impressions_one_row_per_shown_item():
    clicks = _clicks([(1, 1, 1, [5, 6]), (1, 2, 2, [7]), (1, 3, 3, []), (1, 4, 4, [8, 9])])
    s = build_splits(_items(range(1, 10)), clicks, protocol="standard")
    assert s.train_impressions.schema.equals(IMPRESSIONS_SCHEMA)
    assert s.train_impressions.select(["item_id", "label", "history"]).to_pylist() == [
        {"item_id": 1, "label": 1, "history": []}, {"item_id": 5, "label": 0, "history": []},
        {"item_id": 6, "label": 0, "history": []}, {"item_id": 2, "label": 1, "history": [1]},
        {"item_id": 7, "label": 0, "history": [1]},
    ]  # fmt: skip
    assert _ids(s.test_impressions, "item_id") == [4, 8, 9] and _ids(s.test_impressions, "label") == [1, 0, 0]


def test_splits_deterministic_per_seed():
    items, sessions = generate_synthetic(SyntheticConfig(n_items=200, n_users=30, seed=2))
    a = build_splits(items, sessions, protocol="cold", seed=4)
    b = build_splits(items, sessions, protocol="cold", seed=4)
    c = build_splits(items, sessions, protocol="cold", seed=5)
    assert np.array_equal(a.cold_item_ids, b.cold_item_ids)
    assert a.train_events.equals(b.train_events) and a.test_cold_events.equals(b.test_cold_events)
    assert not np.array_equal(a.cold_item_ids, c.cold_item_ids)


def test_prepare_synthetic_writes_every_file(tmp_path):
    out = tmp_path / "syn"
    meta = prepare_dataset("synthetic", out, n_items=300, n_users=60, image_dim=4, rows_per_file=300, seed=1)
    train_parts = sorted(p.name for p in (out / "train").iterdir())
    assert len(train_parts) == -(-meta["counts"]["train"] // 300) > 1 and train_parts[0] == "part-00000.parquet"
    assert pq.read_schema(out / "items.parquet").remove_metadata().equals(items_schema(4))
    for rel, schema, key in [("train", EVENTS_SCHEMA, "train"), ("valid.parquet", EVENTS_SCHEMA, "valid"),
                             ("test.parquet", EVENTS_SCHEMA, "test"), ("test_cold.parquet", EVENTS_SCHEMA, "test_cold"),
                             ("valid_cold.parquet", EVENTS_SCHEMA, "valid_cold"),
                             ("impressions/train.parquet", IMPRESSIONS_SCHEMA, "train_impressions"),
                             ("impressions/test.parquet", IMPRESSIONS_SCHEMA, "test_impressions")]:  # fmt: skip
        table = pq.read_table(out / rel)
        assert table.schema.remove_metadata().equals(schema), rel
        assert table.num_rows == meta["counts"][key] > 0, rel
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta
    assert meta["protocol"] == "cold"
    assert set(meta) >= {"dataset", "seed", "params", "n_items", "n_users", "counts", "cold_item_ids", "data_hash",
                         "rejects", "created_at"}  # fmt: skip
    assert meta["n_items"] == 300 and meta["n_users"] == 60 and len(meta["cold_item_ids"]) == 30
    assert meta["data_hash"] == compute_data_hash(out)
    assert all(r["rejected"] == 0 for r in meta["rejects"].values())
    assert read_table(out / "train", EVENTS_SCHEMA, "train").num_rows == meta["counts"]["train"]
    # rerun: same seed -> same bytes; fewer parts -> stale parts removed; no staging dirs left
    again = prepare_dataset("synthetic", out, n_items=300, n_users=60, image_dim=4, rows_per_file=10**6, seed=1)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["part-00000.parquet"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert again["counts"] == meta["counts"]


def test_prepare_same_seed_same_hash(tmp_path):
    a = prepare_dataset("synthetic", tmp_path / "a", n_items=150, n_users=20, seed=3)
    b = prepare_dataset("synthetic", tmp_path / "b", n_items=150, n_users=20, seed=3)
    c = prepare_dataset("synthetic", tmp_path / "c", n_items=150, n_users=20, seed=4)
    assert a["data_hash"] == b["data_hash"] != c["data_hash"]


def test_prepare_movielens_counts_under_both_protocols(tmp_path):
    clicks = 55_375  # MovieLens-100k ratings >= 4
    std = prepare_dataset("movielens", tmp_path / "std", protocol="standard")["counts"]
    assert std["test"] == 942 and std["valid_cold"] == std["test_cold"] == 0  # RecBole's 942 test users
    assert std["train"] + std["valid"] + std["test"] == clicks
    meta = prepare_dataset("movielens", tmp_path / "cold", protocol="cold")
    c = meta["counts"]
    assert meta["n_items"] == c["items"] == 1682 and len(meta["cold_item_ids"]) == 168
    assert c["train"] + c["valid"] + c["test"] + c["valid_cold"] + c["test_cold"] == clicks
    assert 0.05 < (c["valid_cold"] + c["test_cold"]) / clicks < 0.2


def test_prepare_unknown_dataset_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="movielens, synthetic"):
        prepare_dataset("imagenet", tmp_path)


def test_prepare_refuses_more_than_one_percent_rejects():
    from karma_ray.data import prepare
    from karma_ray.data.schema import DataValidationError, RejectReport

    table = pa.table({"x": [1]})
    assert prepare._check(table, RejectReport("train", 100, 1, {"unknown_target": 1})) is table
    with pytest.raises(DataValidationError, match="train: rejected 2 of 100 rows"):
        prepare._check(table, RejectReport("train", 100, 2, {"unknown_target": 2}))


def test_click_log_share_counts_training_targets_with_add_one_smoothing(tmp_path):
    from karma_ray.data.catalog import ItemCatalog
    from karma_ray.data.pipeline import click_log_share

    (tmp_path / "train").mkdir()
    pq.write_table(pa.table({"target": pa.array([1, 1, 1, 2], pa.int64())}), tmp_path / "train" / "part-0.parquet")
    logq = click_log_share(tmp_path, ItemCatalog(_items([1, 2, 3])))
    # counts (3, 1, 0) + 1 over 4 clicks + 3 items → (4, 2, 1) / 7; the cold item 3 gets the floor
    assert np.allclose(np.exp(logq), [4 / 7, 2 / 7, 1 / 7])
