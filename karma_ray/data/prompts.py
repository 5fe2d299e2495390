"""Item text, interest prompts and the fixed-width token arrays both training and serving use.

One `PromptBuilder` is shared by the Ray Data tokeniser (training) and the interest encoder
(serving), so a prompt is built the same way everywhere. Item texts are tokenised once per item and
prompts are assembled from those pieces, which keeps tokenisation cheap at 1M-item scale.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from karma_ray.config import DataConfig
from karma_ray.data.catalog import ItemCatalog, UnknownItemError, item_text  # noqa: F401 (re-exported)

IGNORE = -100  # label value ignored by the token cross-entropy


def bos_id(tokenizer) -> int | None:
    """The BOS id every sequence starts with: the tokenizer's own, where it prepends one to plain text
    itself (Gemma does; SmolLM2 defines `<|im_start|>` as BOS for chat turns but does not prepend it)."""
    return tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", False) else None


def _mask(lengths: np.ndarray, width: int) -> np.ndarray:
    """(B, width) attention mask for right-padded rows of the given lengths."""
    return (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)


class PromptBuilder:
    """Turns (query, history, target) rows into padded token arrays for `KarmaModel`."""

    def __init__(self, tokenizer, items: pa.Table | ItemCatalog, cfg: DataConfig, image_dim: int = 0):
        self.tok = tokenizer
        self.cfg = cfg
        self.image_dim = image_dim
        self.catalog = items if isinstance(items, ItemCatalog) else ItemCatalog(items)
        self._image = self.catalog.image if image_dim else None
        self._cache: dict[int, list[int]] = {}
        self.item_logq: np.ndarray | None = None  # log click share per sorted item (training only)
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = bos_id(tokenizer)
        self._bos = [] if self.bos_id is None else [self.bos_id]
        self.item_tok = tokenizer.convert_tokens_to_ids("[ITEM]")
        self.int_tok = tokenizer.convert_tokens_to_ids("[INT]")
        self.img_tok = tokenizer.convert_tokens_to_ids("[IMG]")
        enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
        self._query_prefix, self._history_head = enc("Query: "), enc("History:\n")
        self._bullet, self._newline = enc("- "), enc("\n")
        self._tail, self._next = enc("Next interest:"), enc("Next: ")

    # ---- catalogue lookups -------------------------------------------------------------------
    @property
    def item_ids(self) -> np.ndarray:
        return self.catalog.ids

    @property
    def decode_prefix(self) -> list[int]:
        """The "Next: " tokens every L_gen/L_recon target starts with (where decoding from h begins)."""
        return list(self._next)

    def rows_of(self, item_ids: Sequence[int]) -> np.ndarray:
        return self.catalog.rows_of(item_ids)

    def known(self, item_ids: Sequence[int]) -> np.ndarray:
        return self.catalog.known(item_ids)

    def text(self, item_id: int) -> str:
        return self.catalog.texts[int(self.rows_of([item_id])[0])]

    def title(self, item_id: int) -> str:
        return self.catalog.titles[int(self.rows_of([item_id])[0])]

    def image(self, item_ids: Sequence[int]) -> np.ndarray:
        if self._image is None:
            return np.zeros((len(item_ids), max(self.image_dim, 1)), np.float32)
        return self._image[self.rows_of(item_ids)]

    def _text_tokens(self, item_ids: Sequence[int]) -> list[list[int]]:
        missing = [int(i) for i in item_ids if int(i) not in self._cache]
        if missing:
            rows = self.rows_of(missing)
            texts = [self.catalog.texts[r] for r in rows]
            for i, ids in zip(missing, self.tok(texts, add_special_tokens=False).input_ids):
                self._cache[i] = ids[: self.cfg.max_item_tokens]
        return [self._cache[int(i)] for i in item_ids]

    # ---- sequences ---------------------------------------------------------------------------
    def item_sequence(self, item_id: int) -> list[int]:
        """[BOS]? + [IMG]? + item text + [ITEM]; e_i pools the text (or reads [ITEM])."""
        head = self._bos + ([self.img_tok] if self._image is not None else [])
        return head + self._text_tokens([item_id])[0] + [self.item_tok]

    def prompt(self, query: str, history: Sequence[int]) -> list[int]:
        """Query + last n history item texts + "Next interest:" (no BOS, no [INT]; oldest items dropped first)."""
        hist = list(history)[-self.cfg.history_items:] if self.cfg.history_items else []
        head = (self._query_prefix + self.tok(query, add_special_tokens=False).input_ids[:48] + self._newline
                if query else [])
        pieces = [self._bullet + t + self._newline for t in self._text_tokens(hist)]
        budget = self.cfg.max_prompt_tokens - len(head) - len(self._history_head) - len(self._tail)
        while pieces and sum(map(len, pieces)) > budget:
            pieces.pop(0)
        body = [t for p in pieces for t in p]
        return (head + self._history_head + body + self._tail)[-self.cfg.max_prompt_tokens:]

    def target(self, item_id: int) -> tuple[list[int], list[int]]:
        """("Next: " + target text + eos, labels): what L_gen appends after [INT]; labels skip "Next: "."""
        text = self._text_tokens([item_id])[0][: self.cfg.max_target_tokens - len(self._next) - 1]
        ids = self._next + text + [self.eos_id]
        return ids, [IGNORE] * len(self._next) + text + [self.eos_id]

    # ---- batches -----------------------------------------------------------------------------
    def interest_batch(self, queries: Sequence[str], histories: Sequence[Sequence[int]],
                       targets: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """Interest sequences [BOS]?[prompt][INT] (+ "Next: "+target text for L_gen when targets given)."""
        width = len(self._bos) + self.cfg.max_prompt_tokens + 1 + (self.cfg.max_target_tokens if targets is not None else 0)
        B = len(queries)
        ids = np.full((B, width), self.pad_id, np.int64)
        labels = np.full((B, width), IGNORE, np.int64)
        pos = np.zeros(B, np.int64)
        lengths = np.zeros(B, np.int64)
        for b in range(B):
            seq = self._bos + self.prompt(queries[b], histories[b]) + [self.int_tok]
            pos[b] = len(seq) - 1
            lab = [IGNORE] * len(seq)
            if targets is not None:
                t_ids, t_lab = self.target(targets[b])
                seq, lab = seq + t_ids, lab + t_lab
            ids[b, : len(seq)] = seq
            labels[b, : len(lab)] = lab
            lengths[b] = len(seq)
        out = {"int_ids": ids, "int_mask": _mask(lengths, width), "int_pos": pos}
        if targets is not None:
            out["gen_labels"] = labels
        return out

    def items_batch(self, item_ids: Sequence[int]) -> dict[str, np.ndarray]:
        width = len(self._bos) + self.cfg.max_item_tokens + 2
        ids = np.full((len(item_ids), width), self.pad_id, np.int64)
        pos = np.zeros(len(item_ids), np.int64)
        for b, i in enumerate(item_ids):
            seq = self.item_sequence(i)
            ids[b, : len(seq)] = seq
            pos[b] = len(seq) - 1
        out = {"ids": ids, "mask": _mask(pos + 1, width), "pos": pos}
        if self._image is not None:
            out["image"] = self.image(item_ids)
        return out

    def target_batch(self, targets: Sequence[int]) -> dict[str, np.ndarray]:
        """L_recon's sequences [BOS]? "Next: " + target text: the model inserts P(h) after the BOS."""
        width = len(self._bos) + self.cfg.max_target_tokens
        ids = np.full((len(targets), width), self.pad_id, np.int64)
        labels = np.full((len(targets), width), IGNORE, np.int64)
        mask = np.zeros((len(targets), width), np.int64)
        for b, t in enumerate(targets):
            t_ids, t_lab = self.target(t)
            t_ids, t_lab = self._bos + t_ids, [IGNORE] * len(self._bos) + t_lab
            ids[b, : len(t_ids)], labels[b, : len(t_lab)], mask[b, : len(t_ids)] = t_ids, t_lab, 1
        return {"rec_ids": ids, "rec_labels": labels, "rec_mask": mask}

    def training_batch(self, batch: dict[str, Any], with_gen: bool, with_rec: bool) -> dict[str, np.ndarray]:
        """All model inputs for one batch of event rows (columns as in the events schema)."""
        queries = [q or "" for q in batch["query"]]
        histories = [list(h) for h in batch["history"]]
        targets = [int(t) for t in batch["target"]]
        out = self.interest_batch(queries, histories, targets if with_gen else None)
        pos = self.items_batch(targets)
        out.update({"pos_item": np.asarray(targets, np.int64), "pos_ids": pos["ids"], "pos_mask": pos["mask"],
                    "pos_pos": pos["pos"]})
        if "image" in pos:
            out["pos_image"] = pos["image"]
        N = self.cfg.max_negatives
        neg_item = np.full((len(targets), N), -1, np.int64)
        for b, negs in enumerate(batch["negatives"]):
            negs = [int(n) for n in negs if int(n) != targets[b]][:N]
            neg_item[b, : len(negs)] = negs
        flat = np.where(neg_item >= 0, neg_item, targets[0] if targets else 0).reshape(-1)
        neg = self.items_batch(flat.tolist())
        out.update({"neg_item": neg_item, "neg_ids": neg["ids"].reshape(len(targets), N, -1),
                    "neg_mask": neg["mask"].reshape(len(targets), N, -1), "neg_pos": neg["pos"].reshape(len(targets), N)})
        if "image" in neg:
            out["neg_image"] = neg["image"].reshape(len(targets), N, -1)
        if self.item_logq is not None:  # only the targets: in-batch candidates are other rows' targets
            out["pos_logq"] = self.item_logq[self.rows_of(targets)]
        if with_rec:
            out.update(self.target_batch(targets))
        return out
