"""The light, model-free part of an artifact that the ingress, PreRank and Rank need.

`Catalog` reads only manifest.json, items.parquet and (for the rankers) item_emb.npy, memory-mapped,
so those replicas start fast and never hold the language model. Rows are the artifact's one
convention (`karma_ray.data.catalog.ItemCatalog`: the position in the id-sorted catalogue, which is
also the row of item_emb.npy).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from karma_ray.artifact.layout import MANIFEST, read_manifest, resolve, version
from karma_ray.data.catalog import ItemCatalog

CATALOG_FILES = (MANIFEST, "items.parquet")


@dataclass
class Catalog:
    path: Path
    manifest: dict[str, Any]
    items: ItemCatalog
    item_emb: np.ndarray  # (N, d) float32, row i <-> catalogue row i; (N, 0) when not loaded

    @classmethod
    def load(cls, path: str | Path, with_emb: bool = True) -> "Catalog":
        """with_emb: memory-map item_emb.npy (replicas on one node share the pages)."""
        p = resolve(path, CATALOG_FILES + (("item_emb.npy",) if with_emb else ()))
        items = ItemCatalog.read(p / "items.parquet", columns=["item_id", "title"])
        if with_emb:
            emb = np.load(p / "item_emb.npy", allow_pickle=False, mmap_mode="r")
            if emb.dtype != np.float32 or emb.ndim != 2 or len(emb) != len(items):
                raise ValueError(f"{p}: item_emb.npy is {emb.dtype}{emb.shape}; expected float32 ({len(items)}, d) "
                                 "matching items.parquet")
        else:
            emb = np.zeros((len(items), 0), np.float32)
        return cls(p, read_manifest(p), items, emb)

    @property
    def version(self) -> str:
        return version(self.manifest, self.path)

    def __len__(self) -> int:
        return len(self.items)

    def check(self) -> None:
        """Raise unless this catalogue can serve: items present, version known (a replica health check)."""
        if len(self) == 0:
            raise RuntimeError(f"artifact {self.path}: the item catalogue is empty")
        if not self.version:
            raise RuntimeError(f"artifact {self.path}: no version (manifest run_name)")
        if self.item_emb.shape[1] and len(self.item_emb) != len(self):
            raise RuntimeError(f"artifact {self.path}: item_emb has {len(self.item_emb)} rows for {len(self)} items")

    def split_known(self, ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """(known ids in the given order, unknown ids in the given order)."""
        mask = self.items.known(ids)
        ids = [int(i) for i in ids]
        return [i for i, m in zip(ids, mask) if m], [i for i, m in zip(ids, mask) if not m]

    def rows_of(self, ids: Sequence[int]) -> np.ndarray:
        """Catalogue / item_emb rows of the ids; raises UnknownItemError for any miss."""
        return self.items.rows_of(ids)

    def title_of(self, ids: Sequence[int]) -> list[str]:
        return [self.items.titles[r] for r in self.rows_of(ids)]


RANKER_FILES = ("rankers.json", "rankers.safetensors")  # karma_ray.models.rankers META_FILE / WEIGHTS_FILE


def load_ranker_bundle(artifact: str | Path) -> tuple[Any, str]:
    """(RankerBundle or None, reason). None when the rankers module or trained rankers are absent.

    A rankers module that exists but fails to load is an error, not a silent fallback.
    """
    art = resolve(artifact, CATALOG_FILES)
    if not any((art / f).exists() for f in RANKER_FILES):  # skip importing torch in replicas that won't use it
        return None, "no trained rankers in the artifact (run jobs/train_rankers.py); using the recall score h·e"
    try:
        from karma_ray.models.rankers import load_rankers
    except ModuleNotFoundError as e:
        if e.name not in ("karma_ray.models.rankers",):
            raise
        return None, "karma_ray.models.rankers is not installed; using the recall score h·e"
    bundle = load_rankers(art)
    if bundle is None:
        return None, "no trained rankers in the artifact (run jobs/train_rankers.py); using the recall score h·e"
    return bundle, "trained rankers loaded"


def top_by_score(ids: np.ndarray, scores: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The `keep` best (ids, scores), best first; ties keep the incoming (recall) order."""
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    order = np.argsort(-scores, kind="stable")[: max(0, int(keep))]
    return np.asarray(ids, dtype=np.int64)[order], scores[order]


def stage_scores(bundle: Any, kind: str, catalog: Catalog, h: np.ndarray, cand_ids: np.ndarray,
                 history: Sequence[int]) -> np.ndarray:
    """Scores for one request's candidates from the pre-rank/rank model, or the recall score h·e without one."""
    if len(cand_ids) == 0:
        return np.zeros(0, np.float32)
    rows = catalog.rows_of(cand_ids)
    emb = np.asarray(catalog.item_emb[rows], dtype=np.float32)
    if bundle is None:
        return emb @ np.asarray(h, np.float32).reshape(-1)
    hist_rows = [int(r) for r in catalog.rows_of(list(history))] if len(history) else []
    fn = bundle.prerank_scores if kind == "prerank" else bundle.rank_scores
    out = np.asarray(fn(np.asarray(h, np.float32)[None], emb[None], rows[None], [hist_rows]), dtype=np.float32)
    return out.reshape(-1)[: len(cand_ids)]
