"""The two scoring stages after recall: a light pre-ranker and a DCN-v2 CTR ranker (no Ray imports).

Serving is recall (FAISS over e_i with h) → pre-ranking (~200 → ~50) → ranking (→ k). Both models
score a (B, C) grid of candidates from the same inputs, so serving and training share one code path:

  h (B, d)            interest embedding of the request (KARMA or action-only encoder)
  e (B, C, d)         candidate item embeddings (rows of the artifact's item_emb.npy)
  item_feats (B,C,Fi) `FeatureSpace.item_features`: column 0 is the category *index*, the rest dense
  user_feats (B, Fu)  `FeatureSpace.user_features`: history statistics

Both models add a learnable multiple of the recall score h·e to their output, and the pre-ranker's
MLP starts at zero, so an untrained pre-ranker reproduces the recall order instead of scrambling it.

Persistence is `rankers.safetensors` + `rankers.json` inside the artifact directory: loading never
unpickles, and a file that does not match the artifact fails loudly with ValueError.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from karma_ray.data.catalog import ItemCatalog

FORMAT = "karma-rankers"
FORMAT_VERSION = 1
WEIGHTS_FILE = "rankers.safetensors"
META_FILE = "rankers.json"

ITEM_FEATURES = ("category", "log_pop", "hist_cat_share", "hist_cat_recency", "last_cat_match", "in_history")
USER_FEATURES = ("log_hist_len", "hist_mean_log_pop", "hist_cat_entropy", "hist_top_cat_share")
CATEGORY_COL = 0  # item_feats[..., 0] holds the category index as a float; models embed or drop it

HistoryLike = Sequence[Sequence[int]] | np.ndarray


# ---------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class FeatureSpace:
    """Item/category/popularity lookups shared by ranker training and serving.

    Rows are positions in the artifact's items.parquet (= rows of item_emb.npy). Popularity is
    counted from *training* clicks only, so test impressions never leak into a feature.
    """

    item_ids: np.ndarray  # (N,) int64, row order
    item_cat: np.ndarray  # (N,) int64 in [0, n_categories)
    item_clicks: np.ndarray  # (N,) float32 label-1 impressions in the training data
    categories: list[str]
    decay: float = 0.8  # recency weight per step back in the history
    max_history: int = 50  # only the last max_history history items feed the features
    _catalog: ItemCatalog = field(init=False, repr=False)
    _log_pop: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.item_ids = np.asarray(self.item_ids, np.int64)
        self.item_cat = np.asarray(self.item_cat, np.int64)
        self.item_clicks = np.asarray(self.item_clicks, np.float32)
        n = len(self.item_ids)
        if self.item_cat.shape != (n,) or self.item_clicks.shape != (n,):
            raise ValueError(f"feature arrays disagree: ids {n}, cat {self.item_cat.shape}, clicks {self.item_clicks.shape}")
        if n and (self.item_cat.min() < 0 or self.item_cat.max() >= len(self.categories)):
            raise ValueError("item_cat holds an index outside the category vocabulary")
        if n > 1 and not (np.diff(self.item_ids) > 0).all():
            raise ValueError("FeatureSpace rows are catalogue rows: item_ids must be sorted and unique")
        self._catalog = ItemCatalog.of_ids(self.item_ids)
        top = float(np.log1p(self.item_clicks.max())) if n else 0.0
        self._log_pop = (np.log1p(self.item_clicks) / top if top > 0 else np.zeros(n)).astype(np.float32)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_tables(cls, items, impressions=None, decay: float = 0.8, max_history: int = 50) -> "FeatureSpace":
        """Build from the items table (pyarrow) and optional training impressions (for popularity)."""
        item_ids = items.column("item_id").to_numpy().astype(np.int64)
        cats = [c or "" for c in items.column("category").to_pylist()]
        categories = sorted(set(cats))
        lookup = {c: i for i, c in enumerate(categories)}
        item_cat = np.array([lookup[c] for c in cats], np.int64)
        clicks = np.zeros(len(item_ids), np.float32)
        if impressions is not None and impressions.num_rows:
            clicked = impressions.column("item_id").to_numpy()[impressions.column("label").to_numpy() == 1]
            rows = cls(item_ids, item_cat, clicks, categories).rows_of(clicked)
            clicks = np.bincount(rows[rows >= 0], minlength=len(item_ids)).astype(np.float32)
        return cls(item_ids, item_cat, clicks, categories, decay, max_history)

    @property
    def n_categories(self) -> int:
        return len(self.categories)

    @property
    def n_item_features(self) -> int:
        return len(ITEM_FEATURES)

    @property
    def n_user_features(self) -> int:
        return len(USER_FEATURES)

    def rows_of(self, item_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Catalogue row of each item id; -1 for ids outside the catalogue."""
        ids = np.asarray(item_ids, np.int64)
        return self._catalog.rows_or(ids.reshape(-1)).reshape(ids.shape)

    def history_rows_of(self, histories: Sequence[Sequence[int]]) -> list[list[int]]:
        """History item ids → rows, dropping ids the catalogue does not know."""
        return [[int(r) for r in self.rows_of(list(h)) if r >= 0] for h in histories]

    # ---- vectorised features -----------------------------------------------------------------
    def history_matrix(self, history_rows: HistoryLike) -> np.ndarray:
        """(B, L) rows of the last `max_history` history items, oldest first, padded right with -1."""
        if isinstance(history_rows, np.ndarray) and history_rows.ndim == 2:
            return history_rows.astype(np.int64, copy=False)
        lengths = np.fromiter((len(h) for h in history_rows), np.int64, len(history_rows))
        B, L = len(lengths), self.max_history
        out = np.full((B, L), -1, np.int64)
        if not lengths.sum():
            return out
        flat = np.concatenate([np.asarray(h, np.int64) for h in history_rows if len(h)])
        row = np.repeat(np.arange(B), lengths)
        col = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # position within row
        col = col - np.repeat(np.maximum(lengths - L, 0), lengths)  # drop the oldest beyond L
        keep = col >= 0
        out[row[keep], col[keep]] = flat[keep]
        out[(out < 0) | (out >= len(self.item_ids))] = -1  # unknown rows count as padding
        return out

    def _history_stats(self, H: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per-user category counts, recency-weighted counts (both (B, K+1)), lengths, last category."""
        B, L = H.shape
        K = self.n_categories
        valid = H >= 0
        n = valid.sum(1)
        hcat = np.where(valid, self.item_cat[np.maximum(H, 0)], K)  # K = "no category" bucket
        # Left-aligned rows: age 0 is the newest item (position n-1).
        age = n[:, None] - 1 - np.arange(L)[None, :]
        w = np.where(valid, self.decay ** np.maximum(age, 0), 0.0)
        flat = (np.arange(B)[:, None] * (K + 1) + hcat).ravel()
        counts = np.bincount(flat, weights=valid.ravel().astype(np.float64), minlength=B * (K + 1)).reshape(B, K + 1)
        recency = np.bincount(flat, weights=w.ravel(), minlength=B * (K + 1)).reshape(B, K + 1)
        recency /= np.maximum(w.sum(1, keepdims=True), 1e-12)
        last = np.where(n > 0, hcat[np.arange(B), np.maximum(n - 1, 0)], -1)
        return counts, recency, n, last

    def item_features(self, item_rows: np.ndarray, history_rows: HistoryLike) -> np.ndarray:
        """(B, C) candidate rows (-1 = padding) + histories → (B, C, Fi) float32, see ITEM_FEATURES."""
        rows = np.asarray(item_rows, np.int64)
        H = self.history_matrix(history_rows)
        if rows.ndim != 2 or len(rows) != len(H):
            raise ValueError(f"item_rows must be (B, C) with B = {len(H)} histories, got {rows.shape}")
        B = len(rows)
        K = self.n_categories
        known = rows >= 0
        safe = np.maximum(rows, 0)
        ccat = np.where(known, self.item_cat[safe], K)  # (B, C)
        counts, recency, n, last = self._history_stats(H)
        b = np.arange(B)[:, None]
        share = counts[b, ccat] / np.maximum(n, 1)[:, None]
        in_hist = (rows[:, :, None] == H[:, None, :]).any(-1) & known
        out = np.stack([
            ccat.astype(np.float32),
            np.where(known, self._log_pop[safe], 0.0),
            np.where(known, share, 0.0),
            np.where(known, recency[b, ccat], 0.0),
            (known & (ccat == last[:, None])).astype(np.float32),
            in_hist.astype(np.float32),
        ], axis=-1)
        return out.astype(np.float32)

    def user_features(self, history_rows: HistoryLike) -> np.ndarray:
        """(B, Fu) float32 history statistics, see USER_FEATURES."""
        H = self.history_matrix(history_rows)
        counts, _, n, _ = self._history_stats(H)
        counts = counts[:, : self.n_categories]
        valid = H >= 0
        pop = np.where(valid, self._log_pop[np.maximum(H, 0)], 0.0).sum(1) / np.maximum(n, 1)
        p = counts / np.maximum(n, 1)[:, None]
        ent = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)).sum(1)
        ent /= max(math.log(self.n_categories), 1e-12) if self.n_categories > 1 else 1.0
        out = np.stack([np.log1p(n) / math.log1p(self.max_history), pop, ent, p.max(1, initial=0.0)], axis=-1)
        return out.astype(np.float32)

    # ---- persistence -------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"categories": list(self.categories), "decay": self.decay, "max_history": self.max_history,
                "item_features": list(ITEM_FEATURES), "user_features": list(USER_FEATURES)}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"features.item_ids": torch.from_numpy(self.item_ids.copy()),
                "features.item_cat": torch.from_numpy(self.item_cat.copy()),
                "features.item_clicks": torch.from_numpy(self.item_clicks.copy())}

    @classmethod
    def from_saved(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "FeatureSpace":
        if list(meta["item_features"]) != list(ITEM_FEATURES) or list(meta["user_features"]) != list(USER_FEATURES):
            raise ValueError(f"saved feature layout {meta['item_features']}/{meta['user_features']} differs from "
                             f"this code's {ITEM_FEATURES}/{USER_FEATURES}; retrain the rankers")
        return cls(tensors["features.item_ids"].numpy(), tensors["features.item_cat"].numpy(),
                   tensors["features.item_clicks"].numpy(), list(meta["categories"]), float(meta["decay"]),
                   int(meta["max_history"]))


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


@dataclass
class PreRankerConfig:
    emb_dim: int
    n_item_features: int = len(ITEM_FEATURES)
    n_user_features: int = len(USER_FEATURES)
    hidden: int = 64
    init_dot_scale: float = 10.0  # ≈ 1/τ of the recall model, so h·e starts as a sharp signal


def _dot(h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    return (h[:, None, :] * e).sum(-1)  # (B, C)


def _dense(item_feats: torch.Tensor, user_feats: torch.Tensor) -> torch.Tensor:
    """Item features without the category index, plus the user's features broadcast over C."""
    dense = torch.cat([item_feats[..., :CATEGORY_COL], item_feats[..., CATEGORY_COL + 1:]], dim=-1)
    return torch.cat([dense, user_feats[:, None, :].expand(-1, item_feats.shape[1], -1)], dim=-1)


class PreRanker(nn.Module):
    """Two-tower-style light scorer: MLP over [h⊙e, h·e, dense item/user features] + s·(h·e).

    One 64-wide hidden layer keeps 200 candidates well under a millisecond on one CPU core, and a
    zero-initialised output layer makes the untrained model equal to the recall order.
    """

    def __init__(self, cfg: PreRankerConfig):
        super().__init__()
        self.cfg = cfg
        n_in = cfg.emb_dim + 1 + (cfg.n_item_features - 1) + cfg.n_user_features
        self.mlp = nn.Sequential(nn.Linear(n_in, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.dot_scale = nn.Parameter(torch.tensor(float(cfg.init_dot_scale)))

    def forward(self, h: torch.Tensor, e: torch.Tensor, item_feats: torch.Tensor, user_feats: torch.Tensor) -> torch.Tensor:
        dot = _dot(h, e)
        x = torch.cat([h[:, None, :] * e, dot[..., None], _dense(item_feats, user_feats)], dim=-1)
        return self.dot_scale * dot + self.mlp(x).squeeze(-1)  # (B, C)


@dataclass
class RankerConfig:
    emb_dim: int
    n_categories: int
    n_item_features: int = len(ITEM_FEATURES)
    n_user_features: int = len(USER_FEATURES)
    cat_dim: int = 8
    cross_layers: int = 2
    cross_rank: int = 64  # low-rank W = U·Vᵀ (DCN-v2 §4.2): ~6x cheaper than full rank at d=128
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.1
    init_dot_scale: float = 5.0

    def __post_init__(self) -> None:
        self.hidden = tuple(int(x) for x in self.hidden)


class CrossLayer(nn.Module):
    """DCN-v2 cross layer x_{l+1} = x0 ⊙ (U Vᵀ x_l + b) + x_l: explicit feature interactions.

    Low rank because the input is ~3·emb_dim wide; a full d×d W would dominate the ranker's cost.
    """

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)  # Vᵀ
        self.up = nn.Linear(rank, dim)  # U, b
        nn.init.normal_(self.up.weight, std=0.01)
        nn.init.zeros_(self.up.bias)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.up(self.down(x)) + x


class Ranker(nn.Module):
    """CTR model, DCN-v2 (parallel cross network + deep MLP) over h, e, h⊙e, h·e, category, stats."""

    def __init__(self, cfg: RankerConfig):
        super().__init__()
        self.cfg = cfg
        self.cat_emb = nn.Embedding(cfg.n_categories + 1, cfg.cat_dim)  # last index: unknown category
        dim = 3 * cfg.emb_dim + 1 + cfg.cat_dim + (cfg.n_item_features - 1) + cfg.n_user_features
        self.cross = nn.ModuleList(CrossLayer(dim, min(cfg.cross_rank, dim)) for _ in range(cfg.cross_layers))
        layers: list[nn.Module] = []
        width = dim
        for hid in cfg.hidden:
            layers += [nn.Linear(width, hid), nn.ReLU(), nn.Dropout(cfg.dropout)]
            width = hid
        self.deep = nn.Sequential(*layers)
        self.out = nn.Linear(dim + width, 1)
        self.dot_scale = nn.Parameter(torch.tensor(float(cfg.init_dot_scale)))

    def forward(self, h: torch.Tensor, e: torch.Tensor, item_feats: torch.Tensor, user_feats: torch.Tensor) -> torch.Tensor:
        B, C, _ = e.shape
        dot = _dot(h, e)
        cat = item_feats[..., CATEGORY_COL].long().clamp(0, self.cfg.n_categories)
        x0 = torch.cat([h[:, None, :].expand(B, C, -1), e, h[:, None, :] * e, dot[..., None], self.cat_emb(cat),
                        _dense(item_feats, user_feats)], dim=-1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return self.dot_scale * dot + self.out(torch.cat([x, self.deep(x0)], dim=-1)).squeeze(-1)  # (B, C)


# ---------------------------------------------------------------------------------------------
# bundle + persistence
# ---------------------------------------------------------------------------------------------


@dataclass
class RankerBundle:
    """Both trained rankers plus the features they were trained with; numpy in, numpy out."""

    prerank: PreRanker
    rank: Ranker
    features: FeatureSpace
    meta: dict[str, Any]

    def prerank_scores(self, h: np.ndarray, cand_emb: np.ndarray, cand_rows: np.ndarray,
                       history_rows: HistoryLike | Sequence[int]) -> np.ndarray:
        """Pre-ranker logits, (B, C) — or (C,) when h is a single (d,) vector with one history."""
        return self._scores(self.prerank, h, cand_emb, cand_rows, history_rows)

    def rank_scores(self, h: np.ndarray, cand_emb: np.ndarray, cand_rows: np.ndarray,
                    history_rows: HistoryLike | Sequence[int]) -> np.ndarray:
        """Ranker logits (higher = more likely clicked); same shapes as `prerank_scores`."""
        return self._scores(self.rank, h, cand_emb, cand_rows, history_rows)

    def _scores(self, model: nn.Module, h, cand_emb, cand_rows, history_rows) -> np.ndarray:
        h = np.asarray(h, np.float32)
        single = h.ndim == 1
        if single:
            h, cand_emb, cand_rows, history_rows = h[None], np.asarray(cand_emb)[None], np.asarray(cand_rows)[None], [history_rows]
        rows = np.asarray(cand_rows, np.int64)
        H = self.features.history_matrix(history_rows)
        item_f = self.features.item_features(rows, H)
        user_f = self.features.user_features(H)
        model.eval()
        with torch.no_grad():
            out = model(torch.from_numpy(h), torch.from_numpy(np.asarray(cand_emb, np.float32)),
                        torch.from_numpy(item_f), torch.from_numpy(user_f)).numpy()
        return out[0] if single else out


def save_rankers(artifact_dir: str | Path, prerank: PreRanker, rank: Ranker, features: FeatureSpace,
                 meta: dict[str, Any]) -> tuple[Path, Path]:
    """Write rankers.safetensors then rankers.json (last, so its presence means both are complete)."""
    out = Path(artifact_dir)
    tensors = {f"prerank.{k}": v.detach().contiguous().cpu() for k, v in prerank.state_dict().items()}
    tensors.update({f"rank.{k}": v.detach().contiguous().cpu() for k, v in rank.state_dict().items()})
    tensors.update(features.tensors())
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "prerank_config": asdict(prerank.cfg),
           "rank_config": asdict(rank.cfg), "features": features.to_json(), "meta": meta}
    weights, meta_path = out / WEIGHTS_FILE, out / META_FILE
    _atomic(weights, lambda p: save_file(tensors, str(p)))
    _atomic(meta_path, lambda p: p.write_text(json.dumps(doc, indent=2, default=_json_default)))
    return weights, meta_path


def load_rankers(artifact_dir: str | Path) -> RankerBundle | None:
    """The artifact's rankers; None when it has none; ValueError when they are corrupt or mismatched."""
    art = Path(artifact_dir)
    weights, meta_path = art / WEIGHTS_FILE, art / META_FILE
    if not weights.exists() and not meta_path.exists():
        return None
    if not (weights.exists() and meta_path.exists()):
        raise ValueError(f"{art} has only one of {WEIGHTS_FILE}/{META_FILE}; retrain with jobs/train_rankers.py")
    try:
        doc = json.loads(meta_path.read_text())
        tensors = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 — any read failure means a corrupt file
        raise ValueError(f"cannot read rankers in {art}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path} is not a {FORMAT} v{FORMAT_VERSION} file")
    try:
        features = FeatureSpace.from_saved(doc["features"], tensors)
        prerank = PreRanker(PreRankerConfig(**doc["prerank_config"]))
        rank = Ranker(RankerConfig(**doc["rank_config"]))
        prerank.load_state_dict(_section(tensors, "prerank."), strict=True)
        rank.load_state_dict(_section(tensors, "rank."), strict=True)
    except (KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"rankers in {art} do not match this code: {exc}") from exc
    _check_against_artifact(art, features, prerank.cfg.emb_dim)
    return RankerBundle(prerank.eval(), rank.eval(), features, dict(doc.get("meta", {})))


def _section(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _check_against_artifact(art: Path, features: FeatureSpace, emb_dim: int) -> None:
    """Rankers trained for another catalogue or encoder would silently mis-score: refuse them."""
    emb_path, items_path = art / "item_emb.npy", art / "items.parquet"
    if emb_path.exists():
        shape = np.load(emb_path, mmap_mode="r", allow_pickle=False).shape
        if shape != (len(features.item_ids), emb_dim):
            raise ValueError(f"rankers expect {len(features.item_ids)} items × {emb_dim} dims, "
                             f"but {emb_path} is {shape}; retrain the rankers")
    if items_path.exists():
        import pyarrow.parquet as pq

        ids = pq.read_table(items_path, columns=["item_id"]).column("item_id").to_numpy()
        if not np.array_equal(ids, features.item_ids):
            raise ValueError(f"rankers were trained on another catalogue than {items_path}; retrain the rankers")


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, (np.ndarray, tuple)):
        return list(obj.tolist() if isinstance(obj, np.ndarray) else obj)
    return str(obj)
