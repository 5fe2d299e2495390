"""Cache layout, key, and reading back (no Ray): states are raw bf16/fp32 bytes in Parquet, never pickled."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from karma_ray.config import EVAL_SPLITS
from karma_ray.data.catalog import ItemCatalog
from karma_ray.data.prompts import IGNORE

CACHE_FORMAT = 3  # 3: rows computed in length-sorted chunks (a row's bf16 states depend on its chunk's width)
DTYPES = {"bf16": (torch.bfloat16, np.int16), "fp32": (torch.float32, np.float32)}  # torch dtype, byte view


def cache_key(cfg, frozen_sha256: str, data_hash: str) -> dict[str, Any]:
    """Everything the cached states depend on; any change gives a new cache directory. The evaluation
    splits are named only when some are left out, so caches that hold all four keep their keys."""
    d, e = cfg.data, cfg.eval
    evaluation = {"max_events": e.max_events, "max_cold_events": e.max_cold_events, "seed": e.seed}
    if set(d.cache_eval_splits) != set(EVAL_SPLITS):
        evaluation["splits"] = sorted(d.cache_eval_splits)
    return {"format": CACHE_FORMAT, "backbone": cfg.model.backbone, "frozen_sha256": frozen_sha256,
            "trainable_layers": cfg.model.trainable_layers, "trunk_dtype": cfg.model.trunk_dtype,
            "image_dim": cfg.model.image_dim, "data_hash": data_hash, "protocol": e.protocol,
            "prompt": {"history_items": d.history_items, "max_prompt_tokens": d.max_prompt_tokens,
                       "max_item_tokens": d.max_item_tokens, "max_target_tokens": d.max_target_tokens},
            "train_rows": d.train_rows, "eval": evaluation}


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cache_root(cfg) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else cfg.data_dir / "trunk_cache"


# ---- (T, d) tensors <-> bytes ----------------------------------------------------------------
def to_bytes(x: torch.Tensor) -> bytes:
    """(T, d) states in the cache dtype -> raw bytes (bf16 via an int16 view: numpy has no bf16)."""
    x = x.detach().cpu().contiguous()
    return (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy().tobytes()


def from_bytes(blob: bytes, length: int, dtype: str) -> torch.Tensor:
    torch_dtype, view = DTYPES[dtype]
    arr = np.frombuffer(blob, dtype=view).reshape(length, -1)
    return torch.from_numpy(arr.copy()).view(torch_dtype)


def pad_states(blobs: list[bytes], lengths: np.ndarray, dtype: str, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of states -> (n, T, d) zero-padded tensor and its (n, T) mask."""
    width = int(width or (lengths.max() if len(lengths) else 1))
    rows = [from_bytes(b, int(n), dtype) for b, n in zip(blobs, lengths)]
    d = rows[0].shape[1] if rows else 1
    out = torch.zeros(len(rows), width, d, dtype=DTYPES[dtype][0])
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    mask = (torch.arange(width)[None, :] < torch.tensor(np.asarray(lengths, np.int64))[:, None]).long()
    return out, mask


def pad_lists(lists: list, width: int, fill: int) -> torch.Tensor:
    out = torch.full((len(lists), width), fill, dtype=torch.long)
    for i, v in enumerate(lists):
        v = list(v)[:width]
        out[i, : len(v)] = torch.as_tensor(v, dtype=torch.long)
    return out


@dataclass
class ItemStates:
    """Every catalogue item's cached item-tower and L_recon states, in catalogue row order."""

    ids: np.ndarray  # (N,) sorted item ids
    states: torch.Tensor  # (N, Ti, d)
    mask: torch.Tensor  # (N, Ti)
    pos: torch.Tensor  # (N,) the [ITEM] position
    rec_states: torch.Tensor  # (N, Tr, d)
    rec_mask: torch.Tensor
    rec_labels: torch.Tensor  # (N, Tr)
    image: torch.Tensor | None = None  # (N, image_dim) from the catalogue, for the [IMG] soft state

    def __post_init__(self) -> None:
        self.catalog = ItemCatalog.of_ids(self.ids)

    def rows(self, item_ids) -> torch.Tensor:
        """Catalogue rows of the ids (UnknownItemError for any id the cache does not hold)."""
        return torch.from_numpy(self.catalog.rows_of(item_ids))


