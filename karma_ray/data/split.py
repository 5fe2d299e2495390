"""Leave-last-out splits under two named protocols (docs/design.md §4).

Clicks are ordered per user by time; clicks that share a timestamp keep **the log's own order** (the
row order of the input, e.g. u.data for MovieLens), never an order derived from item ids.

* `standard` (peer-compatible, as RecBole's leave-one-out): per user, the last click is the test
  event (users with >= 2 clicks) and the one before it the validation event (users with >= 3);
  every other click is a training event. No cold hold-out.
* `cold`: a seeded random `cold_frac` of the catalogue is held out of every training row (target,
  history and negatives). Leave-last-out runs over each user's *warm* clicks, so the warm valid/test
  sets hold only warm targets; every click on a cold item is a cold event, and cold events are split
  between `valid_cold` and `test_cold` by user (seeded), so selection and report never share a user.

Every evaluation event carries the user's *whole* earlier click sequence as its history (the ranking
excludes all of it); training events carry the last `max_history` earlier training clicks.
All array work is numpy on flat arrays; no Python loop over rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from karma_ray.config import EVAL_SPLITS, PROTOCOLS
from karma_ray.data.schema import CLICKS_SCHEMA, EVENTS_SCHEMA, IMPRESSIONS_SCHEMA, DataValidationError, conform

__all__ = ["PROTOCOLS", "Splits", "build_splits", "events_to_impressions", "EVAL_SPLITS"]


@dataclass
class Splits:
    """The tables `prepare_dataset` writes, plus the cold ids it records in meta.json."""

    train_events: pa.Table
    valid_events: pa.Table
    test_events: pa.Table
    valid_cold_events: pa.Table
    test_cold_events: pa.Table
    train_impressions: pa.Table
    test_impressions: pa.Table
    cold_item_ids: np.ndarray

    def events(self) -> dict[str, pa.Table]:
        return {"train": self.train_events, "valid": self.valid_events, "test": self.test_events,
                "valid_cold": self.valid_cold_events, "test_cold": self.test_cold_events}

    def counts(self) -> dict[str, int]:
        """Row count per table (what meta.json and the CLI report)."""
        return {**{k: t.num_rows for k, t in self.events().items()},
                "train_impressions": self.train_impressions.num_rows, "test_impressions": self.test_impressions.num_rows}


def build_splits(
    items: pa.Table, clicks: pa.Table, *, protocol: str = "cold", cold_frac: float = 0.1, max_history: int = 50,
    seed: int = 0,
) -> Splits:  # fmt: skip
    """Split `clicks` (user_id, ts, item_id, query, negatives; rows in log order) under `protocol`."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if not 0.0 <= cold_frac < 1.0:
        raise ValueError(f"cold_frac must be in [0, 1), got {cold_frac}")
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    seq = _sorted_clicks(clicks)
    cold = pick_cold_items(items, cold_frac if protocol == "cold" else 0.0, seed)

    user = seq["user_id"].to_numpy()
    item = seq["item_id"].to_numpy()
    start = _user_runs(user)[0]
    cold_target = _in_sorted(item, cold)
    # leave-last-out over each user's warm clicks (all clicks under `standard`)
    warm = np.flatnonzero(~cold_target)
    w_start, w_n = _user_runs(user[warm])
    w_from_end = w_n - 1 - (np.arange(len(warm)) - w_start)
    is_test, is_valid = np.zeros(len(user), bool), np.zeros(len(user), bool)
    is_test[warm] = (w_from_end == 0) & (w_n >= 2)
    is_valid[warm] = (w_from_end == 1) & (w_n >= 3)
    is_train = ~is_test & ~is_valid & ~cold_target
    in_valid_cold = _user_coin(user, seed)

    def eval_events(mask: np.ndarray) -> pa.Table:
        rows = np.flatnonzero(mask)
        return _events_table(seq, rows, _histories(item, start, rows, None), None)

    train = _train_events(seq, item, user, cold_target, is_train, cold, max_history)
    return Splits(
        train_events=train,
        valid_events=eval_events(is_valid),
        test_events=eval_events(is_test),
        valid_cold_events=eval_events(cold_target & in_valid_cold),
        test_cold_events=eval_events(cold_target & ~in_valid_cold),
        train_impressions=events_to_impressions(train),
        test_impressions=events_to_impressions(eval_events(is_test)),
        cold_item_ids=cold,
    )


def _user_coin(user: np.ndarray, seed: int) -> np.ndarray:
    """Per row: a seeded fair coin per *user* (True -> the user's cold events are validation events)."""
    ids = np.unique(user)
    heads = np.random.default_rng([seed, 1]).random(len(ids)) < 0.5
    return heads[np.searchsorted(ids, user)] if len(ids) else np.zeros(0, bool)


def pick_cold_items(items: pa.Table, cold_frac: float, seed: int) -> np.ndarray:
    """Seeded random `cold_frac` of the catalogue's item ids, sorted."""
    ids = np.unique(pc.drop_null(items["item_id"]).to_numpy().astype(np.int64))
    n_cold = int(round(cold_frac * len(ids)))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(ids, size=n_cold, replace=False)).astype(np.int64)


def _sorted_clicks(clicks: pa.Table) -> pa.Table:
    """Conform clicks (query/negatives optional) and order them by (user_id, ts), stably: clicks that
    share a timestamp keep the input's row order, i.e. the log's own order."""
    n = clicks.num_rows
    if "query" not in clicks.column_names:
        clicks = clicks.append_column("query", pa.array([""] * n, pa.string()))
    if "negatives" not in clicks.column_names:
        clicks = clicks.append_column("negatives", pa.array([[]] * n, pa.list_(pa.int64())))
    clicks = conform(clicks, CLICKS_SCHEMA, "clicks")
    for col in ("user_id", "ts", "item_id"):
        if clicks[col].null_count:
            raise DataValidationError(f"clicks: column {col!r} has {clicks[col].null_count} nulls; clicks need ids and times")
    clicks = clicks.set_column(3, "query", pc.fill_null(clicks["query"], ""))
    clicks = clicks.set_column(4, "negatives", pc.fill_null(clicks["negatives"], pa.scalar([], pa.list_(pa.int64()))))
    order = np.lexsort((clicks["ts"].to_numpy(), clicks["user_id"].to_numpy()))  # lexsort is stable
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


def _histories(item: np.ndarray, start: np.ndarray, rows: np.ndarray, max_history: int | None) -> pa.Array:
    """For each row i in `rows`: item[max(start_i, i - max_history) : i] (all earlier items if None)."""
    lengths = rows - start[rows]
    if max_history is not None:
        lengths = np.minimum(lengths, max_history)
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
