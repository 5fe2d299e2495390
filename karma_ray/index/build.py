"""Item embeddings → FAISS index → a versioned artifact directory (DESIGN §5).

artifacts/<run>/
  manifest.json        config, data hash, metrics, versions, created_at, file list
  encoder/             HF safetensors + tokenizer (the fine-tuned, truncated LM)
  heads.safetensors    W_e, W_h, P(·), image heads, temperature
  karma_model.json     model/loss config + special-token ids (what `KarmaModel.load` needs)
  items.parquet        item ids and text
  item_emb.npy         (N, emb) float32, row i ↔ items.parquet row i
  index.faiss          inner-product index whose ids are item ids
artifacts/latest -> <run>
Everything is safetensors / numpy (allow_pickle=False) / parquet / faiss / JSON: loading never unpickles.
"""
from __future__ import annotations

import json
import os
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from karma_ray.config import IndexConfig
from karma_ray.data.prompts import PromptBuilder
from karma_ray.models.karma import KarmaModel

MANIFEST_VERSION = 1
PACKAGES = ("karma-ray", "torch", "transformers", "ray", "faiss-cpu", "pyarrow", "numpy", "safetensors")


@torch.no_grad()
def embed_items(model: KarmaModel, builder: PromptBuilder, item_ids: np.ndarray, batch_size: int = 64,
                show_progress: bool = True) -> np.ndarray:
    """(N,) item ids → (N, emb) float32 unit vectors, in the order given."""
    model.eval()
    out = []
    for start in tqdm(range(0, len(item_ids), batch_size), desc="embed items", unit="batch", disable=not show_progress):
        arr = builder.items_batch(item_ids[start : start + batch_size].tolist())
        width = int(arr["mask"].sum(1).max())
        t = {k: torch.from_numpy(v) for k, v in arr.items()}
        out.append(model.encode_items(t["ids"][:, :width], t["mask"][:, :width], t["pos"], t.get("image")).numpy())
    return np.concatenate(out).astype(np.float32)


@torch.no_grad()
def embed_interests(model: KarmaModel, builder: PromptBuilder, queries: list[str], histories: list[list[int]],
                    batch_size: int = 32, show_progress: bool = False) -> np.ndarray:
    model.eval()
    out = []
    for start in tqdm(range(0, len(queries), batch_size), desc="embed interests", unit="batch", disable=not show_progress):
        arr = builder.interest_batch(queries[start : start + batch_size], histories[start : start + batch_size])
        width = int(arr["int_mask"].sum(1).max())
        t = {k: torch.from_numpy(v) for k, v in arr.items()}
        out.append(model.encode_interest(t["int_ids"][:, :width], t["int_mask"][:, :width], t["int_pos"]).numpy())
    return np.concatenate(out).astype(np.float32)


def build_faiss(item_emb: np.ndarray, item_ids: np.ndarray, cfg: IndexConfig) -> faiss.Index:
    """Inner-product index (embeddings are unit vectors, so IP = cosine) keyed by item id."""
    d = item_emb.shape[1]
    if cfg.kind == "hnsw":
        base = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    elif cfg.kind == "ivf":
        nlist = max(1, min(cfg.ivf_nlist, len(item_emb) // 39))  # FAISS wants ~39 points per centroid
        base = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        base.train(item_emb)
    else:
        base = faiss.IndexFlatIP(d)
    index = faiss.IndexIDMap2(base)
    index.add_with_ids(np.ascontiguousarray(item_emb, dtype=np.float32), item_ids.astype(np.int64))
    return index


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_artifact(out_dir: Path, model: KarmaModel, tokenizer, items: pa.Table, item_emb: np.ndarray,
                   index: faiss.Index, manifest: dict[str, Any]) -> Path:
    """Write every artifact file; manifest.json last, so its presence means the artifact is complete."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(out_dir, tokenizer)
    pq.write_table(items, out_dir / "items.parquet")
    np.save(out_dir / "item_emb.npy", item_emb, allow_pickle=False)
    faiss.write_index(index, str(out_dir / "index.faiss"))
    files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    manifest = {"manifest_version": MANIFEST_VERSION, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "versions": package_versions(), "files": files, "n_items": int(len(item_emb)),
                "emb_dim": int(item_emb.shape[1]), **manifest}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, default=_json_default))
    return out_dir


def point_latest(artifacts_dir: Path, run_dir: Path) -> Path:
    """Atomically repoint artifacts/latest at run_dir (a relative symlink, so the tree can move)."""
    link = artifacts_dir / "latest"
    tmp = artifacts_dir / f".latest-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)
    return link


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)
