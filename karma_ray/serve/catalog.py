"""The light, model-free part of an artifact that every non-encoder stage needs.

`Catalog` reads only manifest.json, items.parquet and item_emb.npy (and index.faiss on request),
so Recall / PreRank / Rank / the ingress start fast and do not hold a copy of the language model.

One row mapping is used everywhere in serving: a *row* is a position in items.parquet, which is
also the row of item_emb.npy (see `karma_ray.artifact`). `PromptBuilder.rows_of` returns
positions in the id-sorted catalogue instead; `Catalog.rows_of` translates ids to parquet rows, so
the two only coincide when items.parquet is sorted by id.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.parquet as pq

from karma_ray.data.prompts import UnknownItemError


SERVE_FILES = ("manifest.json", "items.parquet", "item_emb.npy", "index.faiss")


def resolve_artifact(path: str | Path) -> Path:
    """Follow `latest`; name what is missing. (Same check as karma_ray.artifact.layout.resolve.)"""
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise FileNotFoundError(f"artifact {path} does not exist; run `python jobs/train.py` first "
                                "or point KARMA_ARTIFACT / the YAML's args.artifact at one")
    missing = [f for f in SERVE_FILES if not (p / f).exists()]
    if missing:
        raise FileNotFoundError(f"artifact {p} is incomplete, missing: {', '.join(missing)}")
    return p


@dataclass
class Catalog:
    path: Path
    manifest: dict[str, Any]
    item_ids: np.ndarray  # (N,) int64, items.parquet order
    titles: list[str]  # items.parquet order
    item_emb: np.ndarray  # (N, d) float32, row i <-> items.parquet row i
    _sorted_ids: np.ndarray
    _order: np.ndarray  # _sorted_ids[j] == item_ids[_order[j]]

    @classmethod
    def load(cls, path: str | Path, with_emb: bool = True) -> "Catalog":
        """with_emb: memory-map item_emb.npy (replicas on one node share the pages)."""
        p = resolve_artifact(path)
        manifest = json.loads((p / "manifest.json").read_text())
        items = pq.read_table(p / "items.parquet", columns=["item_id", "title"])
        ids = items.column("item_id").to_numpy().astype(np.int64)
        order = np.argsort(ids, kind="stable")
        if with_emb:
            emb = np.load(p / "item_emb.npy", allow_pickle=False, mmap_mode="r")
            if emb.dtype != np.float32 or emb.ndim != 2 or len(emb) != len(ids):
                raise ValueError(f"{p}: item_emb.npy is {emb.dtype}{emb.shape}; expected float32 ({len(ids)}, d) "
                                 "matching items.parquet")
        else:
            emb = np.zeros((len(ids), 0), np.float32)
        return cls(p, manifest, ids, items.column("title").to_pylist(), emb, ids[order], order)

    @property
    def version(self) -> str:
        return str(self.manifest.get("run_name", self.path.name))

    @staticmethod
    def read_version(path: str | Path) -> str:
        """The artifact's version (manifest run_name) without loading its items."""
        p = Path(path)
        return str(json.loads((p / "manifest.json").read_text()).get("run_name", p.name))

    def __len__(self) -> int:
        return len(self.item_ids)

    def check(self) -> None:
        """Raise unless this catalogue can serve: items present, version known (a replica health check)."""
        if len(self) == 0:
            raise RuntimeError(f"artifact {self.path}: the item catalogue is empty")
        if not self.version:
            raise RuntimeError(f"artifact {self.path}: no version (manifest run_name)")
        if self.item_emb.shape[1] and len(self.item_emb) != len(self):
            raise RuntimeError(f"artifact {self.path}: item_emb has {len(self.item_emb)} rows for {len(self)} items")

    def known(self, ids: Sequence[int]) -> np.ndarray:
        a = np.asarray(ids, dtype=np.int64)
        if len(a) == 0 or len(self._sorted_ids) == 0:
            return np.zeros(len(a), bool)
        pos = np.minimum(np.searchsorted(self._sorted_ids, a), len(self._sorted_ids) - 1)
        return self._sorted_ids[pos] == a

    def split_known(self, ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """(known ids in the given order, unknown ids in the given order)."""
        mask = self.known(ids)
        ids = [int(i) for i in ids]
        return [i for i, m in zip(ids, mask) if m], [i for i, m in zip(ids, mask) if not m]

    def rows_of(self, ids: Sequence[int]) -> np.ndarray:
        """items.parquet / item_emb rows of the ids; raises UnknownItemError for any miss."""
        a = np.asarray(ids, dtype=np.int64)
        mask = self.known(a)
        if not mask.all():
            raise UnknownItemError(a[~mask])
        return self._order[np.searchsorted(self._sorted_ids, a)].astype(np.int64)

    def title_of(self, ids: Sequence[int]) -> list[str]:
        return [self.titles[r] for r in self.rows_of(ids)]


RANKER_FILES = ("rankers.json", "rankers.safetensors")  # karma_ray.models.rankers META_FILE / WEIGHTS_FILE


def load_ranker_bundle(artifact: str | Path) -> tuple[Any, str]:
    """(RankerBundle or None, reason). None when the rankers module or trained rankers are absent.

    A rankers module that exists but fails to load is an error, not a silent fallback.
    """
    art = resolve_artifact(artifact)
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
