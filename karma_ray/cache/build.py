"""Build the trunk cache with Ray Data: an actor pool runs the frozen trunk over every fixed-text input.

A cache is reused whenever its key matches (backbone weights, trainable_layers, dtype, prompt settings,
data hash, protocol, evaluation sample) and rebuilt when it does not. It is written into a hidden
staging directory and renamed into place, so a crashed build never leaves a half cache behind.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from karma_ray.cache.store import TrunkCache, cache_key, cache_root, key_hash, to_bytes
from karma_ray.config import KarmaConfig
from karma_ray.data.events import eval_events, load_items, train_events_path
from karma_ray.data.schema import EVENTS_SCHEMA, read_table, validate_events

log = logging.getLogger(__name__)
INPUT_BLOCKS_PER_ACTOR = 4  # few large input blocks: Ray Data starts a task per block to read its schema
TRUNK_TOKENS = 4096  # padded tokens per trunk forward (about 25 training prompts, 200 item texts)
MAP_ROWS = 512  # rows per Ray Data batch: sorted by length into chunks of TRUNK_TOKENS
ROWS_PER_FILE = 64  # small output files, so a seeded block order (trainer.train_dataset) changes the row order


@ray.remote(num_cpus=0)
class RowCounter:
    """Rows done per kind, so the driver can draw the build's progress."""

    def __init__(self) -> None:
        self.done = 0

    def add(self, n: int) -> None:
        self.done += n

    def get(self) -> int:
        return self.done


OUT_SCHEMA = pa.schema([
    ("kind", pa.string()), ("key", pa.int64()), ("length", pa.int32()), ("pos", pa.int32()), ("states", pa.binary()),
    ("rec_length", pa.int32()), ("rec_states", pa.binary()), ("rec_labels", pa.list_(pa.int32())),
    ("gen_labels", pa.list_(pa.int32())), ("target", pa.int64()), ("negatives", pa.list_(pa.int64())),
])  # one schema for every kind, so one actor pool computes them all (unused columns are null)


class TrunkStates:
    """Ray Data callable class: rows of any kind -> their trunk states as rows of OUT_SCHEMA."""

    def __init__(self, config: dict[str, Any], data_dir: str, counter=None, threads: int = 0):
        from karma_ray.data.catalog import ItemCatalog
        from karma_ray.data.prompts import PromptBuilder
        from karma_ray.models.karma import build_model
        from karma_ray.progress import quiet_worker_logs

        quiet_worker_logs()
        cfg = KarmaConfig.from_dict(config)
        self.model, tok = build_model(cfg.model, cfg.loss)
        self.model.eval()
        self.builder = PromptBuilder(tok, ItemCatalog(load_items(data_dir, cfg.model.image_dim)), cfg.data,
                                     cfg.model.image_dim)
        self.counter, self.threads = counter, threads

    @torch.no_grad()
    def _trunk(self, ids: np.ndarray, mask: np.ndarray) -> tuple[list[bytes], np.ndarray]:
        """(n, T) right-padded rows -> each row's (length, d) states as bytes, in the rows' order.

        The trunk runs on chunks taken in order of length, each up to TRUNK_TOKENS padded tokens, so a chunk
        pads only to its own longest row: in stored order, batches of 32 training prompts were 17% padding."""
        lengths = mask.sum(1)
        order = np.argsort(lengths, kind="stable")
        out: list[bytes] = [b""] * len(lengths)
        start = 0
        while start < len(order):
            stop = start + 1  # ascending lengths: a chunk's width is its last row's length
            while stop < len(order) and (stop + 1 - start) * int(lengths[order[stop]]) <= TRUNK_TOKENS:
                stop += 1
            rows, width = order[start:stop], int(lengths[order[stop - 1]])
            x = self.model.trunk(torch.from_numpy(ids[rows, :width]), torch.from_numpy(mask[rows, :width]))  # (b, width, d)
            for j, r in enumerate(rows):
                out[r] = to_bytes(x[j, : lengths[r]])
            start = stop
        return out, lengths.astype(np.int32)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.threads:  # here, not in __init__: Ray Data calls the UDF from its own thread, and a thread
            torch.set_num_threads(self.threads)  # starts at OMP_NUM_THREADS, which Ray sets to the actor's CPUs
        kinds = batch["kind"].to_numpy(zero_copy_only=False)
        parts = [self._rows(kind, batch.filter(pa.array(kinds == kind))) for kind in dict.fromkeys(kinds)]
        if self.counter is not None:
            self.counter.add.remote(batch.num_rows)
        return pa.concat_tables(parts)

    def _rows(self, kind: str, batch: pa.Table) -> pa.Table:
        n, keys = batch.num_rows, batch["key"].to_numpy()
        cols: dict[str, Any] = {"kind": [kind] * n, "key": keys}
        if kind == "items":
            arr = self.builder.items_batch(keys.tolist())
            states, lengths = self._trunk(arr["ids"], arr["mask"])
            rec = self.builder.target_batch(keys.tolist())
            rec_states, rlengths = self._trunk(rec["rec_ids"], rec["rec_mask"])
            cols.update(length=lengths, pos=arr["pos"].astype(np.int32), states=states,
                        rec_length=rlengths, rec_states=rec_states,
                        rec_labels=[row[:m].tolist() for row, m in zip(rec["rec_labels"], rlengths)])
        else:  # "train" (with L_gen's target text after [INT]) or "eval_<split>" (the prompt alone)
            train = kind == "train"
            queries = [q or "" for q in batch["query"].to_pylist()]
            arr = self.builder.interest_batch(queries, batch["history"].to_pylist(),
                                              batch["target"].to_numpy().tolist() if train else None)
            states, lengths = self._trunk(arr["int_ids"], arr["int_mask"])
            cols.update(length=lengths, pos=arr["int_pos"].astype(np.int32), states=states)
            if train:
                cols.update(gen_labels=[row[:m].tolist() for row, m in zip(arr["gen_labels"], lengths)],
                            target=batch["target"], negatives=batch["negatives"])
        return pa.table({f.name: cols.get(f.name, pa.nulls(n, f.type)) for f in OUT_SCHEMA}, schema=OUT_SCHEMA)


