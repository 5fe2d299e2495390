"""A finished training checkpoint -> a new artifact version (encoder, heads, item embeddings, FAISS, manifest)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load_model

from karma_ray.artifact.faiss_index import build_faiss
from karma_ray.artifact.writer import write_artifact
from karma_ray.config import KarmaConfig
from karma_ray.data.catalog import ItemCatalog
from karma_ray.data.pipeline import load_items
from karma_ray.data.prompts import PromptBuilder
from karma_ray.data.schema import EVENTS_SCHEMA, read_table
from karma_ray.eval.evaluate import evaluate_split
from karma_ray.models.inference import embed_items
from karma_ray.models.karma import build_model

EXPORT_EVAL_EVENTS = 1000  # per split: a quick HR/NDCG for the manifest, not the full evaluation protocol


def _sample(table: pa.Table, n: int, seed: int) -> pa.Table:
    """A seeded random subset of at most n rows (the manifest's quick metrics, not the paper's table)."""
    if table.num_rows <= n:
        return table
    rows = np.sort(np.random.default_rng(seed).choice(table.num_rows, n, replace=False))
    return table.take(pa.array(rows))


def export_artifact(cfg: KarmaConfig, checkpoint_dir: str | Path, run_name: str, train_metrics: dict[str, Any],
                    show_progress: bool = True) -> Path:
    """Checkpoint → artifacts/<run>/ with encoder, heads, item embeddings, FAISS index and manifest."""
    model, tok = build_model(cfg.model, cfg.loss)
    load_model(model, str(Path(checkpoint_dir) / "model.safetensors"))
    model.eval()
    data_dir = Path(cfg.data.path)
    catalog = ItemCatalog(load_items(data_dir, cfg.model.image_dim))
    builder = PromptBuilder(tok, catalog, cfg.data, cfg.model.image_dim)
    item_emb = embed_items(model, builder, catalog.ids, cfg.index.embed_batch_size, show_progress)
    index = build_faiss(item_emb, catalog.ids, cfg.index)
    metrics = dict(train_metrics)
    with torch.no_grad():
        for split in ("test", "test_cold"):
            path = data_dir / f"{split}.parquet"
            if path.exists():
                events = _sample(read_table(path, EVENTS_SCHEMA, split), EXPORT_EVAL_EVENTS, cfg.data.seed)
                metrics.update(evaluate_split(model, builder, index, events, prefix=f"{split}/"))
    meta_path = data_dir / "meta.json"
    data_meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    out = Path(cfg.train.artifacts_dir).resolve() / run_name
    return write_artifact(out, model, tok, catalog.table, item_emb, index, {
        "run_name": run_name, "config": cfg.to_dict(), "metrics": metrics,
        "data": {"path": str(data_dir.resolve()), "dataset": data_meta.get("dataset"),
                 "data_hash": data_meta.get("data_hash"), "counts": data_meta.get("counts")},
        "checkpoint": str(checkpoint_dir),
    })
