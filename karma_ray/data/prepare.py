"""Build a dataset directory (items, splits, impressions, meta.json) from a named source.

Layout written under `out_dir` (all parquet, zstd):

    items.parquet
    train/part-00000.parquet ...        train events (seeded random row order), `rows_per_file` rows per part
    valid.parquet test.parquet valid_cold.parquet test_cold.parquet
    impressions/train.parquet impressions/test.parquet
    meta.json                           written last: its presence marks a complete dataset

Files are first written to a staging directory next to `out_dir` and then moved in, so a
crash never leaves a half-old / half-new dataset (and stale train parts from a previous,
larger run are removed). Every table is validated before writing; reports go to the log and
to meta.json, and more than 1% rejected rows aborts, because that means a bug upstream.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from karma_ray.data.movielens import load_movielens, ratings_to_clicks
from karma_ray.data.schema import (
    EVENTS_SCHEMA,
    IMPRESSIONS_SCHEMA,
    DataValidationError,
    RejectReport,
    items_schema,
    validate_events,
    validate_impressions,
    validate_items,
)
from karma_ray.data.split import EVAL_SPLITS, Splits, build_splits
from karma_ray.data.synthetic import SyntheticConfig, generate_synthetic

__all__ = ["DATASETS", "MAX_REJECT_FRAC", "SCHEMA_VERSION", "prepare_dataset", "compute_data_hash"]

log = logging.getLogger(__name__)

DATASETS = ("movielens", "synthetic")
MAX_REJECT_FRAC = 0.01
SCHEMA_VERSION = 3
_MANAGED = ("items.parquet", "train", *(f"{s}.parquet" for s in EVAL_SPLITS), "impressions", "meta.json")


def prepare_dataset(
    dataset: str,
    out_dir: str | Path,
    *,
    protocol: str = "cold",
    n_items: int = 2000,
    n_users: int = 400,
    image_dim: int = 0,
    cold_frac: float = 0.1,
    max_history: int = 50,
    seed: int = 0,
    rows_per_file: int = 50_000,
) -> dict:
    """Generate/load `dataset`, split it under `protocol`, validate every table, write it to `out_dir`.

    n_items / n_users / image_dim only apply to "synthetic" (MovieLens has a fixed catalogue
    and no images). Returns meta (also written as meta.json).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be >= 1, got {rows_per_file}")
    params = {"protocol": protocol, "cold_frac": cold_frac if protocol == "cold" else 0.0, "max_history": max_history,
              "rows_per_file": rows_per_file}
    if dataset == "synthetic":
        cfg = SyntheticConfig(n_items=n_items, n_users=n_users, image_dim=image_dim, seed=seed)
        items, clicks = generate_synthetic(cfg)
        params.update({k: v for k, v in vars(cfg).items() if k != "seed"})
    else:
        if image_dim:
            raise ValueError("image_dim > 0 is only supported for the synthetic dataset (MovieLens has no images)")
        items, ratings = load_movielens()
        clicks = ratings_to_clicks(ratings)
        params.update({"min_rating": 4, "max_negatives": 8})
    items, rejects = _validated_items(items, image_dim)
    splits = build_splits(items, clicks, protocol=protocol, cold_frac=cold_frac, max_history=max_history, seed=seed)
    tables, more = _validated_splits(splits, items["item_id"].to_numpy())
    rejects.update(more)
    meta = {
        "dataset": dataset,
        "protocol": protocol,
        "schema_version": SCHEMA_VERSION,
        "seed": seed,
        "params": params,
        "n_items": items.num_rows,
        "n_users": int(len(np.unique(clicks["user_id"].to_numpy()))),
        "counts": {"items": items.num_rows, **{k: t.num_rows for k, t in tables.items()}},
        "cold_item_ids": splits.cold_item_ids.tolist(),
        "rejects": {k: r.to_dict() for k, r in rejects.items()},
    }
    return _write_all(Path(out_dir), items, tables, meta, rows_per_file)


def _check(table: pa.Table, report: RejectReport) -> pa.Table:
    """Log the report; abort when too much is rejected (that is a bug, not noise)."""
    log.info("validate %s", report.summary())
    if report.rejected_frac > MAX_REJECT_FRAC:
        raise DataValidationError(
            f"{report.summary()} — more than {MAX_REJECT_FRAC:.0%} of rows rejected; refusing to write"
        )
    return table


def _validated_items(items: pa.Table, image_dim: int) -> tuple[pa.Table, dict[str, RejectReport]]:
    kept, report = validate_items(items)
    kept = kept.select(items_schema(image_dim).names).cast(items_schema(image_dim))
    return _check(kept, report), {"items": report}


