"""Turn a finished training checkpoint into an artifact, and load an artifact back (no unpickling)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_model

from karma_ray.config import KarmaConfig
from karma_ray.data.pipeline import load_items
from karma_ray.data.prompts import PromptBuilder
from karma_ray.data.schema import EVENTS_SCHEMA, read_table
from karma_ray.eval.retrieval import exclude_and_cut, retrieval_metrics, target_ranks
from karma_ray.index.build import build_faiss, embed_interests, embed_items, point_latest, write_artifact
from karma_ray.models.karma import KarmaModel, build_model

EXPORT_EVAL_EVENTS = 1000  # per split: a quick HR/NDCG for the manifest, not the full evaluation protocol
REQUIRED_FILES = ("manifest.json", "encoder/config.json", "heads.safetensors", "karma_model.json",
                  "items.parquet", "item_emb.npy", "index.faiss")


@dataclass
class Artifact:
    path: Path
    manifest: dict[str, Any]
    config: KarmaConfig
    model: KarmaModel
    tokenizer: Any
    items: pa.Table
    item_emb: np.ndarray
    index: faiss.Index
    builder: PromptBuilder

    @property
    def version(self) -> str:
        return str(self.manifest.get("run_name", self.path.name))


def resolve_artifact(path: str | Path) -> Path:
    """Follow `latest` and check every contract file is there, naming what is missing."""
    p = Path(path).resolve()
    if not p.exists():
        raise FileNotFoundError(f"artifact {path} does not exist; run `python jobs/train.py` first")
    missing = [f for f in REQUIRED_FILES if not (p / f).exists()]
    if missing:
        raise FileNotFoundError(f"artifact {p} is incomplete, missing: {', '.join(missing)}")
    return p


def load_artifact(path: str | Path, attn_implementation: str = "sdpa") -> Artifact:
    p = resolve_artifact(path)
    manifest = json.loads((p / "manifest.json").read_text())
    cfg = KarmaConfig.from_dict(manifest["config"])
    model, tok = KarmaModel.load(p, attn_implementation)
    items = pq.read_table(p / "items.parquet")
    item_emb = np.load(p / "item_emb.npy", allow_pickle=False)
    index = faiss.read_index(str(p / "index.faiss"))
    builder = PromptBuilder(tok, items, cfg.data, cfg.model.image_dim)
    return Artifact(p, manifest, cfg, model, tok, items, item_emb, index, builder)


def evaluate_split(model: KarmaModel, builder: PromptBuilder, index: faiss.Index, events: pa.Table,
                   ks=(10, 50), prefix: str = "", batch_size: int = 32) -> dict[str, float]:
    """HR/NDCG@K over the full catalogue, excluding each user's earlier history items."""
    if events.num_rows == 0:
        return {f"{prefix}n": 0}
    queries = events.column("query").to_pylist()
    histories = events.column("history").to_pylist()
    h = embed_interests(model, builder, queries, histories, batch_size)
    depth = max(ks) + max((len(x) for x in histories), default=0)
    scores, ids = index.search(h, min(depth, index.ntotal))
    topk, _ = exclude_and_cut(ids, scores, histories, max(ks))
    return retrieval_metrics(target_ranks(topk, events.column("target").to_numpy()), ks, prefix)


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
    items = load_items(data_dir, cfg.model.image_dim)
    builder = PromptBuilder(tok, items, cfg.data, cfg.model.image_dim)
    item_ids = items.column("item_id").to_numpy()
    item_emb = embed_items(model, builder, item_ids, cfg.index.embed_batch_size, show_progress)
    index = build_faiss(item_emb, item_ids, cfg.index)
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
    write_artifact(out, model, tok, items, item_emb, index, {
        "run_name": run_name, "config": cfg.to_dict(), "metrics": metrics,
        "data": {"path": str(data_dir.resolve()), "dataset": data_meta.get("dataset"),
                 "data_hash": data_meta.get("data_hash"), "counts": data_meta.get("counts")},
        "checkpoint": str(checkpoint_dir),
    })
    point_latest(out.parent, out)
    return out
