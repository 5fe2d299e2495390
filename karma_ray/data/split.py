"""Leave-last-out splits over click sequences, with a cold-item hold-out (DESIGN.md §4).

Protocol, per user with clicks sorted by (ts, item_id):
* every click is an event whose history is the user's earlier clicks (oldest first, last
  `max_history` kept);
* last click -> test, second-to-last -> valid, the rest -> train (users with < 3 clicks only
  contribute train events);
* a seeded random `cold_frac` of the catalogue is "cold": never seen in training as target,
  history item or negative. Every event (any position) whose target is cold goes to
  `test_cold_events` instead, so cold-item recall is measured on items that were only ever
  encodable from their text. Train histories are rebuilt from the non-cold clicks, so they
  still hold up to `max_history` items; valid/test histories are left untouched.

All array work is numpy on flat arrays; no Python loop over rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from karma_ray.data.schema import EVENTS_SCHEMA, IMPRESSIONS_SCHEMA, DataValidationError, conform

__all__ = ["Splits", "build_splits", "events_to_impressions", "CLICK_COLUMNS"]

CLICK_COLUMNS = pa.schema(
    [
        ("user_id", pa.int64()),
        ("ts", pa.int64()),
        ("item_id", pa.int64()),
        ("query", pa.string()),
        ("negatives", pa.list_(pa.int64())),
    ]
)


@dataclass
class Splits:
    """The tables `prepare_dataset` writes, plus the cold ids it records in meta.json."""

    train_events: pa.Table
    valid_events: pa.Table
    test_events: pa.Table
    test_cold_events: pa.Table
    train_impressions: pa.Table
    test_impressions: pa.Table
    cold_item_ids: np.ndarray

    def counts(self) -> dict[str, int]:
        """Row count per table (what meta.json and the CLI report)."""
        return {
            "train": self.train_events.num_rows,
            "valid": self.valid_events.num_rows,
            "test": self.test_events.num_rows,
            "test_cold": self.test_cold_events.num_rows,
            "train_impressions": self.train_impressions.num_rows,
            "test_impressions": self.test_impressions.num_rows,
        }


def build_splits(
    items: pa.Table, clicks: pa.Table, *, cold_frac: float = 0.1, max_history: int = 50, seed: int = 0
) -> Splits:
    """Split `clicks` (user_id, ts, item_id, query, negatives) into train/valid/test/test_cold."""
    if not 0.0 <= cold_frac < 1.0:
        raise ValueError(f"cold_frac must be in [0, 1), got {cold_frac}")
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    seq = _sorted_clicks(clicks)
    cold = pick_cold_items(items, cold_frac, seed)

    user = seq["user_id"].to_numpy()
    item = seq["item_id"].to_numpy()
    start, n_user = _user_runs(user)
    from_end = n_user - 1 - (np.arange(len(user)) - start)
    held = n_user >= 3
    is_test, is_valid = held & (from_end == 0), held & (from_end == 1)
    cold_target = _in_sorted(item, cold)
    is_train = ~is_test & ~is_valid & ~cold_target

    def events(rows: np.ndarray, hist: pa.Array, negatives: pa.Array | None = None) -> pa.Table:
        return _events_table(seq, rows, hist, negatives)

    test_rows, valid_rows, cold_rows = np.flatnonzero(is_test), np.flatnonzero(is_valid), np.flatnonzero(cold_target)
    test = events(test_rows, _histories(item, start, test_rows, max_history))
    valid = events(valid_rows, _histories(item, start, valid_rows, max_history))
    test_cold = events(cold_rows, _histories(item, start, cold_rows, max_history))
    train = _train_events(seq, item, user, cold_target, is_train, cold, max_history)
    return Splits(
        train_events=train,
        valid_events=valid,
        test_events=test,
        test_cold_events=test_cold,
        train_impressions=events_to_impressions(train),
        test_impressions=events_to_impressions(test),
        cold_item_ids=cold,
    )


def pick_cold_items(items: pa.Table, cold_frac: float, seed: int) -> np.ndarray:
    """Seeded random `cold_frac` of the catalogue's item ids, sorted."""
    ids = np.unique(pc.drop_null(items["item_id"]).to_numpy().astype(np.int64))
    n_cold = int(round(cold_frac * len(ids)))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(ids, size=n_cold, replace=False)).astype(np.int64)


