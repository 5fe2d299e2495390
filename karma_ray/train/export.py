"""A finished training checkpoint -> a new artifact version (encoder, heads, item embeddings, FAISS, manifest)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from safetensors.torch import load as load_bytes

from karma_ray.artifact import storage
from karma_ray.artifact.faiss_index import build_faiss, build_shards
from karma_ray.artifact.writer import write_artifact
from karma_ray.config import KarmaConfig
from karma_ray.data.catalog import ItemCatalog
from karma_ray.data.events import load_items, sample_rows
from karma_ray.data.prompts import PromptBuilder
from karma_ray.models.inference import embed_items
from karma_ray.models.karma import build_model

EXPORT_EVAL_EVENTS = 300  # per split: a quick HR/NDCG for the manifest, not the full evaluation protocol


def quick_metrics(model, builder: PromptBuilder, index, data_dir: Path, cfg: KarmaConfig, cache=None) -> dict[str, Any]:
    """HR/NDCG@{10,50} through the FAISS index on a seeded sample of each test split's events: a sanity
    figure for the manifest, not the protocol (`jobs/evaluate.py` and `benchmarks/quality.py` run that).
    From the trunk cache where it holds the split (only the top layers run), else at full depth."""
    from karma_ray.eval.evaluate import SplitEvents, index_metrics
    from karma_ray.models.inference import CachedInputs, TokenInputs, embed

    out: dict[str, Any] = {}
    sample = dataclasses.replace(cfg.eval, max_events=EXPORT_EVAL_EVENTS, max_cold_events=EXPORT_EVAL_EVENTS)
    for split in ("test", "test_cold"):
        if not (data_dir / f"{split}.parquet").exists():
            continue
        if cache is not None and split in cache.eval_splits:
            s = SplitEvents.load(data_dir, split, cfg.eval)  # the events the cache holds, in its order
            rows = sample_rows(s.events.num_rows, EXPORT_EVAL_EVENTS, cfg.eval.seed)
            events = s.events.take(rows)
            batches = CachedInputs(cache, 32).interests(split, by_length=True, events=rows)
        else:
            events = SplitEvents.load(data_dir, split, sample).events
            batches = TokenInputs(builder, 32).interests([q or "" for q in events.column("query").to_pylist()],
                                                         events.column("history").to_pylist())
        out.update(index_metrics(index, embed(model, batches, "interest"), events, prefix=f"{split}/"))
    return out


class EmbedItems:
    """Ray Data callable class: item ids -> e_i at full depth, with the run's trained weights (one model per actor)."""

    def __init__(self, config: dict[str, Any], data_dir: str, weights: ray.ObjectRef, batch_size: int, threads: int = 0):
        from safetensors.torch import load as load_bytes

        from karma_ray.progress import quiet_worker_logs

        quiet_worker_logs()
        cfg = KarmaConfig.from_dict(config)
        self.model, tok = build_model(cfg.model, cfg.loss)
        self.model.load_trainable_state(load_bytes(ray.get(weights)), "the exported checkpoint")
        self.builder = PromptBuilder(tok, ItemCatalog(load_items(data_dir, cfg.model.image_dim)), cfg.data,
                                     cfg.model.image_dim)
        self.batch_size, self.threads = batch_size, threads

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.threads:  # per call: Ray Data runs the UDF in its own thread (see cache.build.TrunkStates)
            torch.set_num_threads(self.threads)
        emb = embed_items(self.model, self.builder, batch["item_id"], self.batch_size, show_progress=False)
        return {"item_id": batch["item_id"], "emb": emb}