def _inputs(cfg: KarmaConfig, data_dir: Path) -> pa.Table:
    """Every row to cache, one table: kind, key (item id, or the row number within its kind), prompt columns."""
    train = read_table(train_events_path(data_dir), EVENTS_SCHEMA, "train")  # stored in a seeded random order
    if cfg.data.train_rows:
        train = train.slice(0, cfg.data.train_rows)
    ids = load_items(data_dir, cfg.model.image_dim)["item_id"].to_numpy()
    train, report = validate_events(train, ids, "train")
    if not report.ok:
        log.warning("trunk cache: %s", report.summary())
    empty = pa.array([], pa.list_(pa.int64()))
    parts = [pa.table({"kind": ["items"] * len(ids), "key": np.sort(ids), "query": pa.nulls(len(ids), pa.string()),
                       "history": pa.nulls(len(ids), empty.type), "target": pa.nulls(len(ids), pa.int64()),
                       "negatives": pa.nulls(len(ids), empty.type)})]
    tables = {"train": train} | {f"eval_{s}": eval_events(data_dir, s, cfg.eval) for s in cfg.data.cache_eval_splits
                                 if (data_dir / f"{s}.parquet").exists()}
    for kind, t in tables.items():
        parts.append(pa.table({"kind": [kind] * t.num_rows, "key": np.arange(t.num_rows), "query": t["query"],
                               "history": t["history"], "target": t["target"], "negatives": t["negatives"]}))
    return pa.concat_tables(parts)


def _build(cfg: KarmaConfig, data_dir: Path, out: Path, progress: bool) -> float:
    """Run the trunk over every input row with one actor pool; write Parquet partitioned by kind."""
    from karma_ray.progress import progress_bar

    table = _inputs(cfg, data_dir)
    counter = RowCounter.remote()
    step = -(-table.num_rows // (INPUT_BLOCKS_PER_ACTOR * cfg.data.cache_actors))
    ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)])
    ds = ds.map_batches(TrunkStates, batch_format="pyarrow", batch_size=MAP_ROWS, num_cpus=1,
                        fn_constructor_kwargs={"config": cfg.to_dict(), "data_dir": str(data_dir.resolve()),
                                               "counter": counter, "threads": cfg.train.torch_threads},
                        compute=ray.data.ActorPoolStrategy(size=cfg.data.cache_actors))
    t0 = time.perf_counter()
    box: dict[str, BaseException] = {}

    def write() -> None:
        try:
            ds.write_parquet(str(out), partition_cols=["kind"], max_rows_per_file=ROWS_PER_FILE)
        except BaseException as e:  # re-raised in the driver thread below
            box["error"] = e

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    with progress_bar(total=table.num_rows, desc="trunk cache", unit="row", enabled=progress) as bar:
        while thread.is_alive():
            thread.join(timeout=1.0)
            bar.update(ray.get(counter.get.remote()) - bar.n)
    ray.kill(counter)
    if "error" in box:
        raise box["error"]
    return time.perf_counter() - t0


def cache_location(cfg: KarmaConfig) -> tuple[dict, Path]:
    """(key, directory) of the config's trunk cache, whether or not it is built (no Ray, no trunk pass)."""
    from karma_ray.models.karma import build_model

    if not cfg.model.trainable_layers:
        raise ValueError("the trunk cache needs a frozen trunk: set model.trainable_layers > 0")
    meta = json.loads((cfg.data_dir / "meta.json").read_text())
    model, _ = build_model(cfg.model, cfg.loss)
    key = cache_key(cfg, model.frozen_fingerprint(), meta["data_hash"])
    return key, cache_root(cfg) / key_hash(key)


def ensure_cache(cfg: KarmaConfig, progress: bool = True) -> TrunkCache:
    """The config's trunk cache: reused when its key matches, else built now (Ray must be connected)."""
    key, root = cache_location(cfg)
    if (root / "key.json").exists():
        log.info("trunk cache hit: %s", root)
        return TrunkCache(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        seconds = round(_build(cfg, cfg.data_dir, stage, progress), 1)
        (stage / "key.json").write_text(json.dumps(key | {"build_seconds": seconds}, indent=2))
        stage.rename(root)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("trunk cache built in %.0f s: %s", seconds, root)
    return TrunkCache(root)


__all__ = ["cache_location", "ensure_cache", "TrunkStates"]
