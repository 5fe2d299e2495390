"""The item catalogue: one id -> row mapping, texts and categories, shared by every component (torch-free).

A *row* is an item's position in the catalogue sorted by item_id. Prompts, training, the click-share
table, SASRec, evaluation, the artifact (items.parquet and item_emb.npy are written in this order)
and every Serve stage use that one convention, so no component re-orders embeddings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from karma_ray.data.schema import IMAGE_EMB_COLUMN


class UnknownItemError(KeyError):
    """An item id that is not in the catalogue the model was trained with."""

    def __init__(self, ids: Iterable[int]):
        self.ids = sorted({int(i) for i in ids})
        super().__init__(f"unknown item ids: {self.ids[:20]}{' …' if len(self.ids) > 20 else ''}")


def item_text(title: str, category: str, attributes: str) -> str:
    """"{title} | {category} | {attributes}" (empty parts are left out)."""
    return " | ".join(p for p in (title or "", category or "", attributes or "") if p)


class ItemCatalog:
    """Items sorted by id, with vectorised id -> row lookups."""

    def __init__(self, items: pa.Table):
        ids = items.column("item_id").to_numpy().astype(np.int64)
        order = np.argsort(ids, kind="stable")
        if len(ids) > 1 and not (np.diff(ids[order]) > 0).all():
            raise ValueError("item_id values must be unique in the catalogue")
        self.table = items.take(pa.array(order)) if not (order == np.arange(len(ids))).all() else items
        self.ids = ids[order]
        col = lambda name: [x or "" for x in self.table.column(name).to_pylist()]  # noqa: E731
        self.titles = col("title")
        self.categories = col("category") if "category" in items.column_names else [""] * len(ids)
        attributes = col("attributes") if "attributes" in items.column_names else [""] * len(ids)
        self.texts = [item_text(t, c, a) for t, c, a in zip(self.titles, self.categories, attributes)]
        self.image: np.ndarray | None = None
        if IMAGE_EMB_COLUMN in items.column_names:
            flat = self.table.column(IMAGE_EMB_COLUMN).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            self.image = flat.reshape(len(ids), -1).astype(np.float32)

    @classmethod
    def of_ids(cls, item_ids: Sequence[int]) -> "ItemCatalog":
        """A catalogue of ids alone (no texts): for components that only map ids to rows."""
        ids = np.asarray(item_ids, np.int64)
        return cls(pa.table({"item_id": ids, "title": pa.nulls(len(ids), pa.string())}))

    @classmethod
    def read(cls, path: str | Path, columns: Sequence[str] | None = None) -> "ItemCatalog":
        return cls(pq.read_table(path, columns=list(columns) if columns else None))

    def __len__(self) -> int:
        return len(self.ids)

    def known(self, item_ids: Sequence[int]) -> np.ndarray:
        """Boolean mask: which ids are in the catalogue (any int64 value is safe to ask about)."""
        ids = np.asarray(item_ids, dtype=np.int64)
        if len(self.ids) == 0 or len(ids) == 0:
            return np.zeros(len(ids), bool)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return self.ids[pos] == ids

    def rows_of(self, item_ids: Sequence[int]) -> np.ndarray:
        """Rows of the ids; raises UnknownItemError naming every id that is not in the catalogue."""
        ids = np.asarray(item_ids, dtype=np.int64)
        ok = self.known(ids)
        if not ok.all():
            raise UnknownItemError(ids[~ok])
        return np.searchsorted(self.ids, ids).astype(np.int64)

    def rows_or(self, item_ids: Sequence[int], missing: int = -1) -> np.ndarray:
        """Rows of the ids, `missing` for ids outside the catalogue (for inputs that may hold unknown ids)."""
        ids = np.asarray(item_ids, dtype=np.int64)
        ok = self.known(ids)
        return np.where(ok, np.searchsorted(self.ids, ids), missing).astype(np.int64)

    def category_of(self, item_ids: Sequence[int]) -> list[str]:
        return [self.categories[r] for r in self.rows_of(item_ids)]

    def click_counts(self, targets: np.ndarray) -> np.ndarray:
        """(N,) number of times each catalogue item occurs in `targets` (ids outside are ignored)."""
        targets = np.asarray(targets, np.int64)
        return np.bincount(np.searchsorted(self.ids, targets[self.known(targets)]), minlength=len(self)).astype(np.float64)

    def log_click_share(self, targets: np.ndarray) -> np.ndarray:
        """log q_i: each item's add-one-smoothed share of the clicks in `targets` (unseen items get the floor)."""
        counts = self.click_counts(targets)
        return np.log((counts + 1.0) / (counts.sum() + len(self))).astype(np.float32)


def sorted_items(items: pa.Table) -> pa.Table:
    """The items table in catalogue (id-sorted) order."""
    return items.take(pc.sort_indices(items, [("item_id", "ascending")]))
