"""InterestEncoder: (query, history ids) → h, micro-batched; and /explain decoding.

Batching: the forward runs in a worker thread, and every call that arrives meanwhile joins the next
forward (up to `max_batch_size`), so batches form from load and never wait on a timer. Not Ray's
`@serve.batch`: with the forward off the event loop (needed to refuse calls at once under
overload), it forms the next batch eagerly as the first call arrives (measured: mean batch 1.01
at 16 clients), whereas this one forms it when the forward ahead is done (mean batch > 2).

Knobs come from the deployment's `user_config` (set in the YAML):
  max_batch_size, torch_threads, max_new_tokens, device ("auto"|"cpu"|"cuda"),
  explain_concurrency (decodes at once per replica; they run in a worker thread so that encode
  batches keep flowing), max_pending (requests a replica holds, running batch included; past it
  a call is refused at once, which the ingress answers with 503: load shedding that keeps the
  served requests' wait at about max_pending forwards; 0 = no limit), batch_fill_wait_ms (while
  saturated, a batch short of max_batch_size waits up to this long for more calls; 0 = never waits),
  max_wait_forwards (a call is refused at once unless the replica expects to answer it, and every call
  already in its batch, within this many single-prompt forward times, from the forward times it
  measures: bounds a served request's encoder time past capacity whatever the hardware; 0 = off),
  artifacts (versions to hold, see versions.py).
The code defaults are neutral (batches of up to 8, 2 ms wait, torch's own thread count).
Each loaded version runs a few warm-up forwards before the replica takes traffic.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray import serve

from karma_ray.serve.pipeline import StageOverloaded
from karma_ray.serve.versions import HeldVersions

log = logging.getLogger("ray.serve")

DEFAULT_MAX_BATCH_SIZE = 8
STATS_KEPT = 2000  # recent batches / calls the profiling figures cover
WARMUP_PROMPTS = (("running shoes", []), ("", []), ("a longer warm-up query about a rain jacket", []))


@dataclass
class EncoderState:
    model: Any  # KarmaModel
    builder: Any  # PromptBuilder (its tokenizer decodes /explain)
    version: str
    decode_prefix: Any  # torch.LongTensor of "Next: ", where decoding from h starts


def load_encoder_state(artifact: str) -> EncoderState:
    """The model and the prompt builder only (a lean replica: no index, no item embeddings)."""
    import torch

    from karma_ray.artifact.reader import load_encoder

    t0 = time.perf_counter()
    enc = load_encoder(artifact)
    enc.model.eval()
    state = EncoderState(enc.model, enc.builder, enc.version, torch.tensor(enc.builder.decode_prefix, dtype=torch.long))
    log.info("InterestEncoder loaded %s in %.1fs", enc.path, time.perf_counter() - t0)
    return state


def embed(state: EncoderState, queries: list[str], histories: list[list[int]], device) -> np.ndarray:
    """(B, d) float32 unit vectors for one version's prompts, on the replica's device (one forward,
    unlike `models.inference.embed_interests`, which loops over CPU mini-batches)."""
    import torch

    arr = state.builder.interest_batch(queries, histories)
    width = int(arr["int_mask"].sum(1).max())
    t = {k: torch.from_numpy(v).to(device) for k, v in arr.items()}
    with torch.inference_mode():
        h = state.model.encode_interest(t["int_ids"][:, :width], t["int_mask"][:, :width], t["int_pos"])
    return h.float().cpu().numpy().astype(np.float32, copy=False)


class ForwardCost:
    """Seconds one forward of k prompts takes on this replica: a moving average per batch size; a size
    not seen yet lies on the line through the two nearest seen sizes (a forward costs a fixed part plus
    a part linear in the batch), or is the one seen size scaled in proportion. Unknown (0.0) until the
    first observation. A provisional figure (the warm-up's, taken before the replica's thread settings
    apply) is replaced outright by the first real forward of that size."""

    def __init__(self, smoothing: float = 0.2):
        self.smoothing = smoothing
        self.seconds: dict[int, float] = {}
        self._provisional: set[int] = set()

    def observe(self, size: int, seconds: float, provisional: bool = False) -> None:
        old = self.seconds.get(size)
        if old is None or size in self._provisional:
            self.seconds[size] = seconds
        else:
            self.seconds[size] = old + self.smoothing * (seconds - old)
        self._provisional.discard(size)
        if provisional:
            self._provisional.add(size)

    def __call__(self, size: int) -> float:
        if not self.seconds:
            return 0.0
        if size in self.seconds:
            t = self.seconds[size]
        else:
            nearest = sorted(self.seconds, key=lambda k: (abs(k - size), k))[:2]
            if len(nearest) == 1:
                t = self.seconds[nearest[0]] * size / nearest[0]
            else:
                (k1, t1), (k2, t2) = sorted((k, self.seconds[k]) for k in nearest)
                t = max(0.0, t1 + (t2 - t1) * (size - k1) / (k2 - k1))
        # A batch costs no more than its prompts one by one: a figure of a size measured while the machine
        # was busy would otherwise keep refusing that size, so it would never be measured again.
        return min(t, size * self.seconds[1]) if 1 in self.seconds and size > 1 else t


class MicroBatcher:
    """`await submit(item)` → `fn([items])[i]`; one `fn` call at a time, in a worker thread, over
    the calls that waited while the previous one ran (at most `max_batch_size`).

    `fill_wait_s` > 0: while saturated (the last batch was full, or `saturated()` says calls were
    refused since it started), a batch that is not yet full waits up to that long for more calls before
    it runs; at light load a call never waits. `answers_within(budget_s)` tells, from the measured
    forward times (`cost`), whether a call submitted now would be answered within that budget, and
    every call already in its batch within theirs."""

    def __init__(self, fn, max_batch_size: int, on_batch=None, fill_wait_s: float = 0.0):
        self.fn, self.max_batch_size, self.on_batch = fn, max_batch_size, on_batch
        self.fill_wait_s = fill_wait_s
        self.saturated = False  # set by the owner when it refuses a call; cleared at each batch
        self.cost = ForwardCost()
        self._waiting: list[tuple[Any, asyncio.Future, float]] = []  # (item, future, arrival time)
        self._running = False
        self._batch: tuple[int, float] | None = None  # the forward running now: (size, start time)
        self._full = asyncio.Event()
        self._last_full = False

    def answers_within(self, budget_s: float) -> bool:
        """True if a call arriving now would be answered within `budget_s` (its wait and forward), and the
        calls already waiting in the batch it would join still within `budget_s` of their arrival.
        An idle replica always takes a call."""
        return self.lateness(budget_s) <= 0.0

    def lateness(self, budget_s: float) -> float:
        """Seconds by which a call arriving now would miss `budget_s` (≤ 0: it would not), see
        `answers_within`; while a forward runs, it is about how long until such a call would fit."""
        if self._batch is None and not self._waiting:
            return 0.0
        now = time.perf_counter()
        remaining = max(0.0, self.cost(self._batch[0]) - (now - self._batch[1])) if self._batch else 0.0
        full_ahead, joined = divmod(len(self._waiting), self.max_batch_size)
        start = now + remaining + full_ahead * self.cost(self.max_batch_size)
        if joined + 1 < self.max_batch_size and (self._last_full or self.saturated):
            start += self.fill_wait_s  # a short batch waits to fill while saturated
        batch_mates = self._waiting[full_ahead * self.max_batch_size:]
        earliest = min([now, *(arrived for _, _, arrived in batch_mates)])
        return start + self.cost(joined + 1) - earliest - budget_s

    async def submit(self, item: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append((item, fut, time.perf_counter()))
        if len(self._waiting) >= self.max_batch_size:
            self._full.set()
        if not self._running:
            self._running = True
            asyncio.create_task(self._drain())
        return await fut

    async def _fill(self) -> None:
        """Wait (bounded) for a full batch when the replica is saturated."""
        if self.fill_wait_s <= 0 or len(self._waiting) >= self.max_batch_size:
            return
        if not (self._last_full or self.saturated):
            return
        self._full.clear()
        try:
            await asyncio.wait_for(self._full.wait(), self.fill_wait_s)
        except asyncio.TimeoutError:
            pass

    async def _drain(self) -> None:
        try:
            while self._waiting:
                await self._fill()
                batch = [(i, f) for i, f, _ in self._waiting[: self.max_batch_size] if not f.done()]
                self._waiting = self._waiting[self.max_batch_size:]
                if not batch:
                    continue
                self._last_full, self.saturated = len(batch) >= self.max_batch_size, False
                t0 = time.perf_counter()
                self._batch = (len(batch), t0)
                try:
                    results = await asyncio.to_thread(self.fn, [i for i, _ in batch])
                except Exception as e:  # noqa: BLE001 — every caller of this batch gets the error
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(e)
                    continue
                finally:
                    self._batch = None
                seconds = time.perf_counter() - t0
                self.cost.observe(len(batch), seconds)
                for (_, f), r in zip(batch, results):
                    if not f.done():  # a caller that gave up (cancelled) is skipped
                        f.set_result(r)
                if self.on_batch is not None:
                    self.on_batch(len(batch), seconds * 1000)
        finally:
            self._running = False


@serve.deployment  # resources, autoscaling and batching knobs come from the YAML
class InterestEncoder:
    def __init__(self, artifact: str):
        import torch

        self.device = torch.device("cpu")
        self.max_new_tokens = 24
        # Recent batch sizes and forward times, and admitted encode calls' time here (arrival → answer),
        # for profiling (`info`): bounded deques, appended on the serving path without a copy.
        self.batch_sizes: deque[int] = deque(maxlen=STATS_KEPT)
        self.forward_ms: deque[float] = deque(maxlen=STATS_KEPT)
        self.held_ms: deque[float] = deque(maxlen=STATS_KEPT)
        self.batcher = MicroBatcher(self._embed_items, DEFAULT_MAX_BATCH_SIZE, self._record_batch)
        self.versions = HeldVersions(self._load, artifact)
        self._explain_slots = asyncio.Semaphore(1)
        self.pending = 0  # admitted encode calls not yet answered (waiting + running batch)
        self.rejected = 0
        self._configure({})  # code defaults; Serve then calls reconfigure(user_config) from the YAML

    def _load(self, artifact: str) -> EncoderState:
        state = load_encoder_state(artifact)
        state.model.to(self.device)
        queries, histories = zip(*WARMUP_PROMPTS)
        for _ in range(2):  # first forwards allocate and pick kernels: keep that off the first request
            embed(state, list(queries), list(histories), self.device)
        for size in (1, len(queries)):  # the admission's first forward times (`max_wait_forwards`)
            t0 = time.perf_counter()
            embed(state, list(queries[:size]), list(histories[:size]), self.device)
            self.batcher.cost.observe(size, time.perf_counter() - t0, provisional=True)
        return state

    async def reconfigure(self, cfg: dict[str, Any]) -> None:
        """Serve calls this with the YAML's `user_config` on start and on every config update.
        A version to load (a rollout) loads in a worker thread: this replica keeps serving meanwhile."""
        self._configure(cfg)
        await asyncio.to_thread(self.versions.hold, cfg.get("artifacts"))

    def _configure(self, cfg: dict[str, Any]) -> None:
        import torch

        self.torch_threads = int(cfg.get("torch_threads") or 0)  # applied in the worker threads that compute
        self.max_batch_size = self.batcher.max_batch_size = int(cfg.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE))
        self.max_new_tokens = int(cfg.get("max_new_tokens", self.max_new_tokens))
        self._explain_slots = asyncio.Semaphore(int(cfg.get("explain_concurrency", 1)))
        self.max_pending = int(cfg.get("max_pending", 0))
        self.max_wait_forwards = float(cfg.get("max_wait_forwards", 0))
        self.batcher.fill_wait_s = float(cfg.get("batch_fill_wait_ms", 0)) / 1000.0
        device = str(cfg.get("device", "auto"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if torch.device(device) != self.device:
            self.device = torch.device(device)
            for _, state in self.versions.items():
                state.model.to(self.device)

    def _embed_mixed(self, artifacts: list[str], queries: list[str], histories: list[list[int]]
                     ) -> list[tuple[np.ndarray, str]]:
        """One forward per version present in the batch (one in steady state, two during a rollout)."""
        out: list[tuple[np.ndarray, str] | None] = [None] * len(queries)
        for art in dict.fromkeys(artifacts):
            rows = [i for i, a in enumerate(artifacts) if a == art]
            state = self.versions.get(art)
            h = embed(state, [queries[i] for i in rows], [histories[i] for i in rows], self.device)
            for i, vec in zip(rows, h):
                out[i] = (vec, state.version)
        return out  # type: ignore[return-value]

    def _use_threads(self) -> None:
        """torch's thread count is per OS thread (OpenMP): forwards and decodes run in worker threads,
        which start at OMP_NUM_THREADS, so the configured count is set where they run."""
        if self.torch_threads:
            import torch

            torch.set_num_threads(self.torch_threads)

    def _embed_items(self, items: list[tuple[str, str, list[int]]]) -> list[tuple[np.ndarray, str]]:
        self._use_threads()
        artifacts, queries, histories = zip(*items)
        return self._embed_mixed(list(artifacts), list(queries), [list(h) for h in histories])

    def _record_batch(self, size: int, ms: float) -> None:
        self.batch_sizes.append(size)
        self.forward_ms.append(ms)

    async def encode(self, artifact: str, query: str, history: list[int]) -> tuple[np.ndarray, str]:
        """((d,) float32 unit vector, version). History ids must be known (the ingress filters them).
        Refused at once (StageOverloaded) when the replica already holds `max_pending` calls, or when it
        would answer later than `max_wait_forwards` single-prompt forwards from now (measured here)."""
        reason, late = None, 0.0
        if self.max_pending and self.pending >= self.max_pending:
            reason = f"encoder replica holds {self.pending} requests (max_pending {self.max_pending})"
        elif self.max_wait_forwards:
            late = self.batcher.lateness(self.max_wait_forwards * self.batcher.cost(1))
            if late > 0:
                reason = (f"encoder replica would answer {late * 1000:.0f} ms after {self.max_wait_forwards} "
                          f"forwards of one prompt ({self.pending} requests held)")
        if reason:
            self.rejected += 1
            self.batcher.saturated = True
            raise StageOverloaded(reason, retry_in_s=max(late, 0.0))
        self.pending += 1
        t0 = time.perf_counter()
        try:
            out = await self.batcher.submit((artifact, query or "", list(history)))
        finally:
            self.pending -= 1
        self.held_ms.append((time.perf_counter() - t0) * 1000)
        return out


    async def embed_items(self, artifact: str, items: list[dict[str, Any]]) -> tuple[np.ndarray, str]:
        """((N, d) item embeddings e_i, version) of items given as rows (item_id, title, category,
        attributes[, image_emb]): the hot refresh (karma_ray.serve.refresh) embeds new or cold items with
        the item tower and prompt of export. Runs in a worker thread beside the encode batches."""
        state = self.versions.get(artifact)
        return await asyncio.to_thread(self._embed_item_rows, state, items), state.version

    def _embed_item_rows(self, state: EncoderState, items: list[dict[str, Any]], batch: int = 64) -> np.ndarray:
        import pyarrow as pa
        import torch

        from karma_ray.data.prompts import PromptBuilder

        self._use_threads()
        b = state.builder
        builder = PromptBuilder(b.tok, pa.Table.from_pylist(items), b.cfg, b.image_dim)
        ids, out = [int(r["item_id"]) for r in items], []
        for s in range(0, len(ids), batch):
            arr = builder.items_batch(ids[s : s + batch])
            width = int(arr["mask"].sum(1).max())
            t = {k: torch.from_numpy(v).to(self.device) for k, v in arr.items()}
            t["ids"], t["mask"] = t["ids"][:, :width], t["mask"][:, :width]
            with torch.inference_mode():
                out.append(state.model.encode_items(**t).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)

    async def explain(self, artifact: str, query: str, history: list[int]) -> tuple[str, str]:
        """(text decoded from h, version). The decode runs in a worker thread, at most
        `explain_concurrency` at once, so the replica's event loop keeps batching encodes meanwhile."""
        h, version = await self.encode(artifact, query, history)
        state = self.versions.get(artifact)
        async with self._explain_slots:
            text = await asyncio.to_thread(self._decode, state, h)
        return text, version

    def _decode(self, state: EncoderState, h: np.ndarray) -> str:
        import torch

        self._use_threads()
        with torch.inference_mode():
            ids = state.model.decode_from_h(torch.from_numpy(h[None]).to(self.device), state.decode_prefix.to(self.device),
                                            state.builder.eos_id, self.max_new_tokens)[0]
        return state.builder.tok.decode(ids, skip_special_tokens=True).strip()

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and replaces it."""
        for key, state in self.versions.items():
            if state.model is None or not state.version:
                raise RuntimeError(f"encoder for {key} is not loaded or has no version")

    def info(self) -> dict[str, Any]:
        """Replica facts for profiling: recent batch sizes and tokenise+forward times (ms)."""
        import torch

        fw = np.asarray(self.forward_ms or [np.nan])
        return {"versions": {k: s.version for k, s in self.versions.items()}, "device": str(self.device),
                "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "torch_threads": torch.get_num_threads(), "batches": len(self.forward_ms),
                "mean_batch_size": float(np.mean(self.batch_sizes)) if self.batch_sizes else None,
                "forward_p50_ms": float(np.nanpercentile(fw, 50)), "forward_p99_ms": float(np.nanpercentile(fw, 99)),
                "held_p99_ms": float(np.percentile(self.held_ms, 99)) if self.held_ms else None,
                "max_batch_size": self.max_batch_size,
                "max_pending": self.max_pending, "pending": self.pending, "rejected": self.rejected,
                "max_wait_forwards": self.max_wait_forwards,
                "forward_ms_by_size": {k: round(v * 1000, 1) for k, v in sorted(self.batcher.cost.seconds.items())}}

    def reset_stats(self) -> None:
        """Forget recorded batch sizes and forward times (a benchmark measures one phase at a time)."""
        for stats in (self.batch_sizes, self.forward_ms, self.held_ms):
            stats.clear()
        self.rejected = 0