def embed_catalog(cfg: KarmaConfig, weights: bytes, catalog: ItemCatalog, actors: int, progress: bool = True) -> np.ndarray:
    """(N, emb) item embeddings in catalogue order, computed by a Ray Data actor pool (GPUs when training
    used them), so a 10M-item catalogue is spread over the cluster instead of the driver."""
    from karma_ray.progress import progress_bar

    ds = ray.data.from_items([{"item_id": int(i)} for i in catalog.ids], override_num_blocks=max(actors * 4, 1))
    ds = ds.map_batches(EmbedItems, batch_size=cfg.index.embed_batch_size * 4, num_gpus=1 if cfg.train.use_gpu else 0,
                        num_cpus=1, compute=ray.data.ActorPoolStrategy(size=actors),
                        # The weights go through the object store: inline they would ride in the UDF's
                        # pickle (~150 MB for the demo preset) to every actor and into Ray Data's warnings.
                        fn_constructor_kwargs={"config": cfg.to_dict(), "data_dir": str(cfg.data_dir.resolve()),
                                               "weights": ray.put(weights), "batch_size": cfg.index.embed_batch_size,
                                               "threads": cfg.train.torch_threads})
    emb = np.zeros((len(catalog), 0), np.float32)
    with progress_bar(total=len(catalog), desc="embed items", unit="item", enabled=progress) as bar:
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            if emb.shape[1] == 0:
                emb = np.zeros((len(catalog), batch["emb"].shape[1]), np.float32)
            emb[catalog.rows_of(batch["item_id"])] = batch["emb"]
            bar.update(len(batch["item_id"]))
    return emb


def embed_cached_catalog(model, cache, catalog: ItemCatalog, cfg: KarmaConfig, progress: bool = True) -> np.ndarray:
    """(N, emb) item embeddings in catalogue order from the trunk cache: the frozen trunk's output for
    every item text is already there, so only the trained top layers run, in the driver, on the same
    states the serving trunk computes."""
    from karma_ray.models.inference import CachedInputs, embed

    image = catalog.image if cfg.model.image_dim else None
    batches = CachedInputs(cache, cfg.index.embed_batch_size, image).items(catalog.ids)
    return embed(model, batches, "item", total=len(catalog), desc="embed items", progress=progress)


def export_artifact(cfg: KarmaConfig, checkpoint_dir: str | Path, run_name: str, train_metrics: dict[str, Any],
                    show_progress: bool = True, cache=None, checkpoint_uri: str | None = None) -> str | Path:
    """Checkpoint → <train.artifacts_dir>/<run>/ (a directory, or an s3:// prefix) with encoder, heads, item
    embeddings, FAISS index and manifest; `checkpoint_uri` is where the checkpoint lives when
    `checkpoint_dir` is a local copy of it."""
    weights = (Path(checkpoint_dir) / "model.safetensors").read_bytes()
    model, tok = build_model(cfg.model, cfg.loss)
    model.load_trainable_state(load_bytes(weights), str(checkpoint_dir))
    model.eval()
    data_dir = cfg.data_dir
    catalog = ItemCatalog(load_items(data_dir, cfg.model.image_dim))
    builder = PromptBuilder(tok, catalog, cfg.data, cfg.model.image_dim)
    item_emb = (embed_cached_catalog(model, cache, catalog, cfg, show_progress) if cache is not None
                else embed_catalog(cfg, weights, catalog, cfg.index.embed_actors, show_progress))
    index = build_faiss(item_emb, catalog.ids, cfg.index)
    shards = build_shards(item_emb, catalog.ids, cfg.index, cfg.index.shards) if cfg.index.shards > 1 else []
    metrics = dict(train_metrics) | quick_metrics(model, builder, index, data_dir, cfg, cache)
    meta_path = data_dir / "meta.json"
    data_meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    out = storage.join(cfg.train.artifacts_dir if storage.is_remote(cfg.train.artifacts_dir)
                       else Path(cfg.train.artifacts_dir).resolve(), run_name)
    return write_artifact(out, model, tok, catalog.table, item_emb, index, {
        "run_name": run_name, "config": cfg.to_dict(), "metrics": metrics,
        "data": {"path": str(data_dir.resolve()), "dataset": data_meta.get("dataset"),
                 "data_hash": data_meta.get("data_hash"), "counts": data_meta.get("counts")},
        "checkpoint": checkpoint_uri or str(checkpoint_dir),
    }, shards=shards)