class TrunkCache:
    """A complete cache directory: key.json and Parquet partitions kind=items, kind=train, kind=eval_<split>."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.key = json.loads((self.root / "key.json").read_text())
        self.dtype = self.key["trunk_dtype"]
        self._items: ItemStates | None = None

    @property
    def train_path(self) -> Path:
        return self.root / "kind=train"

    def _read(self, kind: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.root / f"kind={kind}", columns=columns).sort_by("key")

    def items(self) -> ItemStates:
        if self._items is None:
            t = self._read("items")
            states, mask = pad_states(t["states"].to_pylist(), t["length"].to_numpy(), self.dtype)
            rec, rec_mask = pad_states(t["rec_states"].to_pylist(), t["rec_length"].to_numpy(), self.dtype)
            self._items = ItemStates(t["key"].to_numpy(), states, mask, torch.from_numpy(t["pos"].to_numpy().astype(np.int64)),
                                     rec, rec_mask, pad_lists(t["rec_labels"].to_pylist(), rec.shape[1], IGNORE))
        return self._items

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return tuple(self.key["eval"].get("splits", EVAL_SPLITS))

    def eval_split(self, split: str) -> dict[str, Any]:
        """{"states": [(T, d)...], "length", "pos"} for the split's events, in event order."""
        if split not in self.eval_splits:
            raise ValueError(f"trunk cache {self.root} holds no {split!r} prompts (it holds {', '.join(self.eval_splits)}): "
                             f"add {split} to data.cache_eval_splits, or evaluate at full depth")
        t = self._read(f"eval_{split}", ["key", "length", "pos", "states"])
        return {"blobs": t["states"].to_pylist(), "length": t["length"].to_numpy(), "pos": t["pos"].to_numpy()}

    def train_rows(self, n: int) -> pa.Table:
        """The first n cached training rows (deterministic: readout statistics and the fidelity fit use them).
        Keys are row numbers, so the filter skips every Parquet row group past n (reading all ~1.3 GB of
        ml100k's rows to keep 512 took 13 s)."""
        return pq.read_table(self.root / "kind=train", filters=[("key", "<", n)]).sort_by("key")


def collate_train(batch: dict[str, Any], items: ItemStates, max_negatives: int, dtype: str,
                  logq: torch.Tensor | None, with_gen: bool, with_rec: bool) -> dict[str, torch.Tensor]:
    """A batch of cached training rows -> KarmaModel.forward's inputs, items looked up in memory."""
    lengths = np.asarray(batch["length"])
    int_states, int_mask = pad_states(list(batch["states"]), lengths, dtype)
    targets = np.array(batch["target"], np.int64)  # a writable copy (Arrow buffers are read-only)
    B, N = len(targets), max_negatives
    neg_item = np.full((B, N), -1, np.int64)
    for b, negs in enumerate(batch["negatives"]):
        negs = [int(x) for x in negs if int(x) != targets[b]][:N]
        neg_item[b, : len(negs)] = negs
    pos_rows = items.rows(targets)
    neg_rows = items.rows(np.where(neg_item >= 0, neg_item, targets[:, None]).reshape(-1))
    width = int(items.mask[torch.cat([pos_rows, neg_rows])].sum(1).max())
    out = {"int_states": int_states, "int_mask": int_mask, "int_pos": torch.tensor(np.asarray(batch["pos"], np.int64)),
           "pos_item": torch.from_numpy(targets), "neg_item": torch.from_numpy(neg_item),
           "pos_states": items.states[pos_rows, :width], "pos_mask": items.mask[pos_rows, :width], "pos_pos": items.pos[pos_rows],
           "neg_states": items.states[neg_rows, :width].view(B, N, width, -1),
           "neg_mask": items.mask[neg_rows, :width].view(B, N, width), "neg_pos": items.pos[neg_rows].view(B, N)}
    if with_gen:
        out["gen_labels"] = pad_lists(list(batch["gen_labels"]), int_states.shape[1], IGNORE)
    if with_rec:
        rw = int(items.rec_mask[pos_rows].sum(1).max())
        out.update(rec_states=items.rec_states[pos_rows, :rw], rec_mask=items.rec_mask[pos_rows, :rw],
                   rec_labels=items.rec_labels[pos_rows, :rw])
    if logq is not None:
        out["pos_logq"] = logq[pos_rows]
    if items.image is not None:
        out["pos_image"], out["neg_image"] = items.image[pos_rows], items.image[neg_rows].view(B, N, -1)
    return out
