"""Arrow schemas for items / events / impressions, and row validation.

Everything downstream (Ray Data pipeline, training, evaluation, index build) reads these
tables, so the schemas here are the contract. Validation is vectorised (pyarrow.compute +
numpy over flattened list arrays) so a million-row table checks in seconds, and it never
drops rows silently: every validator returns the kept rows *and* a `RejectReport` that the
caller logs.

Each rejected row is counted once, under the first reason that applies (reasons are checked
in the order they are listed in each validator's docstring), so `sum(reasons) == rejected`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = [
    "ITEMS_SCHEMA",
    "EVENTS_SCHEMA",
    "CLICKS_SCHEMA",
    "IMPRESSIONS_SCHEMA",
    "IMAGE_EMB_COLUMN",
    "DataValidationError",
    "RejectReport",
    "items_schema",
    "conform",
    "validate_items",
    "validate_events",
    "validate_impressions",
    "read_table",
]

IMAGE_EMB_COLUMN = "image_emb"
_ID_LIST = pa.list_(pa.int64())
_MAX_EXAMPLES = 5

ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("category", pa.string()),
        pa.field("attributes", pa.string()),
    ]
)

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64()),
        pa.field("ts", pa.int64()),
        pa.field("query", pa.string()),
        pa.field("history", _ID_LIST),
        pa.field("target", pa.int64()),
        pa.field("negatives", _ID_LIST),
    ]
)

# Raw click logs (what `split.build_splits` consumes; written by the MovieLens and synthetic sources).
# Row order is the log's own order: it breaks ties between clicks that share a timestamp.
CLICKS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64()),
        pa.field("ts", pa.int64()),
        pa.field("item_id", pa.int64()),
        pa.field("query", pa.string()),
        pa.field("negatives", _ID_LIST),
    ]
)

IMPRESSIONS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64()),
        pa.field("ts", pa.int64()),
        pa.field("query", pa.string()),
        pa.field("history", _ID_LIST),
        pa.field("item_id", pa.int64()),
        pa.field("label", pa.int8()),
    ]
)


def items_schema(image_dim: int = 0) -> pa.Schema:
    """Items schema, with a fixed-size float32 `image_emb` column when `image_dim > 0`."""
    if image_dim < 0:
        raise ValueError(f"image_dim must be >= 0, got {image_dim}")
    if image_dim == 0:
        return ITEMS_SCHEMA
    return ITEMS_SCHEMA.append(pa.field(IMAGE_EMB_COLUMN, pa.list_(pa.float32(), image_dim)))


class DataValidationError(ValueError):
    """A structural problem with a table: missing column, uncastable type, unreadable file."""


@dataclass
class RejectReport:
    """What a validator rejected, so callers can log it and prepare can store it in meta.json."""

    table: str
    total_rows: int
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing was rejected."""
        return self.rejected == 0

    @property
    def rejected_frac(self) -> float:
        """Share of rows rejected (0 for an empty table)."""
        return self.rejected / self.total_rows if self.total_rows else 0.0

    def summary(self) -> str:
        """One human-readable line for logs."""
        if self.ok:
            return f"{self.table}: all {self.total_rows} rows valid"
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.reasons.items(), key=lambda kv: -kv[1]))
        first = f"; first: {self.examples[0]}" if self.examples else ""
        return f"{self.table}: rejected {self.rejected} of {self.total_rows} rows ({reasons}){first}"

    def to_dict(self) -> dict:
        """JSON-serialisable form (examples are made JSON-safe)."""
        out = asdict(self)
        out["examples"] = [_json_safe(e) for e in self.examples]
        return out

    def merge(self, other: "RejectReport") -> "RejectReport":
        """Combine the reports of two chunks of the same table (sums counts, keeps 5 examples)."""
        reasons = dict(self.reasons)
        for k, v in other.reasons.items():
            reasons[k] = reasons.get(k, 0) + v
        return RejectReport(
            table=self.table,
            total_rows=self.total_rows + other.total_rows,
            rejected=self.rejected + other.rejected,
            reasons=reasons,
            examples=(list(self.examples) + list(other.examples))[:_MAX_EXAMPLES],
        )


