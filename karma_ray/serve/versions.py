"""The artifact versions one replica holds, so that a rollout never mixes versions within a request.

Every stage call carries the artifact (its resolved path) that the ingress pinned for the request,
and the stage answers from exactly that version. A replica holds its initial artifact (the app's
`args.artifact`) and, during a rollout, whatever its `user_config["artifacts"]` lists (see
`karma_ray.serve.rollout`): the old and the new version side by side until the ingress has switched.
A request for a version the replica does not hold loads it on the spot (logged): slow, never wrong.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable, Generic, Sequence, TypeVar

from karma_ray.artifact.layout import canonical

log = logging.getLogger("ray.serve")
T = TypeVar("T")


def artifact_key(artifact: str | Path) -> str:
    """The one spelling of an artifact in stage calls: its resolved absolute path (`latest` followed), or
    its s3:// URI (the app and rollout pass versions that `layout.locate` already followed)."""
    return canonical(artifact)


class HeldVersions(Generic[T]):
    """`artifact path -> loaded state` for one replica; `load(path)` builds a state (model, index, …)."""

    def __init__(self, load: Callable[[str], T], initial: str):
        self._load = load
        self._lock = threading.Lock()
        self.initial = artifact_key(initial)
        self._held: dict[str, T] = {self.initial: load(self.initial)}

    def hold(self, artifacts: Sequence[str] | None) -> None:
        """Hold exactly `artifacts` (default: the initial one): load the missing, drop the rest."""
        wanted = [artifact_key(a) for a in (artifacts or [self.initial])]
        if not wanted:
            raise ValueError("a replica must hold at least one artifact")
        for key in wanted:
            self.get(key, reason="preload")
        with self._lock:
            for key in [k for k in self._held if k not in wanted]:
                log.info("dropping artifact %s", key)
                del self._held[key]

    def get(self, artifact: str, reason: str = "request") -> T:
        state = self._held.get(artifact)
        if state is not None:
            return state
        key = artifact_key(artifact)
        with self._lock:  # one load per version, even if several requests ask at once
            if key not in self._held:
                if reason == "request":
                    log.warning("artifact %s was not preloaded on this replica; loading it now", key)
                self._held[key] = self._load(key)
            return self._held[key]

    def items(self) -> list[tuple[str, T]]:
        return list(self._held.items())

    def __len__(self) -> int:
        return len(self._held)
