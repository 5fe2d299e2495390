"""Batched inference with a KarmaModel: item embeddings e_i and interest embeddings h (no grad)."""
from __future__ import annotations

import numpy as np
import torch

from karma_ray.data.prompts import PromptBuilder
from karma_ray.models.karma import KarmaModel
from karma_ray.progress import progress_bar


@torch.no_grad()
def embed_items(model: KarmaModel, builder: PromptBuilder, item_ids: np.ndarray, batch_size: int = 64,
                show_progress: bool = True) -> np.ndarray:
    """(N,) item ids → (N, emb) float32 unit vectors, in the order given."""
    model.eval()
    out = []
    for start in progress_bar(range(0, len(item_ids), batch_size), desc="embed items", unit="batch", enabled=show_progress):
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
    for start in progress_bar(range(0, len(queries), batch_size), desc="embed interests", unit="batch", enabled=show_progress):
        arr = builder.interest_batch(queries[start : start + batch_size], histories[start : start + batch_size])
        width = int(arr["int_mask"].sum(1).max())
        t = {k: torch.from_numpy(v) for k, v in arr.items()}
        out.append(model.encode_interest(t["int_ids"][:, :width], t["int_mask"][:, :width], t["int_pos"]).numpy())
    return np.concatenate(out).astype(np.float32)
