"""SASRec-style ID-only baseline (Kang & McAuley 2018): a small causal transformer over item ids.

The quality benchmark's non-LLM sequential arm. It reads the same event rows as KARMA (history →
target) and scores the full catalogue with a softmax over item-id embeddings (the cross-entropy
variant, which is stronger than the original one-negative BCE). It has no text, so an item that
never appears in training keeps its random embedding: the cold-item gap the LLM arms should close.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class SASRecConfig:
    dim: int = 64
    layers: int = 2
    heads: int = 2
    max_len: int = 50
    dropout: float = 0.2
    lr: float = 1e-3
    batch_size: int = 128

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError("sasrec dim must be divisible by heads")
        if self.max_len < 1 or self.layers < 1:
            raise ValueError("sasrec max_len and layers must be >= 1")


class SASRec(nn.Module):
    def __init__(self, item_ids: np.ndarray, cfg: SASRecConfig):
        super().__init__()
        self.cfg = cfg
        self.item_ids = np.asarray(item_ids, np.int64)  # sorted catalogue; row r+1 ↔ item_ids[r], 0 = pad
        self.item = nn.Embedding(len(item_ids) + 1, cfg.dim, padding_idx=0)
        self.pos = nn.Embedding(cfg.max_len, cfg.dim)
        layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, cfg.dim * 2, cfg.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)

    def rows(self, ids: Sequence[int]) -> np.ndarray:
        """Item ids → embedding rows (0 for ids outside the catalogue, i.e. padding)."""
        ids = np.asarray(ids, np.int64)
        pos = np.minimum(np.searchsorted(self.item_ids, ids), len(self.item_ids) - 1)
        return np.where(self.item_ids[pos] == ids, pos + 1, 0)

    def encode(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """(B,) histories → (B, dim) user states read at the last position (left-padded input)."""
        L = self.cfg.max_len
        x = np.zeros((len(histories), L), np.int64)
        for b, h in enumerate(histories):
            r = self.rows(list(h)[-L:])
            if len(r):
                x[b, L - len(r):] = r
        x = torch.from_numpy(x)  # (B, L)
        keep = (x != 0).unsqueeze(-1).float()  # (B, L, 1): SASRec's timeline mask zeroes padded inputs
        z = (self.item(x) * self.cfg.dim ** 0.5 + self.pos.weight[None]) * keep  # (B, L, dim)
        # Causal mask only: a key-padding mask would leave padded rows with no key at all (NaN).
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
        z = self.encoder(z, mask=causal)
        return self.norm(z[:, -1])  # (B, dim)

    def scores(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """(B, N) scores over the sorted catalogue."""
        with torch.no_grad():
            return (self.encode(histories) @ self.item.weight[1:].T).numpy()

    def loss(self, histories: Sequence[Sequence[int]], targets: Sequence[int]) -> torch.Tensor:
        logits = self.encode(histories) @ self.item.weight[1:].T  # (B, N)
        return F.cross_entropy(logits, torch.from_numpy(self.rows(targets) - 1))


def train_sasrec(item_ids: np.ndarray, histories: list[list[int]], targets: np.ndarray, n_examples: int,
                 cfg: SASRecConfig | None = None, seed: int = 0) -> tuple[SASRec, list[float]]:
    """Train on `n_examples` rows drawn (shuffled, epoch after epoch) from the given events."""
    cfg = cfg or SASRecConfig()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SASRec(item_ids, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    order = np.concatenate([rng.permutation(len(targets)) for _ in range(n_examples // max(len(targets), 1) + 1)])
    losses = []
    model.train()
    for s in range(0, n_examples, cfg.batch_size):
        idx = order[s : min(s + cfg.batch_size, n_examples)]
        loss = model.loss([histories[i] for i in idx], targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return model.eval(), losses