def _validated_splits(splits: Splits, item_ids: np.ndarray) -> tuple[dict[str, pa.Table], dict[str, RejectReport]]:
    tables: dict[str, pa.Table] = {}
    reports: dict[str, RejectReport] = {}
    for name, table in splits.events().items():
        kept, reports[name] = validate_events(table, item_ids, name=name)
        tables[name] = _check(kept.cast(EVENTS_SCHEMA), reports[name])
    for name, table in {"train_impressions": splits.train_impressions, "test_impressions": splits.test_impressions}.items():
        kept, reports[name] = validate_impressions(table, item_ids, name=name)
        tables[name] = _check(kept.cast(IMPRESSIONS_SCHEMA), reports[name])
    return tables, reports


def _write_parquet(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd")


def _write_all(out_dir: Path, items: pa.Table, tables: dict[str, pa.Table], meta: dict, rows_per_file: int) -> dict:
    """Write into a staging dir, hash, then swap the managed paths into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out_dir))
    try:
        _write_parquet(items, stage / "items.parquet")
        # Stored in a seeded random order: a streamed epoch (Ray Data reads parts in order) is then an
        # i.i.d. stream without a global shuffle. In user/time order a batch would hold one user's
        # consecutive clicks, and its in-batch negatives would be that user's own next items.
        train = tables["train"]
        train = train.take(pa.array(np.random.default_rng(meta["seed"]).permutation(train.num_rows)))
        n_parts = max(1, -(-train.num_rows // rows_per_file))
        for i in range(n_parts):
            _write_parquet(train.slice(i * rows_per_file, rows_per_file), stage / "train" / f"part-{i:05d}.parquet")
        for name in EVAL_SPLITS:
            _write_parquet(tables[name], stage / f"{name}.parquet")
        _write_parquet(tables["train_impressions"], stage / "impressions" / "train.parquet")
        _write_parquet(tables["test_impressions"], stage / "impressions" / "test.parquet")
        meta["data_hash"] = compute_data_hash(stage)
        meta["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        (stage / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _swap_in(stage, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("wrote %s dataset to %s (%s)", meta["dataset"], out_dir, meta["counts"])
    return meta


def _swap_in(stage: Path, out_dir: Path) -> None:
    """Replace the managed entries of out_dir by the staged ones; meta.json goes last."""
    (out_dir / "meta.json").unlink(missing_ok=True)  # dataset is "incomplete" while swapping
    for name in _MANAGED:
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        if name != "meta.json":
            (stage / name).rename(target)
    (stage / "meta.json").rename(out_dir / "meta.json")


def compute_data_hash(data_dir: str | Path) -> str:
    """sha256 over the dataset's parquet files' bytes, in sorted relative-path order.

    meta.json and hidden entries (staging dirs) are excluded. Each file contributes its
    relative path, a NUL, and its bytes, so renaming a file also changes the hash.
    """
    root = Path(data_dir)
    h = hashlib.sha256()
    files = sorted(
        p for p in root.rglob("*.parquet") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    for path in files:
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def prepare_for_config(cfg) -> dict:
    """Prepare `cfg.data_dir` from the config's data section and protocol (the one mapping config -> split)."""
    d = cfg.data
    return prepare_dataset(d.dataset, cfg.data_dir, protocol=cfg.eval.protocol, n_items=d.n_items, n_users=d.n_users,
                           image_dim=d.image_dim, cold_frac=d.cold_frac, max_history=d.max_history, seed=d.seed,
                           rows_per_file=d.rows_per_file)


def ensure_prepared(cfg) -> Path:
    """Prepare the config's split on first use (so `python jobs/train.py` needs no other step); return its dir.

    An existing split prepared under another protocol or schema version is an error, never silently reused.
    """
    meta_path = cfg.data_dir / "meta.json"
    if not meta_path.exists():
        log.warning("no prepared data at %s; preparing %s (%s protocol) now", cfg.data_dir, cfg.data.dataset,
                    cfg.eval.protocol)
        prepare_for_config(cfg)
        return cfg.data_dir
    meta = json.loads(meta_path.read_text())
    if meta.get("protocol") != cfg.eval.protocol or meta.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{cfg.data_dir} holds a {meta.get('protocol')!r} split of schema version "
                         f"{meta.get('schema_version')}; expected {cfg.eval.protocol!r} v{SCHEMA_VERSION}. "
                         "Delete it (it is re-prepared on first use) or point data.path elsewhere")
    return cfg.data_dir
