"""PreRank: recall's ~200 candidates → the best ~50 by the light pre-ranking model.

Uses `karma_ray.models.rankers.load_rankers(artifact).prerank_scores` when the artifact has trained
rankers; otherwise the recall score h·e (so pre-ranking is then a cut, and /healthz says
`"rankers": false`). `user_config`: `keep` (default 50).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
from ray import serve

log = logging.getLogger("ray.serve")
DEFAULT_KEEP = 50


# Methods are `async def` on purpose: the work is sub-millisecond, and Serve would run a sync method
# in its thread pool (one more thread hand-off per call).
@serve.deployment
class PreRank:
    kind = "prerank"

    def __init__(self, artifact: str, keep: int = DEFAULT_KEEP):
        from karma_ray.serve.catalog import Catalog, load_ranker_bundle

        self.catalog = Catalog.load(artifact)
        self.bundle, self.rankers_reason = load_ranker_bundle(artifact)
        self.keep = int(keep)
        log.info("%s: %s", type(self).__name__, self.rankers_reason)

    def reconfigure(self, cfg: dict[str, Any]) -> None:
        self.keep = int(cfg.get("keep", self.keep))

    async def score(self, h: np.ndarray, cand_ids: np.ndarray, history: list[int], at_least: int = 0
              ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of the best max(keep, at_least) candidates, best first (at_least = the request's k)."""
        from karma_ray.serve.catalog import stage_scores, top_by_score

        cand_ids = np.asarray(cand_ids, dtype=np.int64)
        scores = stage_scores(self.bundle, self.kind, self.catalog, h, cand_ids, history)
        return top_by_score(cand_ids, scores, max(self.keep, int(at_least)))

    async def has_rankers(self) -> bool:
        return self.bundle is not None


def app(args: dict[str, str] | None = None):
    """`serve run karma_ray.serve.prerank:app artifact=DIR` — pre-ranking alone."""
    from karma_ray.serve.app import default_artifact

    return PreRank.bind((args or {}).get("artifact") or default_artifact())
