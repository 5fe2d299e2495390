"""Batched inference with a KarmaModel over either token ids or cached trunk states (no grad).

`TokenInputs` tokenises with the PromptBuilder, so the full-depth model runs (serving, exports, any
artifact). `CachedInputs` reads the trunk cache, so only the trainable top runs (training-time
statistics, the quality benchmark). Both yield the same dicts, which `embed` feeds to the model.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

from karma_ray.data.prompts import PromptBuilder
from karma_ray.progress import progress_bar

Inputs = dict[str, torch.Tensor]


class TokenInputs:
    """Item and interest batches as token ids, built by the shared PromptBuilder."""

    def __init__(self, builder: PromptBuilder, batch_size: int = 32):
        self.builder, self.batch_size = builder, batch_size

    def items(self, item_ids: Sequence[int]) -> Iterator[Inputs]:
        for s in range(0, len(item_ids), self.batch_size):
            arr = self.builder.items_batch([int(i) for i in item_ids[s : s + self.batch_size]])
            width = int(arr["mask"].sum(1).max())
            out = {"ids": torch.from_numpy(arr["ids"][:, :width]), "mask": torch.from_numpy(arr["mask"][:, :width]),
                   "pos": torch.from_numpy(arr["pos"])}
            if "image" in arr:
                out["image"] = torch.from_numpy(arr["image"])
            yield out

    def interests(self, queries: Sequence[str], histories: Sequence[Sequence[int]]) -> Iterator[Inputs]:
        for s in range(0, len(queries), self.batch_size):
            arr = self.builder.interest_batch(list(queries[s : s + self.batch_size]), list(histories[s : s + self.batch_size]))
            width = int(arr["int_mask"].sum(1).max())
            yield {"ids": torch.from_numpy(arr["int_ids"][:, :width]), "mask": torch.from_numpy(arr["int_mask"][:, :width]),
                   "pos": torch.from_numpy(arr["int_pos"])}


class CachedInputs:
    """Item and interest batches as cached trunk states (karma_ray.cache)."""

    def __init__(self, cache, batch_size: int = 32, image: np.ndarray | None = None):
        self.cache, self.batch_size, self.image = cache, batch_size, image

    def items(self, item_ids: Sequence[int] | None = None) -> Iterator[Inputs]:
        it = self.cache.items()
        rows = it.rows(item_ids) if item_ids is not None else torch.arange(len(it.ids))
        for s in range(0, len(rows), self.batch_size):
            r = rows[s : s + self.batch_size]
            width = int(it.mask[r].sum(1).max())
            out = {"states": it.states[r, :width], "mask": it.mask[r, :width], "pos": it.pos[r]}
            if self.image is not None:
                out["image"] = torch.from_numpy(self.image[r.numpy()])
            yield out

    def interests(self, split: str, by_length: bool = False, events: np.ndarray | None = None) -> Iterator[Inputs]:
        """The split's cached prompts in event order (only the event positions `events`, when given), or with
        `by_length` in batches of similar length (see `state_batches`; `embed` puts the rows back in order)."""
        part = self.cache.eval_split(split)
        blobs, lengths, pos = part["blobs"], part["length"], part["pos"]
        if events is not None:
            blobs, lengths, pos = [blobs[i] for i in events], lengths[events], pos[events]
        return state_batches(blobs, lengths, pos, self.cache.dtype, self.batch_size, by_length)


def state_batches(blobs: list[bytes], lengths: np.ndarray, pos: np.ndarray, dtype: str, batch_size: int,
                  by_length: bool = False) -> Iterator[Inputs]:
    """Cached interest states -> padded batches. With `by_length` the rows go shortest first, so a batch is
    padded to about its real tokens (in event order, batches of evaluation prompts are 1.15-1.20x padding);
    each batch then carries "rows", its rows' positions in the input, which `embed` uses to restore the order."""
    from karma_ray.cache.store import pad_states

    lengths = np.asarray(lengths)
    order = np.argsort(lengths, kind="stable") if by_length else np.arange(len(lengths))
    for s in range(0, len(order), batch_size):
        r = order[s : s + batch_size]
        states, mask = pad_states([blobs[i] for i in r], lengths[r], dtype)
        batch = {"states": states, "mask": mask, "pos": torch.from_numpy(np.asarray(pos)[r].astype(np.int64))}
        if by_length:
            batch["rows"] = torch.from_numpy(r)
        yield batch


@torch.no_grad()
def embed(model, batches, tower: str, pooled: bool = False, total: int | None = None, desc: str = "",
          progress: bool = False) -> np.ndarray:
    """Run `tower` ("item" | "interest") over `batches` -> (n, emb) float32 unit vectors, or the (n, d)
    pooled states before the projection with `pooled`. Batches that carry "rows" (see `state_batches`) are
    put back in input order."""
    model.eval()
    fn = {("item", False): model.encode_items, ("item", True): model.item_pooled,
          ("interest", False): model.encode_interest, ("interest", True): model.interest_pooled}[(tower, pooled)]
    out, rows = [], []
    with progress_bar(total=total, desc=desc or f"embed {tower}s", unit="row", enabled=progress) as bar:
        for batch in batches:
            if "rows" in batch:
                batch = dict(batch)
                rows.append(batch.pop("rows").numpy())
            out.append(fn(**batch).float().numpy())
            bar.update(len(out[-1]))
    if not out:
        return np.zeros((0, 0), np.float32)
    emb = np.concatenate(out).astype(np.float32)
    if rows:
        ordered = np.empty_like(emb)
        ordered[np.concatenate(rows)] = emb
        return ordered
    return emb


def embed_items(model, builder: PromptBuilder, item_ids: Sequence[int], batch_size: int = 64,
                show_progress: bool = True) -> np.ndarray:
    """(N,) item ids -> (N, emb) float32 unit vectors e_i, in the order given (full depth)."""
    return embed(model, TokenInputs(builder, batch_size).items(item_ids), "item", total=len(item_ids),
                 progress=show_progress)


def embed_interests(model, builder: PromptBuilder, queries: list[str], histories: list[list[int]],
                    batch_size: int = 32, show_progress: bool = False) -> np.ndarray:
    """(B,) prompts -> (B, emb) float32 unit vectors h (full depth)."""
    return embed(model, TokenInputs(builder, batch_size).interests(queries, histories), "interest",
                 total=len(queries), progress=show_progress)


def readout_statistics(model, items: Any, prompts: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(item pooled states, prompt pooled states) that `KarmaModel.init_readout` centres on."""
    return (torch.from_numpy(embed(model, items, "item", pooled=True)),
            torch.from_numpy(embed(model, prompts, "interest", pooled=True)))