def _json_safe(value):
    """Convert numpy / bytes values found in example rows into JSON-friendly ones."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


# --------------------------------------------------------------------------------------------
# conform / read
# --------------------------------------------------------------------------------------------


def _column(table: pa.Table, name: str) -> pa.Array:
    """One contiguous array for a column (list_parent_indices etc. are simplest on one chunk)."""
    col = table.column(name)
    return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)


def _cast_column(col: pa.ChunkedArray, target: pa.DataType, table_name: str, col_name: str) -> pa.ChunkedArray:
    if col.type.equals(target):
        return col
    try:
        return col.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
        raise DataValidationError(
            f"{table_name}: column {col_name!r} has type {col.type}, expected {target} "
            f"and it cannot be cast: {err}"
        ) from err


def _image_emb_type(col: pa.ChunkedArray, table_name: str) -> pa.DataType:
    """Target type for an `image_emb` column that the schema does not pin: fixed_size_list<float32>."""
    t = col.type
    if pa.types.is_fixed_size_list(t):
        return pa.list_(pa.float32(), t.list_size)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        dims = np.unique(pc.drop_null(pc.list_value_length(col)).to_numpy())
        if len(dims) == 1 and dims[0] > 0:
            return pa.list_(pa.float32(), int(dims[0]))
        raise DataValidationError(
            f"{table_name}: column {IMAGE_EMB_COLUMN!r} must have one fixed length per row, "
            f"found lengths {dims[:5].tolist()}"
        )
    raise DataValidationError(
        f"{table_name}: column {IMAGE_EMB_COLUMN!r} has type {t}, expected fixed_size_list<float32>"
    )


def conform(table: pa.Table, schema: pa.Schema, name: str) -> pa.Table:
    """Select and cast `schema`'s columns from `table`; extra columns are dropped.

    An `image_emb` column not named by `schema` is kept (cast to fixed_size_list<float32>) when
    the schema is an items schema, because image embeddings are optional for items.
    """
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        f = schema.field(missing[0])
        raise DataValidationError(
            f"{name}: missing required column {f.name!r} (expected type {f.type}); "
            f"table has columns {table.column_names}"
        )
    fields, arrays = [], []
    for f in schema:
        arrays.append(_cast_column(table.column(f.name), f.type, name, f.name))
        fields.append(f)
    is_items = "item_id" in schema.names and "title" in schema.names
    if is_items and IMAGE_EMB_COLUMN not in schema.names and IMAGE_EMB_COLUMN in table.column_names:
        col = table.column(IMAGE_EMB_COLUMN)
        target = _image_emb_type(col, name)
        arrays.append(_cast_column(col, target, name, IMAGE_EMB_COLUMN))
        fields.append(pa.field(IMAGE_EMB_COLUMN, target))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def read_table(path: str | Path, schema: pa.Schema, name: str) -> pa.Table:
    """Read a parquet file or directory and conform it to `schema`, with errors that say what to do."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{name}: no parquet data at {path} (absolute: {path.resolve()}); "
            f"create it with `python jobs/prepare_data.py --dataset synthetic|movielens --out DIR`"
        )
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise DataValidationError(f"{name}: cannot read parquet at {path}: {err}") from err
    return conform(table, schema, name)


# --------------------------------------------------------------------------------------------
# vectorised helpers
# --------------------------------------------------------------------------------------------


def _null_mask(arr: pa.Array) -> np.ndarray:
    return np.asarray(pc.is_null(arr).to_numpy(zero_copy_only=False), dtype=bool)


def _known_mask(values: pa.Array, known: pa.Array) -> np.ndarray:
    """True where a value is one of the known ids (nulls are unknown). Hash-based, O(n)."""
    if len(values) == 0:
        return np.zeros(0, dtype=bool)
    hit = pc.fill_null(pc.is_in(values, value_set=known), False)
    return np.asarray(hit.to_numpy(zero_copy_only=False), dtype=bool)


def _rows_with_unknown(lists: pa.Array, known: pa.Array, n_rows: int) -> np.ndarray:
    """Per row: does the list hold any id that is not known?"""
    values = pc.list_flatten(lists)
    parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    bad = ~_known_mask(values, known)
    return np.bincount(parents[bad], minlength=n_rows).astype(bool)


def _rows_containing(lists: pa.Array, needle: np.ndarray, n_rows: int) -> np.ndarray:
    """Per row: does the list contain that row's `needle` value?"""
    values = pc.list_flatten(lists).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    hit = values == needle[parents]
    return np.bincount(parents[hit], minlength=n_rows).astype(bool)


def _int_values(arr: pa.Array, fill: int = -1) -> np.ndarray:
    return np.asarray(pc.fill_null(arr, fill).to_numpy(zero_copy_only=False), dtype=np.int64)


def _known_array(item_ids: np.ndarray | Sequence[int] | pa.Array) -> pa.Array:
    if isinstance(item_ids, pa.ChunkedArray):
        item_ids = item_ids.combine_chunks()
    if isinstance(item_ids, pa.Array):  # is_in wants a plain Array value set
        return pc.drop_null(item_ids).cast(pa.int64())
    return pa.array(np.unique(np.asarray(item_ids, dtype=np.int64)), pa.int64())


def _apply_checks(
    table: pa.Table, name: str, checks: list[tuple[str, np.ndarray]]
) -> tuple[pa.Table, RejectReport]:
    """Reject rows flagged by the ordered (reason, mask) checks; first matching reason wins."""
    n = table.num_rows
    reason_idx = np.full(n, -1, dtype=np.int64)
    for i, (_, mask) in enumerate(checks):
        reason_idx[(reason_idx < 0) & mask] = i
    rejected = reason_idx >= 0
    counts = np.bincount(reason_idx[rejected], minlength=len(checks))
    reasons = {checks[i][0]: int(c) for i, c in enumerate(counts) if c}
    first = np.flatnonzero(rejected)[:_MAX_EXAMPLES]
    examples = []
    for row_i, row in zip(first, table.take(pa.array(first, pa.int64())).to_pylist()):
        row.pop(IMAGE_EMB_COLUMN, None)  # long float lists make unreadable logs
        row["_reason"] = checks[reason_idx[row_i]][0]
        row["_row"] = int(row_i)
        examples.append(row)
    report = RejectReport(name, n, int(rejected.sum()), reasons, examples)
    kept = table if report.ok else table.filter(pa.array(~rejected))
    return kept, report


