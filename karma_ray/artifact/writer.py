"""Write one immutable artifact version (staged, then renamed into place; manifest last)."""
from __future__ import annotations

import json
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from karma_ray.artifact import storage
from karma_ray.artifact.faiss_index import shard_path
from karma_ray.artifact.layout import MANIFEST, json_default, point_latest, staged_dir

MANIFEST_VERSION = 2
PACKAGES = ("karma-ray", "torch", "transformers", "ray", "faiss-cpu", "pyarrow", "numpy", "safetensors")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_artifact(out_dir: str | Path, model, tokenizer, items: pa.Table, item_emb: np.ndarray,
                   index: faiss.Index, manifest: dict[str, Any], publish: bool = True,
                   shards: Sequence[faiss.Index] = ()) -> str | Path:
    """Write a new version `out_dir` (a directory or an s3:// prefix; it must not exist) and, with `publish`,
    point `latest` at it once the version is complete. Returns `out_dir` (a Path when local).

    `items` and `item_emb` must share one row order: the id-sorted catalogue order. `shards` (index.shards > 1)
    go to shards/<S>/index-<s>.faiss, one file per RecallShard deployment.
    """
    out_dir = out_dir if storage.is_remote(out_dir) else Path(out_dir)
    ids = items.column("item_id").to_numpy()
    if len(ids) != len(item_emb) or (len(ids) > 1 and not (np.diff(ids) > 0).all()):
        raise ValueError("items must be sorted by item_id, unique, and match item_emb row for row")
    with staged_dir(out_dir) as tmp:
        model.save(tmp, tokenizer)
        pq.write_table(items, tmp / "items.parquet")
        np.save(tmp / "item_emb.npy", item_emb, allow_pickle=False)
        faiss.write_index(index, str(tmp / "index.faiss"))
        for s, shard in enumerate(shards):
            path = shard_path(tmp, s, len(shards))
            path.parent.mkdir(parents=True, exist_ok=True)
            faiss.write_index(shard, str(path))
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        manifest = {"manifest_version": MANIFEST_VERSION, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "versions": package_versions(), "files": files, "n_items": int(len(item_emb)),
                    "emb_dim": int(item_emb.shape[1]), **manifest}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=json_default))
    if publish:
        point_latest(storage.parent(out_dir), out_dir)
    return out_dir
