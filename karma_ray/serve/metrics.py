"""Custom Serve metrics (docs/design.md §5): `karma_stage_latency_ms{stage}` and `karma_requests_total{status}`.

They are `ray.serve.metrics` objects, exported by Ray's metrics agent with a `ray_` prefix
(`ray_karma_stage_latency_ms_bucket`, `ray_karma_requests_total`) and Serve's own `deployment`,
`replica` and `application` tags. Create a `KarmaMetrics` inside a deployment's `__init__`, never at
module level: module-level metric objects hold locks and break deployment pickling.
"""
from __future__ import annotations

STAGES = ("encode", "recall", "prerank", "rank")
# ms buckets: sub-ms FAISS/ranker calls up to multi-second encoder queues under overload.
LATENCY_BOUNDARIES_MS = [0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750,
                         1000, 2000, 5000, 10000]


class KarmaMetrics:
    def __init__(self) -> None:
        from ray.serve import metrics

        self.stage_latency = metrics.Histogram(
            "karma_stage_latency_ms",
            description="Time the ingress waited for one pipeline stage (handle hop + queue + compute), in ms.",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("stage",),
        )
        self.requests = metrics.Counter(
            "karma_requests_total",
            description="Search/explain requests answered by the ingress, by HTTP status code.",
            tag_keys=("status", "endpoint"),
        )

    def observe_stage(self, stage: str, ms: float) -> None:
        self.stage_latency.observe(float(ms), tags={"stage": stage})

    def count(self, status: int | str, endpoint: str = "search") -> None:
        self.requests.inc(1, tags={"status": str(status), "endpoint": endpoint})


_PROCESS_METRICS: KarmaMetrics | None = None


def get_metrics() -> KarmaMetrics:
    """The replica process's one KarmaMetrics, created on first use (call it from `__init__`).

    Module-level state that is only filled at runtime inside the replica: the FastAPI exception
    handlers (which Serve may serialise by value, with copies of their module globals) import this
    module by name and so share the same instance as the deployment.
    """
    global _PROCESS_METRICS
    if _PROCESS_METRICS is None:
        _PROCESS_METRICS = KarmaMetrics()
    return _PROCESS_METRICS
