"""AUC / GAUC against hand-computed cases (docs/design.md §4), including ties and single-class users."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from karma_ray.eval.ctr import auc, gauc


def _pairwise_auc(labels, scores) -> float:
    """Brute force: P(pos > neg) + ½ P(pos = neg) over every (positive, negative) pair."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_textbook_case():
    # pairs (pos, neg): (.35,.1) win, (.35,.4) loss, (.8,.1) win, (.8,.4) win -> 3/4
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_auc_ties_count_half():
    # pos .5 vs neg .5 tie (½), pos .5 vs .2 win, pos .7 vs .5 win, pos .7 vs .2 win -> 3.5/4
    assert auc([1, 0, 1, 0], [0.5, 0.5, 0.7, 0.2]) == pytest.approx(0.875)
    assert auc([1, 0, 1, 0, 0], [3.0, 3.0, 3.0, 3.0, 3.0]) == pytest.approx(0.5)


def test_auc_perfect_reversed_and_single_class():
    assert auc([0, 1, 1], [0.1, 0.2, 0.3]) == 1.0
    assert auc([0, 1, 1], [0.9, 0.2, 0.3]) == 0.0
    assert math.isnan(auc([1, 1], [0.1, 0.2]))
    assert math.isnan(auc([0, 0, 0], [0.1, 0.2, 0.3]))


def test_auc_matches_brute_force_with_many_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = rng.integers(0, 7, 300).astype(float)  # heavy ties
    assert auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores))


def test_auc_rejects_length_mismatch():
    with pytest.raises(ValueError):
        auc([0, 1], [0.1])


def test_gauc_weights_by_positives_and_skips_single_class_users():
    # user 1: AUC 1, 1 positive; user 2: AUC ½ (.2<.4, .6>.4), 2 positives;
    # user 3 only clicks, user 4 never clicks: both skipped. GAUC = (1·1 + 2·½) / 3 = 2/3.
    users = [1, 2, 3, 1, 2, 4, 1, 2, 3, 4]
    labels = [1, 1, 1, 0, 1, 0, 0, 0, 1, 0]
    scores = [0.9, 0.2, 0.5, 0.1, 0.6, 0.3, 0.5, 0.4, 0.1, 0.9]
    assert gauc(users, labels, scores) == pytest.approx(2 / 3)


def test_gauc_differs_from_auc_when_users_differ_in_base_rate():
    # Within each user the order is perfect, but user 2's scores are all higher than user 1's.
    users = [1, 1, 2, 2]
    labels = [1, 0, 1, 0]
    scores = [0.2, 0.1, 0.9, 0.8]
    assert gauc(users, labels, scores) == 1.0
    assert auc(labels, scores) == pytest.approx(0.75)


def test_gauc_nan_when_no_user_has_both_classes():
    assert math.isnan(gauc([1, 1, 2], [1, 1, 0], [0.3, 0.2, 0.1]))
