"""Rank: pre-ranked candidates (~50) → the final k by the ranking CTR model.

Uses `karma_ray.models.rankers.load_rankers(artifact).rank_scores` when the artifact has trained
rankers; otherwise the recall score h·e (and /healthz says `"rankers": false`).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
from ray import serve

log = logging.getLogger("ray.serve")


# Methods are `async def` on purpose: the work is sub-millisecond, and Serve would run a sync method
# in its thread pool (one more thread hand-off per call).
@serve.deployment
class Rank:
    kind = "rank"

    def __init__(self, artifact: str):
        from karma_ray.serve.catalog import Catalog, load_ranker_bundle

        self.catalog = Catalog.load(artifact)
        self.bundle, self.rankers_reason = load_ranker_bundle(artifact)
        log.info("Rank: %s", self.rankers_reason)

    def reconfigure(self, cfg: dict[str, Any]) -> None:
        pass  # no knobs yet; present so a YAML user_config is accepted

    async def score(self, h: np.ndarray, cand_ids: np.ndarray, history: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of the final top k, best first."""
        from karma_ray.serve.catalog import stage_scores, top_by_score

        cand_ids = np.asarray(cand_ids, dtype=np.int64)
        scores = stage_scores(self.bundle, self.kind, self.catalog, h, cand_ids, history)
        return top_by_score(cand_ids, scores, k)

    async def has_rankers(self) -> bool:
        return self.bundle is not None


def app(args: dict[str, str] | None = None):
    """`serve run karma_ray.serve.rank:app artifact=DIR` — ranking alone."""
    from karma_ray.serve.app import default_artifact

    return Rank.bind((args or {}).get("artifact") or default_artifact())