def _sorted_clicks(clicks: pa.Table) -> pa.Table:
    """Conform clicks (query/negatives optional) and sort stably by (user_id, ts, item_id)."""
    n = clicks.num_rows
    if "query" not in clicks.column_names:
        clicks = clicks.append_column("query", pa.array([""] * n, pa.string()))
    if "negatives" not in clicks.column_names:
        clicks = clicks.append_column("negatives", pa.array([[]] * n, pa.list_(pa.int64())))
    clicks = conform(clicks, CLICK_COLUMNS, "clicks")
    for col in ("user_id", "ts", "item_id"):
        if clicks[col].null_count:
            raise DataValidationError(f"clicks: column {col!r} has {clicks[col].null_count} nulls; clicks need ids and times")
    clicks = clicks.set_column(3, "query", pc.fill_null(clicks["query"], ""))
    clicks = clicks.set_column(4, "negatives", pc.fill_null(clicks["negatives"], pa.scalar([], pa.list_(pa.int64()))))
    order = np.lexsort((clicks["item_id"].to_numpy(), clicks["ts"].to_numpy(), clicks["user_id"].to_numpy()))
    return clicks.take(pa.array(order)).combine_chunks()


def _user_runs(user: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row (rows sorted by user): index of the user's first row, and the user's row count."""
    if len(user) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    first = np.concatenate([[True], user[1:] != user[:-1]])
    run = np.cumsum(first) - 1
    start = np.flatnonzero(first)
    return start[run], np.bincount(run)[run]


def _in_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Vectorised membership against a sorted id array."""
    if len(sorted_set) == 0:
        return np.zeros(len(values), dtype=bool)
    idx = np.clip(np.searchsorted(sorted_set, values), 0, len(sorted_set) - 1)
    return sorted_set[idx] == values


def _histories(item: np.ndarray, start: np.ndarray, rows: np.ndarray, max_history: int) -> pa.Array:
    """For each row i in `rows`: item[max(start_i, i - max_history) : i] as a list<int64>."""
    lengths = np.minimum(rows - start[rows], max_history)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    gather = np.repeat(rows - lengths, lengths) + within
    return _list_array(offsets, item[gather])


def _list_array(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    """list<int64> from offsets; int32 offsets keep the plain `list` type the schema asks for."""
    if offsets[-1] >= 2**31:
        raise ValueError("list column too large for one array; split the input into chunks")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, pa.int64()))


def _drop_from_lists(lists: pa.Array, drop_sorted: np.ndarray) -> pa.Array:
    """Remove every value found in `drop_sorted` from each list, keeping order."""
    values = pc.list_flatten(lists).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    keep = ~_in_sorted(values, drop_sorted)
    counts = np.bincount(parents[keep], minlength=len(lists))
    return _list_array(np.concatenate([[0], np.cumsum(counts)]), values[keep])


def _train_events(
    seq: pa.Table, item: np.ndarray, user: np.ndarray, cold_target: np.ndarray, is_train: np.ndarray,
    cold: np.ndarray, max_history: int,
) -> pa.Table:  # fmt: skip
    """Train events with cold ids removed: histories rebuilt from the user's non-cold clicks."""
    warm = np.flatnonzero(~cold_target)
    w_item, w_start = item[warm], _user_runs(user[warm])[0]
    w_rows = np.flatnonzero(is_train[warm])
    hist = _histories(w_item, w_start, w_rows, max_history)
    rows = warm[w_rows]
    negatives = _drop_from_lists(pa.concat_arrays(seq["negatives"].take(pa.array(rows, pa.int64())).chunks or
                                                  [pa.array([], pa.list_(pa.int64()))]), cold)
    return _events_table(seq, rows, hist, negatives)


def _events_table(seq: pa.Table, rows: np.ndarray, history: pa.Array, negatives: pa.Array | None) -> pa.Table:
    sub = seq.take(pa.array(rows, pa.int64()))
    neg = negatives if negatives is not None else sub["negatives"]
    table = pa.table(
        {
            "user_id": sub["user_id"],
            "ts": sub["ts"],
            "query": sub["query"],
            "history": history,
            "target": sub["item_id"],
            "negatives": neg,
        }
    )
    return conform(table, EVENTS_SCHEMA, "events")


def events_to_impressions(events: pa.Table) -> pa.Table:
    """One impression per shown item: the target (label 1) then each negative (label 0)."""
    if events.num_rows == 0:
        return IMPRESSIONS_SCHEMA.empty_table()
    negs = events["negatives"].combine_chunks()
    per_event = 1 + pc.list_value_length(negs).to_numpy(zero_copy_only=False).astype(np.int64)
    src = np.repeat(np.arange(events.num_rows), per_event)
    first = np.concatenate([[0], np.cumsum(per_event)[:-1]]).astype(np.int64)
    is_target = np.zeros(len(src), dtype=bool)
    is_target[first] = True
    item = np.empty(len(src), dtype=np.int64)
    item[first] = events["target"].to_numpy()
    item[~is_target] = pc.list_flatten(negs).to_numpy(zero_copy_only=False)
    sub = events.take(pa.array(src, pa.int64()))
    table = pa.table(
        {
            "user_id": sub["user_id"],
            "ts": sub["ts"],
            "query": sub["query"],
            "history": sub["history"],
            "item_id": pa.array(item),
            "label": pa.array(is_target.astype(np.int8)),
        }
    )
    return conform(table, IMPRESSIONS_SCHEMA, "impressions")
