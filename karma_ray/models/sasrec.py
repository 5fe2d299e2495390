"""SASRec (Kang & McAuley 2018) as RecBole 1.2.1 builds it: the ID-only sequential peer of the quality table.

Item and position embeddings ~ N(0, 0.02) summed without √d scaling, LayerNorm and dropout, then RecBole's
post-norm Transformer layers: multi-head self-attention (dropout on the attention probabilities and on its
output), add & LayerNorm, dense → GELU → dense → dropout, add & LayerNorm. Padding positions are masked as keys,
the state is read at the last real position, and a full softmax (cross-entropy) runs over the catalogue.
Training examples are every click with a non-empty history (RecBole's prefix augmentation); training stops
early on validation HR@10. An item never clicked in training keeps its random embedding: the cold-item gap
LLM arms close.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from karma_ray.config import BaselinesConfig
from karma_ray.data.catalog import ItemCatalog

MASKED = -10000.0  # RecBole's additive mask: finite, so a row of padding attends uniformly instead of to NaN


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """nn.Dropout's distribution (keep each element with probability 1 − p, scale by 1/(1 − p)) with the mask
    drawn by `torch.rand`: `bernoulli_`, which nn.Dropout uses, is ~4× slower on CPU and took half of a step."""
    if not training or p == 0:
        return x
    return x * (torch.rand_like(x) >= p) * (1.0 / (1.0 - p))


class Layer(nn.Module):
    """One RecBole TransformerLayer; unlike torch's nn.TransformerEncoderLayer, no dropout between the two
    dense layers of the feed-forward."""

    def __init__(self, cfg: BaselinesConfig):
        super().__init__()
        d = cfg.sasrec_dim
        self.heads, self.p = cfg.sasrec_heads, cfg.sasrec_dropout
        self.qkv = nn.Linear(d, 3 * d)  # RecBole's query, key and value projections, side by side
        self.out = nn.Linear(d, d)
        self.norm1 = nn.LayerNorm(d, eps=1e-12)
        self.dense1 = nn.Linear(d, cfg.sasrec_inner)
        self.dense2 = nn.Linear(cfg.sasrec_inner, d)
        self.norm2 = nn.LayerNorm(d, eps=1e-12)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, d), mask (B, 1, L, L) additive -> (B, L, d)."""
        B, L, d = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # each (B, H, L, d/H)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads) + mask  # (B, H, L, L)
        att = dropout(att.softmax(-1), self.p, self.training)
        y = (att @ v).transpose(1, 2).reshape(B, L, d)  # (B, L, d)
        x = self.norm1(x + dropout(self.out(y), self.p, self.training))
        return self.norm2(x + dropout(self.dense2(F.gelu(self.dense1(x))), self.p, self.training))


class SASRec(nn.Module):
    def __init__(self, catalog_ids: np.ndarray, cfg: BaselinesConfig):
        super().__init__()
        self.cfg = cfg
        self.catalog = ItemCatalog.of_ids(catalog_ids)  # embedding row r+1 <-> catalogue row r, 0 = pad
        self.item = nn.Embedding(len(self.catalog) + 1, cfg.sasrec_dim, padding_idx=0)
        self.pos = nn.Embedding(cfg.sasrec_max_len, cfg.sasrec_dim)
        self.norm = nn.LayerNorm(cfg.sasrec_dim, eps=1e-12)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.sasrec_layers))
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        """RecBole's initialisation: N(0, 0.02) for embeddings and linear weights, zero biases."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def rows(self, ids: Sequence[int]) -> np.ndarray:
        """Item ids -> embedding rows (0 for ids outside the catalogue, i.e. padding)."""
        return self.catalog.rows_or(ids, missing=-1) + 1

    def sequences(self, histories: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(B,) histories -> (B, L) embedding rows of their last L items, right-padded with 0, and (B,) lengths."""
        L = self.cfg.sasrec_max_len
        x = np.zeros((len(histories), L), np.int64)
        lengths = np.zeros(len(histories), np.int64)
        for b, h in enumerate(histories):
            r = self.rows(list(h)[-L:])
            x[b, : len(r)], lengths[b] = r, len(r)
        return x, lengths

    def encode(self, x: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        """(B, L) right-padded rows and (B,) lengths -> (B, dim) states at each sequence's last position."""
        x_t = torch.from_numpy(x)  # (B, L)
        L = x_t.shape[1]
        z = dropout(self.norm(self.item(x_t) + self.pos.weight[None, :L]), self.cfg.sasrec_dropout, self.training)  # (B, L, dim)
        causal = torch.ones(L, L, dtype=torch.bool).tril()  # (L, L)
        mask = torch.where((x_t != 0)[:, None, None, :] & causal, 0.0, MASKED)  # (B, 1, L, L)
        for layer in self.layers:
            z = layer(z, mask)
        return z[torch.arange(len(x)), torch.from_numpy(np.maximum(lengths - 1, 0))]  # (B, dim)

    def logits(self, x: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        return self.encode(x, lengths) @ self.item.weight[1:].T  # (B, N)

    @torch.no_grad()
    def scores(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """(B, N) scores over the sorted catalogue (eval mode)."""
        was = self.training
        self.eval()
        out = self.logits(*self.sequences(histories)).numpy()
        self.train(was)
        return out

    def loss(self, x: np.ndarray, lengths: np.ndarray, target_rows: np.ndarray) -> torch.Tensor:
        """Cross-entropy over the catalogue; `target_rows` are catalogue rows (embedding row − 1)."""
        return F.cross_entropy(self.logits(x, lengths), torch.from_numpy(target_rows))


def train_sasrec(catalog_ids: np.ndarray, histories: list[list[int]], targets: np.ndarray, cfg: BaselinesConfig,
                 seed: int = 0, validate: Callable[["SASRec"], float] | None = None,
                 on_epoch: Callable[[int, float, float | None], None] | None = None) -> tuple[SASRec, list[dict]]:
    """Train epoch by epoch on every example with a non-empty history; with `validate`, keep the best
    epoch's weights and stop after `patience` epochs without a better validation score.

    Returns the model (best weights) and one record per epoch {epoch, rows_seen, loss, valid}.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SASRec(catalog_ids, cfg)
    keep = np.array([len(h) > 0 for h in histories], bool)
    x, lengths = model.sequences([h for h, k in zip(histories, keep) if k])  # (N, L), (N,): built once
    tgt = model.rows(np.asarray(targets)[keep]) - 1
    opt = torch.optim.Adam(model.parameters(), lr=cfg.sasrec_lr)
    best, best_state, since, log = -1.0, None, 0, []
    for epoch in range(1, cfg.sasrec_max_epochs + 1):
        model.train()
        order = rng.permutation(len(tgt))
        total = 0.0
        for s in range(0, len(order), cfg.sasrec_batch_size):
            idx = order[s : s + cfg.sasrec_batch_size]
            loss = model.loss(x[idx], lengths[idx], tgt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        score = validate(model) if validate else None
        log.append({"epoch": epoch, "rows_seen": epoch * len(tgt), "loss": total / max(len(tgt), 1), "valid": score})
        if on_epoch:
            on_epoch(epoch, log[-1]["loss"], score)
        if validate is None:
            continue
        if score > best:
            best, since = score, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since += 1
            if since >= cfg.sasrec_patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), log