def _fill_text(table: pa.Table, col: str) -> pa.Table:
    i = table.schema.get_field_index(col)
    return table.set_column(i, table.schema.field(i), pc.fill_null(table.column(col), ""))


def _fill_list(table: pa.Table, col: str) -> pa.Table:
    i = table.schema.get_field_index(col)
    filled = pc.fill_null(table.column(col), pa.scalar([], table.schema.field(i).type))
    return table.set_column(i, table.schema.field(i), filled)


# --------------------------------------------------------------------------------------------
# validators
# --------------------------------------------------------------------------------------------


def validate_items(table: pa.Table) -> tuple[pa.Table, RejectReport]:
    """Reject items that would break id lookups or produce empty item text.

    Reasons, in order: `null_item_id`, `empty_title` (null or blank), `duplicate_item_id`
    (the first valid occurrence is kept). Null category/attributes become "".
    """
    table = conform(table, ITEMS_SCHEMA, "items")
    n = table.num_rows
    null_id = _null_mask(_column(table, "item_id"))
    title = _column(table, "title")
    empty_title = _null_mask(title) | ~np.asarray(
        pc.fill_null(pc.utf8_length(pc.utf8_trim_whitespace(title)), 0).to_numpy(zero_copy_only=False) > 0,
        dtype=bool,
    )
    ids = _int_values(_column(table, "item_id"))
    candidates = np.flatnonzero(~null_id & ~empty_title)
    duplicate = np.ones(n, dtype=bool)
    _, first_pos = np.unique(ids[candidates], return_index=True)
    duplicate[candidates[first_pos]] = False
    duplicate &= ~null_id & ~empty_title
    kept, report = _apply_checks(
        table, "items", [("null_item_id", null_id), ("empty_title", empty_title), ("duplicate_item_id", duplicate)]
    )
    return _fill_text(_fill_text(kept, "category"), "attributes"), report


def validate_events(
    table: pa.Table, item_ids: np.ndarray | Sequence[int], name: str = "events"
) -> tuple[pa.Table, RejectReport]:
    """Reject events a trainer cannot use: ids missing or pointing outside the catalogue.

    Reasons, in order: `null_user_id`, `null_ts`, `null_target`, `unknown_target`,
    `unknown_history_item`, `unknown_negative`, `target_in_negatives`.
    Null query becomes ""; null history/negatives become [].
    """
    table = conform(table, EVENTS_SCHEMA, name)
    n = table.num_rows
    known = _known_array(item_ids)
    target_arr = _column(table, "target")
    target = _int_values(target_arr)
    history, negatives = _column(table, "history"), _column(table, "negatives")
    checks = [
        ("null_user_id", _null_mask(_column(table, "user_id"))),
        ("null_ts", _null_mask(_column(table, "ts"))),
        ("null_target", _null_mask(target_arr)),
        ("unknown_target", ~_known_mask(target_arr, known)),
        ("unknown_history_item", _rows_with_unknown(history, known, n)),
        ("unknown_negative", _rows_with_unknown(negatives, known, n)),
        ("target_in_negatives", _rows_containing(negatives, target, n)),
    ]
    kept, report = _apply_checks(table, name, checks)
    return _fill_list(_fill_list(_fill_text(kept, "query"), "history"), "negatives"), report


def validate_impressions(
    table: pa.Table, item_ids: np.ndarray | Sequence[int], name: str = "impressions"
) -> tuple[pa.Table, RejectReport]:
    """Reject impressions a ranker cannot score or learn from.

    Reasons, in order: `null_user_id`, `null_ts`, `null_item_id`, `unknown_item`,
    `bad_label` (null or not 0/1), `unknown_history_item`.
    Null query becomes ""; null history becomes [].
    """
    table = conform(table, IMPRESSIONS_SCHEMA, name)
    n = table.num_rows
    known = _known_array(item_ids)
    item_arr = _column(table, "item_id")
    label = _int_values(_column(table, "label"), fill=-1)
    checks = [
        ("null_user_id", _null_mask(_column(table, "user_id"))),
        ("null_ts", _null_mask(_column(table, "ts"))),
        ("null_item_id", _null_mask(item_arr)),
        ("unknown_item", ~_known_mask(item_arr, known)),
        ("bad_label", (label != 0) & (label != 1)),
        ("unknown_history_item", _rows_with_unknown(_column(table, "history"), known, n)),
    ]
    kept, report = _apply_checks(table, name, checks)
    return _fill_list(_fill_text(kept, "query"), "history"), report
