"""PreRank and Rank: one class, two deployments. Recall's ~200 candidates → the best `keep` (~50)
by the light pre-ranker; those → the final k by the ranking CTR model.

`kind` ("prerank" | "rank") picks the model of the artifact's trained rankers
(`karma_ray.models.rankers.load_rankers`); without trained rankers both order by the recall score
h·e (pre-ranking is then a cut, and /healthz says `"rankers": false`).
`user_config`: `keep` (pre-rank only; default 50) and `artifacts` (versions to hold, see versions.py).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from karma_ray.serve.catalog import Catalog, load_ranker_bundle, stage_scores, top_by_score
from karma_ray.serve.versions import HeldVersions

log = logging.getLogger("ray.serve")
KINDS = ("prerank", "rank")
DEFAULT_KEEP = {"prerank": 50, "rank": 0}  # 0: keep exactly the request's k


@dataclass
class RankerState:
    catalog: Catalog
    bundle: Any  # RankerBundle or None (recall-score fallback)


def load_ranker_state(artifact: str) -> RankerState:
    bundle, reason = load_ranker_bundle(artifact)
    log.info("ranking %s: %s", artifact, reason)
    return RankerState(Catalog.load(artifact), bundle)


# Methods are `async def` on purpose: the work is sub-millisecond, and Serve would run a sync method
# in its thread pool (one more thread hand-off per call).
@serve.deployment
class Ranker:
    def __init__(self, artifact: str, kind: str):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        self.kind = kind
        self.keep = DEFAULT_KEEP[kind]
        self.versions = HeldVersions(load_ranker_state, artifact)

    def reconfigure(self, cfg: dict[str, Any]) -> None:
        self.keep = int(cfg.get("keep", DEFAULT_KEEP[self.kind]))
        self.versions.hold(cfg.get("artifacts"))

    async def score(self, artifact: str, h: np.ndarray, cand_ids: np.ndarray, history: list[int], k: int
                    ) -> tuple[np.ndarray, np.ndarray, str]:
        """(ids, scores, version) of the best max(keep, k) candidates, best first."""
        state = self.versions.get(artifact)
        cand_ids = np.asarray(cand_ids, dtype=np.int64)
        scores = stage_scores(state.bundle, self.kind, state.catalog, h, cand_ids, history)
        ids, scores = top_by_score(cand_ids, scores, max(self.keep, int(k)))
        return ids, scores, state.catalog.version

    async def has_rankers(self, artifact: str) -> bool:
        return self.versions.get(artifact).bundle is not None

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and replaces it."""
        for _, state in self.versions.items():
            state.catalog.check()

    async def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "pid": os.getpid(), "keep": self.keep,
                "versions": {k: s.catalog.version for k, s in self.versions.items()}}
