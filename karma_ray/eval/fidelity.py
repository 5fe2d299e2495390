"""Semantic fidelity (token-F1 of text decoded from h), effective rank of h, bootstrap CIs."""
from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Sequence

import numpy as np

_TOKEN = re.compile(r"\w+", re.UNICODE)


def text_tokens(text: str) -> list[str]:
    """Lower-cased word tokens; separators like '|' and punctuation do not count."""
    return _TOKEN.findall((text or "").lower())


def token_f1(pred: str, ref: str) -> float:
    """SQuAD-style bag-of-tokens F1 between a decoded text and the true item text."""
    p, r = text_tokens(pred), text_tokens(ref)
    if not p and not r:
        return 1.0
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def effective_rank(h: np.ndarray) -> float:
    """Participation ratio (Σλ)² / Σλ² of the covariance of h (N, d): 1 = collapsed, d = isotropic."""
    if len(h) < 2:
        return float("nan")
    lam = np.clip(np.linalg.eigvalsh(np.cov(np.asarray(h, np.float64), rowvar=False)), 0.0, None)
    return float(lam.sum() ** 2 / max((lam**2).sum(), 1e-30))


def bootstrap_ci(values: np.ndarray, stat: Callable[[np.ndarray], float] = np.mean, n_boot: int = 1000,
                 seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap (1−α) interval of `stat` over per-event values (e.g. 0/1 hits)."""
    values = np.asarray(values)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    boots = np.array([stat(values[i]) for i in idx])
    return float(np.quantile(boots, alpha / 2)), float(np.quantile(boots, 1 - alpha / 2))


def hits_at(ranks: Sequence[int], k: int) -> np.ndarray:
    r = np.asarray(ranks)
    return ((r > 0) & (r <= k)).astype(np.float64)
