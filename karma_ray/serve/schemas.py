"""HTTP request/response models for the search service (docs/design.md §5, contract v1).

Request limits (violations are answered with 422 and a message naming the field):
  * `k`: integer in [1, 200], default 20;
  * `history`: at most `MAX_HISTORY` (200) item ids, integers; only the last `data.history_items`
    of the artifact's config are shown to the encoder, the rest are still excluded from results;
  * `query`: at most `MAX_QUERY_CHARS` (512) characters;
  * a request needs a non-blank `query` or a non-empty `history` (or both).
  * ids (`user_id`, `history`) are 64-bit signed integers: anything outside [-2^63, 2^63 - 1] is a
    422 (the catalogue's ids are int64; a larger id could never be known);
  * unknown fields are a 422 (a misspelt `"histroy"` must not silently mean "no history").
Integers are strict JSON integers: "5", 5.0 and true are rejected rather than coerced.
The ingress also caps the request body (413) before any of this runs (see `guard.py`).

Unknown history ids (not in the served catalogue) are dropped and listed in `ignored_history`;
if that leaves neither a query nor any known history item, the request is answered with 422.
"""
from __future__ import annotations

from typing import Annotated, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

MAX_K = 200
DEFAULT_K = 20
MAX_HISTORY = 200
MAX_QUERY_CHARS = 512
CONTRACT_VERSION = "1"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
Int64 = Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"user_id": 7, "query": "running shoes", "history": [12, 40, 7], "k": 10}]})

    user_id: Optional[Int64] = Field(None, description="Caller's user id (logged, not used for scoring).")
    query: Optional[StrictStr] = Field(None, max_length=MAX_QUERY_CHARS, description="Free-text query; may be empty.")
    history: list[Int64] = Field(default_factory=list, max_length=MAX_HISTORY,
                                 description=f"Earlier clicked item ids, oldest first (at most {MAX_HISTORY}).")
    k: StrictInt = Field(DEFAULT_K, ge=1, le=MAX_K, description=f"Number of results, 1..{MAX_K}.")

    @model_validator(mode="after")
    def _needs_signal(self) -> "SearchRequest":
        if not (self.query or "").strip() and not self.history:
            raise ValueError("give a non-empty `query` or a non-empty `history` (or both)")
        return self

    @property
    def clean_query(self) -> str:
        return (self.query or "").strip()


class ExplainRequest(SearchRequest):
    """Same input as /search; `k` is accepted and ignored."""


class SearchItem(BaseModel):
    item_id: int
    title: str
    score: float


class StageCounts(BaseModel):
    recall: int = Field(description="Candidates returned by FAISS recall (history items excluded).")
    prerank: int = Field(description="Candidates kept by the pre-ranker.")
    rank: int = Field(description="Items returned (≤ k).")


class StageLatency(BaseModel):
    encode: float
    recall: float
    prerank: float
    rank: float
    total: float


class SearchResponse(BaseModel):
    items: list[SearchItem]
    stages: StageCounts
    latency_ms: StageLatency = Field(description="Per-stage wall time seen by the ingress (hop + queue + compute), ms.")
    model_version: str
    ignored_history: list[int] = Field(default_factory=list, description="History ids not in the catalogue (dropped).")
    rankers: bool = Field(description="False when pre-rank/rank fell back to the recall score h·e.")


class ExplainResponse(BaseModel):
    text: str = Field(description="Greedy decode of \"Next: …\" from h through the reconstruction path.")
    model_version: str
    ignored_history: list[int] = Field(default_factory=list)
    latency_ms: float


class HealthResponse(BaseModel):
    status: str
    model_version: str
    artifact: str
    n_items: int
    rankers: bool = Field(description="True when trained pre-rank/rank models are loaded, else recall-score fallback.")
    contract_version: str = CONTRACT_VERSION


class ErrorResponse(BaseModel):
    error: str
    detail: Optional[list[dict]] = None
