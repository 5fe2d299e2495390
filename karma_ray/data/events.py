"""Read a prepared split (torch- and Ray-free): items, training events, and the evaluation events."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from karma_ray.data.schema import EVENTS_SCHEMA, items_schema, read_table

COLD_SPLITS = ("valid_cold", "test_cold")


def load_items(data_dir: str | Path, image_dim: int = 0) -> pa.Table:
    return read_table(Path(data_dir) / "items.parquet", items_schema(image_dim), "items")


def train_events_path(data_dir: str | Path) -> Path:
    path = Path(data_dir) / "train"
    if not path.exists():
        raise FileNotFoundError(f"no training events at {path}; run `python jobs/prepare_data.py` first")
    return path


def train_targets(data_dir: str | Path) -> np.ndarray:
    """Every training click's item id (what popularity and the logQ correction count). Reads one column."""
    import pyarrow.dataset as pads

    table = pads.dataset(str(train_events_path(data_dir)), format="parquet").to_table(columns=["target"])
    return table.column("target").to_numpy()


def sample_rows(n: int, max_rows: int, seed: int) -> np.ndarray:
    """Sorted positions of a seeded sample of `max_rows` of n rows (all n when max_rows is 0 or ≥ n)."""
    if not max_rows or n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))


def load_events(data_dir: str | Path, split: str, max_events: int = 0, seed: int = 0) -> pa.Table:
    """One evaluation split; with `max_events`, a seeded sample of that many events (same seed -> same rows)."""
    path = Path(data_dir) / f"{split}.parquet"
    if not path.exists():
        raise FileNotFoundError(f"no {split} events at {path}; prepare the data with jobs/prepare_data.py")
    table = read_table(path, EVENTS_SCHEMA, split)
    if max_events and table.num_rows > max_events:
        table = table.take(pa.array(sample_rows(table.num_rows, max_events, seed)))
    return table


def eval_events(data_dir: str | Path, split: str, eval_cfg) -> pa.Table:
    """The events a protocol scores on `split` (cold splits are sampled: they cluster on few items)."""
    cap = eval_cfg.max_cold_events if split in COLD_SPLITS else eval_cfg.max_events
    return load_events(data_dir, split, cap, eval_cfg.seed)
