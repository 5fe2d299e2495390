"""Item embeddings -> a FAISS inner-product index keyed by item id."""
from __future__ import annotations

import faiss
import numpy as np

from karma_ray.config import IndexConfig


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
