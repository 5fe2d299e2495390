"""Attention diagnostics of semantic collapse (docs/design.md §4), on tensors only (no model, no Ray).

Two views of the same per-layer attention maps `attn[l]: (B, H, T, T)` over right-padded prompts:
  * sink rate (Gu et al. 2024): share of (sample, layer, head) whose first key receives a mean
    attention > ε from the queries. Query 0 is left out of the mean: it can only attend to itself,
    so counting it would push every head towards a "sink" on short prompts.
  * concentration of the interest token's own row (the paper's "barcode"): over the keys after the
    first, renormalised, the entropy divided by log(#keys) and the mass of the top-1 key. A row that
    collapses onto a few positions has low entropy and a high top-1 mass, even when the first-key
    rate is saturated (frozen SmolLM2 is already ~80% "sink" by the first-key definition).
"""
from __future__ import annotations

from typing import Sequence

import torch

SINK_EPS = 0.3


def first_key_mass(attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, H, T, T) attention, (B, T) key/query mask → (B, H) mean attention the first key receives."""
    q_valid = mask.clone().float()  # (B, T)
    q_valid[:, 0] = 0.0  # query 0 attends only to itself
    first = attn[..., 0].float()  # (B, H, T): weight on key 0 from every query
    n = q_valid.sum(1).clamp(min=1.0)[:, None]  # (B, 1)
    return (first * q_valid[:, None, :]).sum(-1) / n  # (B, H)


def sink_rates(attns: Sequence[torch.Tensor], mask: torch.Tensor, eps: float = SINK_EPS) -> tuple[float, list[float]]:
    """100 × share of (sample, layer, head) with first-key mean > eps: (overall, per layer)."""
    per_layer = [float((first_key_mass(a, mask) > eps).float().mean() * 100) for a in attns]
    return (sum(per_layer) / len(per_layer) if per_layer else float("nan")), per_layer


def interest_row_concentration(attns: Sequence[torch.Tensor], pos: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per layer: mean normalised entropy and mean top-1 mass of the [INT] row over keys 1..pos.

    `pos` (B,) is the interest token's position; keys after it are masked by causality already.
    Rows with fewer than two keys after the first carry no information and are skipped.
    """
    entropies, top1s = [], []
    keep = pos >= 2  # (B,)
    for a in attns:
        rows = a[torch.arange(len(pos)), :, pos].float()  # (B, H, T): the [INT] query row
        ent_l, top_l = [], []
        for b in torch.nonzero(keep).flatten().tolist():
            p = rows[b, :, 1 : int(pos[b]) + 1]  # (H, n) keys after the first, up to [INT] itself
            p = p / p.sum(-1, keepdim=True).clamp(min=1e-12)
            ent = -(p * p.clamp(min=1e-12).log()).sum(-1) / torch.log(torch.tensor(float(p.shape[-1])))
            ent_l.append(ent.mean())
            top_l.append(p.max(-1).values.mean())
        entropies.append(float(torch.stack(ent_l).mean()) if ent_l else float("nan"))
        top1s.append(float(torch.stack(top_l).mean()) if top_l else float("nan"))
    return entropies, top1s
