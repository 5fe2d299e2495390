"""Schema contract and validation: exact reject counts, clear structural errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from karma_ray.data.schema import (
    EVENTS_SCHEMA,
    IMPRESSIONS_SCHEMA,
    ITEMS_SCHEMA,
    DataValidationError,
    RejectReport,
    conform,
    items_schema,
    read_table,
    validate_events,
    validate_impressions,
    validate_items,
)

KNOWN = np.array([1, 2, 3, 4, 5], dtype=np.int64)


def _events(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=EVENTS_SCHEMA)


def _ev(user=1, ts=10, query="q", history=(1,), target=2, negatives=(3,)) -> dict:
    return {"user_id": user, "ts": ts, "query": query, "history": None if history is None else list(history),
            "target": target, "negatives": None if negatives is None else list(negatives)}  # fmt: skip


def test_validate_events_counts_each_reason_and_keeps_good_rows():
    table = _events(
        [
            _ev(user=100),
            _ev(user=None),  # null_user_id
            _ev(user=101, target=99),  # unknown_target
            _ev(user=102, target=98),  # unknown_target
            _ev(user=103, history=(1, 42)),  # unknown_history_item
            _ev(user=104, target=2, negatives=(3, 2)),  # target_in_negatives
            _ev(user=105, negatives=(77,)),  # unknown_negative
            _ev(user=106, query=None, history=None, negatives=None),  # good: nulls filled
        ]
    )
    kept, report = validate_events(table, KNOWN)
    assert report.reasons == {
        "null_user_id": 1, "unknown_target": 2, "unknown_history_item": 1,
        "target_in_negatives": 1, "unknown_negative": 1,
    }  # fmt: skip
    assert report.rejected == 6 and report.total_rows == 8 and not report.ok
    assert kept.column("user_id").to_pylist() == [100, 106]
    assert kept.to_pylist()[1] == {"user_id": 106, "ts": 10, "query": "", "history": [], "target": 2, "negatives": []}
    assert kept.schema.equals(EVENTS_SCHEMA)
    assert len(report.examples) == 5
    assert [e["_reason"] for e in report.examples] == [
        "null_user_id", "unknown_target", "unknown_target", "unknown_history_item", "target_in_negatives"
    ]  # fmt: skip
    assert report.examples[1]["target"] == 99
    summary = report.summary()
    assert summary.startswith("events: rejected 6 of 8 rows (") and "unknown_target=2" in summary and "first:" in summary


def test_first_reason_wins_so_counts_sum_to_rejected():
    table = _events([_ev(user=None, target=99, history=(42,))])
    _, report = validate_events(table, KNOWN)
    assert report.reasons == {"null_user_id": 1}
    assert sum(report.reasons.values()) == report.rejected == 1


def test_validate_events_all_good_is_ok_and_unchanged():
    table = _events([_ev(user=i) for i in range(3)])
    kept, report = validate_events(table, KNOWN)
    assert report.ok and report.reasons == {} and report.examples == []
    assert kept.equals(table)
    assert report.summary() == "events: all 3 rows valid"


def test_validate_events_handles_many_rows_vectorised():
    rng = np.random.default_rng(0)
    n = 50_000
    hist = [list(rng.integers(1, 6, size=5)) for _ in range(100)] * (n // 100)
    table = pa.table({"user_id": np.arange(n), "ts": np.arange(n), "query": [""] * n,
                      "history": pa.array(hist, pa.list_(pa.int64())), "target": np.full(n, 1),
                      "negatives": pa.array([[2, 3]] * n, pa.list_(pa.int64()))})  # fmt: skip
    target = table.column("target").to_numpy().copy()
    target[::1000] = 999
    table = table.set_column(4, "target", pa.array(target))
    kept, report = validate_events(table, KNOWN)
    assert report.reasons == {"unknown_target": n // 1000}
    assert kept.num_rows == n - n // 1000


def test_validate_items_rejects_null_duplicate_and_empty_title():
    table = pa.table({"item_id": pa.array([1, None, 1, 2, 3, 4], pa.int64()),
                      "title": ["a", "b", "a again", "  ", None, "d"],
                      "category": ["c", "c", "c", "c", "c", None], "attributes": [None, "", "", "", "", "x"]})  # fmt: skip
    kept, report = validate_items(table)
    assert report.reasons == {"null_item_id": 1, "duplicate_item_id": 1, "empty_title": 2}
    assert kept.column("item_id").to_pylist() == [1, 4]
    assert kept.column("title").to_pylist() == ["a", "d"]  # first occurrence kept
    assert kept.column("category").to_pylist() == ["c", ""]
    assert kept.column("attributes").to_pylist() == ["", "x"]


def test_validate_items_keeps_image_emb():
    schema = items_schema(3)
    table = pa.Table.from_pylist(
        [{"item_id": 1, "title": "t", "category": "c", "attributes": "", "image_emb": [0.1, 0.2, 0.3]}], schema=schema
    )
    kept, report = validate_items(table)
    assert report.ok and kept.schema.equals(schema)


def test_validate_impressions_reasons():
    rows = [
        {"user_id": 1, "ts": 1, "query": "q", "history": [1], "item_id": 2, "label": 1},
        {"user_id": 1, "ts": 1, "query": None, "history": None, "item_id": 3, "label": 0},
        {"user_id": 1, "ts": 1, "query": "q", "history": [1], "item_id": 55, "label": 0},
        {"user_id": 1, "ts": 1, "query": "q", "history": [1], "item_id": 2, "label": 2},
        {"user_id": 1, "ts": 1, "query": "q", "history": [66], "item_id": 2, "label": 0},
    ]
    kept, report = validate_impressions(pa.Table.from_pylist(rows, schema=IMPRESSIONS_SCHEMA), KNOWN)
    assert report.reasons == {"unknown_item": 1, "bad_label": 1, "unknown_history_item": 1}
    assert kept.num_rows == 2 and kept.column("query").to_pylist() == ["q", ""]
    assert kept.column("history").to_pylist() == [[1], []]


def test_conform_drops_extra_columns_and_casts():
    table = pa.table({"item_id": pa.array([1, 2], pa.int32()), "title": ["a", "b"], "category": ["c", "c"],
                      "attributes": ["", ""], "junk": [0, 1]})  # fmt: skip
    out = conform(table, ITEMS_SCHEMA, "items")
    assert out.schema.equals(ITEMS_SCHEMA) and out.column_names == ITEMS_SCHEMA.names


def test_conform_keeps_optional_image_emb_as_fixed_size_float32():
    table = pa.table({"item_id": [1, 2], "title": ["a", "b"], "category": ["c", "c"], "attributes": ["", ""],
                      "image_emb": pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float64()))})  # fmt: skip
    out = conform(table, ITEMS_SCHEMA, "items")
    assert out.schema.field("image_emb").type == pa.list_(pa.float32(), 2)


def test_conform_missing_column_names_table_and_column():
    table = pa.table({"user_id": [1], "ts": [1], "query": ["q"], "target": [1], "negatives": [[2]]})
    with pytest.raises(DataValidationError, match=r"valid_events.*'history'.*list<item: int64>"):
        conform(table, EVENTS_SCHEMA, "valid_events")


def test_conform_uncastable_type_names_expected_and_actual():
    table = pa.table({"item_id": ["one"], "title": ["a"], "category": ["c"], "attributes": [""]})
    with pytest.raises(DataValidationError, match=r"items: column 'item_id' has type string, expected int64"):
        conform(table, ITEMS_SCHEMA, "items")


def test_read_table_missing_path_says_where_and_how(tmp_path):
    missing = tmp_path / "nope" / "items.parquet"
    with pytest.raises(FileNotFoundError, match="prepare_data.py") as info:
        read_table(missing, ITEMS_SCHEMA, "items")
    assert str(missing) in str(info.value)


def test_read_table_corrupt_file_is_validation_error(tmp_path):
    bad = tmp_path / "x.parquet"
    bad.write_bytes(b"this is not parquet at all" * 10)
    with pytest.raises(DataValidationError, match=str(bad)):
        read_table(bad, ITEMS_SCHEMA, "items")


def test_read_table_directory_roundtrip(tmp_path):
    table = _events([_ev(user=1), _ev(user=2)])
    (tmp_path / "train").mkdir()
    pq.write_table(table.slice(0, 1), tmp_path / "train" / "part-00000.parquet")
    pq.write_table(table.slice(1, 1), tmp_path / "train" / "part-00001.parquet")
    out = read_table(tmp_path / "train", EVENTS_SCHEMA, "train")
    assert out.schema.equals(EVENTS_SCHEMA)
    assert sorted(out.column("user_id").to_pylist()) == [1, 2]


def test_reject_report_merge_and_json():
    a = RejectReport("events", 10, 2, {"x": 2}, [{"_reason": "x", "i": i} for i in range(2)])
    b = RejectReport("events", 5, 4, {"x": 1, "y": 3}, [{"_reason": "y", "i": np.int64(i)} for i in range(4)])
    m = a.merge(b)
    assert (m.total_rows, m.rejected, m.reasons) == (15, 6, {"x": 3, "y": 3})
    assert len(m.examples) == 5 and m.examples[0]["i"] == 0
    assert json.loads(json.dumps(m.to_dict()))["reasons"] == {"x": 3, "y": 3}
    assert RejectReport("items", 3).ok
