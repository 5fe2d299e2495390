"""InterestEncoder: (query, history ids) → h, batched with `@serve.batch`; and /explain decoding.

Batching and thread knobs come from the deployment's `user_config` (set in the YAML):
  max_batch_size, batch_wait_timeout_s, torch_threads, max_new_tokens, device ("auto"|"cpu"|"cuda").
The code defaults are neutral (batches of up to 8, 2 ms wait, torch's own thread count).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
from ray import serve

log = logging.getLogger("ray.serve")

DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_BATCH_WAIT_S = 0.002


@serve.deployment  # resources, autoscaling and batching knobs come from the YAML
class InterestEncoder:
    def __init__(self, artifact: str):
        import torch

        from karma_ray.artifact.reader import load_artifact

        t0 = time.perf_counter()
        art = load_artifact(artifact)
        self.model, self.tok, self.builder = art.model, art.tokenizer, art.builder
        self.version = art.version
        self.device = torch.device("cpu")
        self._next_ids = torch.tensor(self.tok("Next: ", add_special_tokens=False).input_ids, dtype=torch.long)
        self.max_new_tokens = 24
        self.batch_sizes: list[int] = []  # recent batch sizes and forward times, for profiling (`info`)
        self.forward_ms: list[float] = []
        self.reconfigure({})  # code defaults; Serve then calls reconfigure(user_config) from the YAML
        log.info("InterestEncoder loaded %s in %.1fs on %s", art.path, time.perf_counter() - t0, self.device)

    def reconfigure(self, cfg: dict[str, Any]) -> None:
        """Serve calls this with the YAML's `user_config` on start and on every config update."""
        import torch

        if cfg.get("torch_threads"):
            torch.set_num_threads(int(cfg["torch_threads"]))
        self.max_batch_size = int(cfg.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE))
        self.batch_wait_timeout_s = float(cfg.get("batch_wait_timeout_s", DEFAULT_BATCH_WAIT_S))
        self._encode_batch.set_max_batch_size(self.max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(self.batch_wait_timeout_s)
        self.max_new_tokens = int(cfg.get("max_new_tokens", self.max_new_tokens))
        device = str(cfg.get("device", "auto"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if torch.device(device) != self.device:
            self.device = torch.device(device)
            self.model.to(self.device)

    def _embed(self, queries: list[str], histories: list[list[int]]) -> np.ndarray:
        import torch

        arr = self.builder.interest_batch(queries, histories)
        width = int(arr["int_mask"].sum(1).max())
        t = {k: torch.from_numpy(v).to(self.device) for k, v in arr.items()}
        with torch.inference_mode():
            h = self.model.encode_interest(t["int_ids"][:, :width], t["int_mask"][:, :width], t["int_pos"])
        return h.float().cpu().numpy().astype(np.float32, copy=False)

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def _encode_batch(self, queries: list[str], histories: list[list[int]]) -> list[np.ndarray]:
        t0 = time.perf_counter()
        h = self._embed(list(queries), [list(x) for x in histories])
        self.batch_sizes = (self.batch_sizes + [len(queries)])[-2000:]
        self.forward_ms = (self.forward_ms + [(time.perf_counter() - t0) * 1000])[-2000:]
        return list(h)

    async def encode(self, query: str, history: list[int]) -> np.ndarray:
        """(d,) float32 unit vector. History ids must be known (the ingress filters them)."""
        return await self._encode_batch(query or "", list(history))

    def encode_direct(self, query: str, history: list[int]) -> np.ndarray:
        """The same computation without `@serve.batch` (which only runs inside a Serve replica in
        Ray 2.60): for in-process use such as benchmarks/serve_latency.py."""
        return self._embed([query or ""], [list(history)])[0]

    async def explain(self, query: str, history: list[int]) -> str:
        import torch

        h = await self.encode(query, history)
        ids = self.model.decode_from_h(torch.from_numpy(h[None]).to(self.device), self._next_ids.to(self.device),
                                       self.builder.eos_id, self.max_new_tokens)[0]
        return self.tok.decode(ids, skip_special_tokens=True).strip()

    def info(self) -> dict[str, Any]:
        """Replica facts for profiling: recent batch sizes and tokenise+forward times (ms)."""
        import torch

        fw = np.asarray(self.forward_ms or [np.nan])
        return {"version": self.version, "device": str(self.device), "pid": os.getpid(),
                "torch_threads": torch.get_num_threads(), "batches": len(self.forward_ms),
                "mean_batch_size": float(np.mean(self.batch_sizes)) if self.batch_sizes else None,
                "forward_p50_ms": float(np.nanpercentile(fw, 50)), "forward_p99_ms": float(np.nanpercentile(fw, 99)),
                "max_batch_size": self.max_batch_size, "batch_wait_timeout_s": self.batch_wait_timeout_s}


def app(args: dict[str, str] | None = None):
    """`serve run karma_ray.serve.encoder:app artifact=DIR` — the encoder alone (for profiling)."""
    from karma_ray.serve.app import default_artifact

    return InterestEncoder.bind((args or {}).get("artifact") or default_artifact())
