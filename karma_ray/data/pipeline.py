"""Ray Data: stream event parquet → validate + tokenise (actor pool) → fixed-width numpy batches.

Nothing here materialises the dataset in the driver: `read_parquet` is lazy, tokenisation runs
in a pool of `TokenizeEvents` actors (each loads the tokenizer and the item catalogue once), and
Ray Train workers pull their shard with `iter_torch_batches`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from karma_ray.config import KarmaConfig
from karma_ray.data.schema import EVENTS_SCHEMA, RejectReport, items_schema, read_table, validate_events

log = logging.getLogger(__name__)

EVENT_COLUMNS = EVENTS_SCHEMA.names


def train_events_path(data_dir: str | Path) -> Path:
    path = Path(data_dir) / "train"
    if not path.exists():
        raise FileNotFoundError(f"no training events at {path}; run `python jobs/prepare_data.py --out {data_dir}` first")
    return path


def load_items(data_dir: str | Path, image_dim: int = 0) -> pa.Table:
    return read_table(Path(data_dir) / "items.parquet", items_schema(image_dim), "items")


def click_log_share(data_dir: str | Path, item_ids: np.ndarray) -> np.ndarray:
    """log q_i: each catalogue item's share of training clicks, add-one smoothed (cold items get the floor).

    L_act's in-batch negatives are the batch's clicked targets, so they are drawn with probability q;
    the loss subtracts log q to undo that sampling bias. Reads only the `target` column.
    """
    import pyarrow.dataset as pads

    targets = pads.dataset(str(train_events_path(data_dir)), format="parquet").to_table(columns=["target"])
    ids, counts = np.unique(targets.column("target").to_numpy(), return_counts=True)
    item_ids = np.asarray(item_ids, np.int64)
    per_item = np.zeros(len(item_ids), np.float64)
    pos = np.searchsorted(item_ids, ids)
    ok = (pos < len(item_ids)) & (item_ids[np.minimum(pos, len(item_ids) - 1)] == ids)
    per_item[pos[ok]] = counts[ok]
    return np.log((per_item + 1.0) / (per_item.sum() + len(item_ids))).astype(np.float32)


class TokenizeEvents:
    """Ray Data callable class: validates a batch of events, then builds KarmaModel inputs.

    Rejected rows (unknown ids, nulls) are counted and logged with examples, never dropped silently.
    """

    def __init__(self, config: dict[str, Any], data_dir: str):
        from karma_ray.data.prompts import PromptBuilder
        from karma_ray.models.backbone import load_tokenizer

        cfg = KarmaConfig.from_dict(config)
        items = load_items(data_dir, cfg.model.image_dim)
        self.builder = PromptBuilder(load_tokenizer(cfg.model.backbone), items, cfg.data, cfg.model.image_dim)
        if cfg.loss.logq_correction:
            self.builder.item_logq = click_log_share(data_dir, self.builder.item_ids)
        self.with_gen = cfg.loss.lambda_gen > 0
        self.with_rec = cfg.loss.lambda_rec > 0
        self.rejects = RejectReport(table="events", total_rows=0, rejected=0, reasons={}, examples=[])

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        kept, report = validate_events(batch, self.builder.item_ids)
        self.rejects = self.rejects.merge(report)
        if not report.ok:
            log.warning("tokenizer dropped invalid rows: %s (running total: %d)", report.summary(), self.rejects.rejected)
        cols = {name: kept.column(name).to_pylist() for name in ("query", "history", "target", "negatives")}
        return self.builder.training_batch(cols, self.with_gen, self.with_rec)


def build_train_dataset(cfg: KarmaConfig) -> ray.data.Dataset:
    """Lazy Dataset of tokenised training rows (one row per event, fixed-width arrays)."""
    path = train_events_path(cfg.data.path)
    ds = ray.data.read_parquet(str(path), columns=EVENT_COLUMNS, num_cpus=cfg.data.read_num_cpus)
    return ds.map_batches(
        TokenizeEvents,
        fn_constructor_kwargs={"config": cfg.to_dict(), "data_dir": str(Path(cfg.data.path).resolve())},
        batch_format="pyarrow",
        batch_size=256,
        compute=ray.data.ActorPoolStrategy(size=cfg.data.tokenize_actors),
        num_cpus=cfg.data.tokenize_num_cpus,
    )


def count_train_rows(cfg: KarmaConfig) -> int:
    """Row count from parquet footers only (no data is read)."""
    import pyarrow.parquet as pq

    files = sorted(train_events_path(cfg.data.path).glob("*.parquet"))
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
