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
from karma_ray.data.catalog import ItemCatalog
from karma_ray.data.events import load_items, train_events_path, train_targets
from karma_ray.data.schema import EVENTS_SCHEMA, RejectReport, validate_events

log = logging.getLogger(__name__)

EVENT_COLUMNS = EVENTS_SCHEMA.names


def click_log_share(data_dir: str | Path, catalog: ItemCatalog) -> np.ndarray:
    """log q_i: each catalogue item's share of training clicks (add-one smoothed; cold items get the floor).

    L_act's in-batch negatives are the batch's clicked targets, so they are drawn with probability q;
    the loss subtracts log q to undo that sampling bias.
    """
    return catalog.log_click_share(train_targets(data_dir))


class TokenizeEvents:
    """Ray Data callable class: validates a batch of events, then builds KarmaModel inputs.

    Rejected rows (unknown ids, nulls) are counted and logged with examples, never dropped silently.
    """

    def __init__(self, config: dict[str, Any], data_dir: str, tally=None):
        from karma_ray.data.prompts import PromptBuilder
        from karma_ray.models.backbone import load_tokenizer

        cfg = KarmaConfig.from_dict(config)
        catalog = ItemCatalog(load_items(data_dir, cfg.model.image_dim))
        self.builder = PromptBuilder(load_tokenizer(cfg.model.backbone), catalog, cfg.data, cfg.model.image_dim)
        if cfg.loss.logq_correction:
            self.builder.item_logq = click_log_share(data_dir, catalog)
        self.with_gen = cfg.loss.lambda_gen > 0
        self.with_rec = cfg.loss.lambda_rec > 0
        self.rejects = RejectReport(table="events", total_rows=0, rejected=0, reasons={}, examples=[])
        self.tally = tally  # trainer.RejectTally: the run's total, for its reports and manifest

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        kept, report = validate_events(batch, self.builder.item_ids)
        self.rejects = self.rejects.merge(report)
        if not report.ok:
            log.warning("tokenizer dropped invalid rows: %s (running total: %d)", report.summary(), self.rejects.rejected)
            if self.tally is not None:
                self.tally.add.remote(report.to_dict())
        cols = {name: kept.column(name).to_pylist() for name in ("query", "history", "target", "negatives")}
        return self.builder.training_batch(cols, self.with_gen, self.with_rec)


def build_train_dataset(cfg: KarmaConfig, tally=None) -> ray.data.Dataset:
    """Lazy Dataset of tokenised training rows (one row per event, fixed-width arrays)."""
    path = train_events_path(cfg.data_dir)
    ds = ray.data.read_parquet(str(path), columns=EVENT_COLUMNS, num_cpus=cfg.data.read_num_cpus)
    if cfg.data.train_rows:
        ds = ds.limit(cfg.data.train_rows)  # rows are stored in a seeded random order: a seeded subset
    return ds.map_batches(
        TokenizeEvents,
        fn_constructor_kwargs={"config": cfg.to_dict(), "data_dir": str(cfg.data_dir.resolve()), "tally": tally},
        batch_format="pyarrow",
        batch_size=256,
        compute=ray.data.ActorPoolStrategy(size=cfg.data.tokenize_actors),
        num_cpus=cfg.data.tokenize_num_cpus,
    )
