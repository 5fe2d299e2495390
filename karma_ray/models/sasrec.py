"""SASRec (Kang & McAuley 2018) as RecBole 1.2.1 builds it: the ID-only sequential peer of the quality table.

Item and position embeddings ~ N(0, 0.02) summed without √d scaling, LayerNorm and dropout, a post-norm
causal Transformer (GELU) whose padding positions are masked as keys, the state read at the last real
position, and a full softmax (cross-entropy) over the catalogue. Training examples are every click with
a non-empty history (RecBole's prefix augmentation); training stops early on validation HR@10.
An item never clicked in training keeps its random embedding: the cold-item gap LLM arms close.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from karma_ray.config import BaselinesConfig
from karma_ray.data.catalog import ItemCatalog


class SASRec(nn.Module):
    def __init__(self, catalog_ids: np.ndarray, cfg: BaselinesConfig):
        super().__init__()
        self.cfg = cfg
        self.catalog = ItemCatalog.of_ids(catalog_ids)  # embedding row r+1 <-> catalogue row r, 0 = pad
        self.item = nn.Embedding(len(self.catalog) + 1, cfg.sasrec_dim, padding_idx=0)
        self.pos = nn.Embedding(cfg.sasrec_max_len, cfg.sasrec_dim)
        self.norm = nn.LayerNorm(cfg.sasrec_dim, eps=1e-12)
        self.drop = nn.Dropout(cfg.sasrec_dropout)
        layer = nn.TransformerEncoderLayer(cfg.sasrec_dim, cfg.sasrec_heads, cfg.sasrec_inner, cfg.sasrec_dropout, activation="gelu",
                                           batch_first=True, norm_first=False, layer_norm_eps=1e-12)
        self.encoder = nn.TransformerEncoder(layer, cfg.sasrec_layers, enable_nested_tensor=False)
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

    def encode(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """(B,) histories -> (B, dim) states at each history's last position (right-padded input)."""
        L = self.cfg.sasrec_max_len
        x = np.zeros((len(histories), L), np.int64)
        lengths = np.zeros(len(histories), np.int64)
        for b, h in enumerate(histories):
            r = self.rows(list(h)[-L:])
            x[b, : len(r)], lengths[b] = r, len(r)
        x_t = torch.from_numpy(x)  # (B, L)
        z = self.drop(self.norm(self.item(x_t) + self.pos.weight[None]))  # (B, L, dim)
        pad = x_t == 0
        pad[lengths == 0, 0] = False  # an empty history reads its (padding) first position, not NaN
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
        z = self.encoder(z, mask=causal, src_key_padding_mask=pad)
        last = torch.from_numpy(np.maximum(lengths - 1, 0))
        return z[torch.arange(len(histories)), last]  # (B, dim)

    def logits(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        return self.encode(histories) @ self.item.weight[1:].T  # (B, N)

    @torch.no_grad()
    def scores(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """(B, N) scores over the sorted catalogue (eval mode)."""
        was = self.training
        self.eval()
        out = self.logits(histories).numpy()
        self.train(was)
        return out

    def loss(self, histories: Sequence[Sequence[int]], targets: Sequence[int]) -> torch.Tensor:
        return F.cross_entropy(self.logits(histories), torch.from_numpy(self.rows(targets) - 1))


def train_sasrec(catalog_ids: np.ndarray, histories: list[list[int]], targets: np.ndarray, cfg: BaselinesConfig,
                 seed: int = 0, validate: Callable[["SASRec"], float] | None = None,
                 on_epoch: Callable[[int, float, float | None], None] | None = None) -> tuple[SASRec, list[dict]]:
    """Train epoch by epoch on every example with a non-empty history; with `validate`, keep the best
    epoch's weights and stop after `patience` epochs without a better validation score.

    Returns the model (best weights) and one record per epoch {epoch, rows_seen, loss, valid}.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    keep = np.array([len(h) > 0 for h in histories])
    hist = [h for h, k in zip(histories, keep) if k]
    tgt = np.asarray(targets)[keep]
    model = SASRec(catalog_ids, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.sasrec_lr)
    best, best_state, since, log = -1.0, None, 0, []
    for epoch in range(1, cfg.sasrec_max_epochs + 1):
        model.train()
        order = rng.permutation(len(tgt))
        total = 0.0
        for s in range(0, len(order), cfg.sasrec_batch_size):
            idx = order[s : s + cfg.sasrec_batch_size]
            loss = model.loss([hist[i] for i in idx], tgt[idx])
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
