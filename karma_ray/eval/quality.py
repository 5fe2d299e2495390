"""The Knowledge–Action Gap benchmark's library side: run one arm-seed, merge parts, pair, report.

`benchmarks/quality.py` is a thin command line over this module; the tests call it directly on the tiny
preset. Every arm is scored by `karma_ray.eval.evaluate` on the same events of the `cold` protocol:
validation and test side by side, warm and cold, with and without the α·log(click share) prior.
Trained arms go through the platform's own path (trunk cache → Ray Data → Ray Train → artifact).
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from karma_ray.config import KarmaConfig
from karma_ray.data.catalog import ItemCatalog
from karma_ray.data.events import load_items, train_targets
from karma_ray.eval.evaluate import SplitEvents, evaluate_artifact, load_splits, summarize
from karma_ray.eval.stats import hits_at, paired_difference

ARMS = ("popularity", "sasrec", "frozen", "action_only", "gen_only", "recon_only", "karma")
LLM_ARMS = {"action_only": (0.0, 0.0), "gen_only": (None, 0.0), "recon_only": (0.0, None), "karma": (None, None)}
PAIRED = (("karma", "action_only"),)
PAIRED_METRICS = {"hr@50": ("test", 50), "hr@50_cold": ("test_cold", 50), "hr@10": ("test", 10),
                  "hr@50_valid": ("valid", 50), "hr@50_cold_valid": ("valid_cold", 50)}


@dataclass
class Context:
    """What every arm shares: the config, the split, the catalogue, click shares and the trunk cache."""

    cfg: KarmaConfig
    data_dir: Path
    catalog: ItemCatalog
    splits: dict[str, SplitEvents]
    logq: np.ndarray
    cache: Any = None

    @classmethod
    def create(cls, cfg: KarmaConfig, cache=None) -> "Context":
        data_dir = cfg.data_dir
        catalog = ItemCatalog(load_items(data_dir, cfg.model.image_dim))
        return cls(cfg, data_dir, catalog, load_splits(data_dir, cfg.eval), catalog.log_click_share(train_targets(data_dir)),
                   cache)


def arm_config(cfg: KarmaConfig, arm: str, seed: int) -> KarmaConfig:
    """The one config difference between arms is the ablated λ; seeds vary initialisation and data order."""
    gen, rec = LLM_ARMS[arm]
    return cfg.with_overrides([f"loss.lambda_gen={cfg.loss.lambda_gen if gen is None else gen}",
                               f"loss.lambda_rec={cfg.loss.lambda_rec if rec is None else rec}",
                               f"train.seed={seed}", f"train.name=quality-{arm}-s{seed}"])


def run_arm(ctx: Context, arm: str, seed: int, log=print) -> dict[str, Any]:
    """One arm at one seed -> its metrics (valid and test, per-event ranks, timings, load)."""
    from karma_ray.eval.baselines import popularity_arm, sasrec_arm

    t0, load0 = time.perf_counter(), os.getloadavg()
    if arm == "popularity":
        out = popularity_arm(ctx.data_dir, ctx.catalog, ctx.splits, ctx.cfg.eval)
        out["training_rows"] = int(len(train_targets(ctx.data_dir)))
    elif arm == "sasrec":
        out = sasrec_arm(ctx.data_dir, ctx.catalog, ctx.splits, ctx.cfg, seed, log)
    elif arm == "frozen":
        out = _frozen(ctx)
        out["training_rows"] = 0
    else:
        out = _trained(ctx, arm, seed, log)
    out.update(seconds=round(time.perf_counter() - t0, 1), load_before=load0, load_after=os.getloadavg(), seed=seed)
    out["summary"] = summarize(out)
    out["summary_valid"] = summarize(out, {"warm": "valid", "cold": "valid_cold"})
    if "prior" in out:
        out["summary_prior"] = summarize(out["prior"] | {"attention": out.get("attention"), "fidelity": out.get("fidelity")})
    return out


def _fidelity(ctx: Context, builder):
    from karma_ray.eval.fidelity import FidelityProbe

    return FidelityProbe(builder, ctx.data_dir, ctx.cfg, ctx.cfg.eval, ctx.cache) if ctx.cfg.eval.fidelity_samples else None


def _frozen(ctx: Context) -> dict[str, Any]:
    from karma_ray.data.prompts import PromptBuilder
    from karma_ray.eval.baselines import frozen_arm
    from karma_ray.models.backbone import load_tokenizer
    from karma_ray.models.inference import CachedInputs, TokenInputs
    from karma_ray.train.loop import WorkerInputs

    tok = load_tokenizer(ctx.cfg.model.backbone)
    builder = PromptBuilder(tok, ctx.catalog, ctx.cfg.data, ctx.cfg.model.image_dim)
    worker = WorkerInputs(ctx.cfg, str(ctx.cache.root) if ctx.cache else None, tok)
    image = ctx.catalog.image if ctx.cfg.model.image_dim else None
    inputs = CachedInputs(ctx.cache, ctx.cfg.eval.batch_size, image) if ctx.cache else TokenInputs(builder, ctx.cfg.eval.batch_size)
    return frozen_arm(ctx.cfg, inputs, ctx.data_dir, ctx.catalog, ctx.logq, worker.readout_statistics, _fidelity(ctx, builder))


def _trained(ctx: Context, arm: str, seed: int, log) -> dict[str, Any]:
    from karma_ray.allocator import allocator_in_use
    from karma_ray.train.run import run_with_history

    cfg = arm_config(ctx.cfg, arm, seed)
    t0 = time.perf_counter()
    art, history = run_with_history(cfg, run_name=f"quality-{arm}-s{seed}-{time.strftime('%H%M%S')}", show_progress=False)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    metrics, _ = evaluate_artifact(art, ctx.cfg.eval, progress=False, cache=ctx.cache)
    eval_s = time.perf_counter() - t1
    first, last = (history[0] if history else {}), (history[-1] if history else {})
    log(f"   {arm} s{seed}: trained in {train_s:.0f} s, evaluated in {eval_s:.0f} s")
    return metrics | {
        "artifact": str(art), "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
        "training_rows": int(last.get("rows_seen", cfg.train.max_steps * cfg.train.batch_size)),
        "step0_losses": {k.removesuffix("_step0"): v for k, v in first.items() if k.endswith("_step0") and "valid" not in k},
        "final_losses": {k: last.get(k) for k in ("loss", "act", "gen", "rec")},
        "learning_curve": ([{"rows_seen": 0, "valid_hr@50": first["valid_hr@50_step0"]}] if "valid_hr@50_step0" in first else [])
        + [{"rows_seen": r["valid_step"] * cfg.train.batch_size * cfg.train.num_workers, "valid_hr@50": r["valid_hr@50"]}
           for r in history if "valid_step" in r],
        "loss_history": [{k: r.get(k) for k in ("step", "act", "gen", "rec", "sink_rate")} for r in history],
        "update_shares": [{k: v for k, v in r.items() if k.startswith("update_")} for r in history
                          if "update_share_step" in r],
        "train_time": train_time(history, train_s),
        "malloc": {"train_worker": first.get("malloc"), "driver": allocator_in_use()}}


def train_time(history: list[dict[str, Any]], train_s: float) -> dict[str, float]:
    """Where an arm's training seconds went: optimiser steps alone, the loop (steps plus data waits,
    validation, probes and update shares), the rest (Ray start-up, model load, readout start, checkpoints,
    export of the artifact), and the worker's own seconds by phase (`loop.PhaseClock`)."""
    steps = loop = 0.0
    prev = 0
    spent: dict[str, float] = {}  # the worker's seconds by phase besides optimiser steps (loop.PhaseClock)
    for r in history:
        if "step" in r and "step_s" in r:
            n = r["step"] - prev
            steps, loop, prev = steps + r.get("optim_step_s", 0.0) * n, loop + r["step_s"] * n, r["step"]
        for phase, s in ((k.removeprefix("spent_").removesuffix("_s"), v) for k, v in r.items() if k.startswith("spent_")):
            spent[phase] = spent.get(phase, 0.0) + s
    return {"optimizer_steps_s": round(steps, 1), "loop_s": round(loop, 1), "outside_loop_s": round(train_s - loop, 1),
            "worker_phases_s": {k: round(v, 1) for k, v in sorted(spent.items())}}


# ---- merging parts ---------------------------------------------------------------------------
SUMMARY_ROWS = ("summary", "summary_valid", "summary_prior")


def aggregate(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of every summary row (None stays None), each seed's rows, and the spread."""
    out: dict[str, Any] = {}
    for row in SUMMARY_ROWS:
        rows = [m[row] for m in per_seed.values() if row in m]
        if not rows:
            continue
        mean = {k: (statistics.mean(v) if (v := [r[k] for r in rows if r.get(k) is not None]) else None) for k in rows[0]}
        if row == "summary":
            out.update(mean)
        else:
            out[row.replace("summary_", "")] = mean
    out["seeds"] = {str(s): m["summary"] for s, m in per_seed.items()}
    out["training_rows"] = next(iter(per_seed.values())).get("training_rows")
    out["spread"] = {k: (max(v) - min(v)) for k in ("hr@10", "hr@50", "hr@50_cold")
                     if len(v := [m["summary"][k] for m in per_seed.values() if m["summary"].get(k) is not None]) > 1}
    return out


def paired(raw: dict[str, dict[int, dict]], splits: dict[str, SplitEvents], n_boot: int, seed: int) -> dict[str, Any]:
    """KARMA − action-only per metric: mean over (seed, event) pairs, hierarchical bootstrap CI."""
    out: dict[str, Any] = {}
    for a, b in PAIRED:
        if a not in raw or b not in raw:
            continue
        seeds = sorted(set(raw[a]) & set(raw[b]))
        row: dict[str, Any] = {"seeds": seeds}
        for name, (split, k) in PAIRED_METRICS.items():
            if split not in splits or not seeds:
                continue
            ha = np.stack([hits_at(raw[a][s]["ranks"][split], k) for s in seeds])
            hb = np.stack([hits_at(raw[b][s]["ranks"][split], k) for s in seeds])
            row[name] = paired_difference(ha, hb, splits[split].clusters, n_boot, seed)
        out[f"{a}-{b}"] = row
    return out


def targets(arms: dict[str, Any], n_items: int, l_gen_step0: float | None, paired_rows: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each against the measured figure and the row that meets it (if any)."""
    def get(arm, key, row=None):
        a = arms.get(arm) or {}
        return (a.get(row) or {}).get(key) if row else a.get(key)

    def ratio(x, y):
        return round(x / y, 3) if x is not None and y else None

    llm = [a for a in arms if a in LLM_ARMS or a == "frozen"]
    best_plain = max(llm, key=lambda a: get(a, "hr@50") or 0, default=None)
    best_prior = max(llm, key=lambda a: get(a, "hr@50", "prior") or 0, default=None)
    pd = paired_rows.get("karma-action_only", {}).get("hr@50_cold", {})
    random50 = 50 / n_items
    return [
        {"measure": "L_gen at step 0 (nats)", "target": "<= 4.0", "value": l_gen_step0,
         "met": l_gen_step0 is not None and l_gen_step0 <= 4.0},
        {"measure": "KARMA / action-only, cold HR@50", "target": ">= 1.2, paired 95% CI of the difference above 0",
         "value": ratio(get("karma", "hr@50_cold"), get("action_only", "hr@50_cold")), "paired_ci": pd.get("ci"),
         "met": (ratio(get("karma", "hr@50_cold"), get("action_only", "hr@50_cold")) or 0) >= 1.2 and bool(pd) and pd["ci"][0] > 0},
        {"measure": "KARMA / action-only, warm HR@50", "target": ">= 1.0",
         "value": ratio(get("karma", "hr@50"), get("action_only", "hr@50")),
         "met": (ratio(get("karma", "hr@50"), get("action_only", "hr@50")) or 0) >= 1.0},
        {"measure": "best LLM arm / popularity, warm HR@50 (no prior)", "target": ">= 1.0", "row": best_plain,
         "value": ratio(get(best_plain, "hr@50"), get("popularity", "hr@50")),
         "met": (ratio(get(best_plain, "hr@50"), get("popularity", "hr@50")) or 0) >= 1.0},
        {"measure": "best LLM arm / popularity, warm HR@50 (with the prior, α chosen on validation)", "target": ">= 1.0",
         "row": best_prior, "value": ratio(get(best_prior, "hr@50", "prior"), get("popularity", "hr@50")),
         "met": (ratio(get(best_prior, "hr@50", "prior"), get("popularity", "hr@50")) or 0) >= 1.0},
        {"measure": f"KARMA cold HR@50 / random (50/{n_items})", "target": ">= 3",
         "value": ratio(get("karma", "hr@50_cold"), random50),
         "met": (ratio(get("karma", "hr@50_cold"), random50) or 0) >= 3},
    ]


def merge(parts: list[dict[str, Any]], ctx: Context, budget: dict[str, Any]) -> dict[str, Any]:
    """Parts (one arm-seed each) -> quality.json's document."""
    raw: dict[str, dict[int, dict]] = {}
    for p in parts:
        raw.setdefault(p["arm"], {})[int(p["seed"])] = p["metrics"]
    arms = {a: aggregate(raw[a]) for a in ARMS if a in raw}
    pairs = paired(raw, ctx.splits, ctx.cfg.eval.n_boot, ctx.cfg.eval.seed)
    l_gen = next((m["step0_losses"].get("gen") for s, m in sorted(raw.get("karma", {}).items()) if m.get("step0_losses")), None)
    budget = budget | {"l_gen_step0": l_gen, "arm_seconds": {f"{p['arm']}-s{p['seed']}": p["metrics"]["seconds"] for p in parts},
                       "rows_per_arm": {a: arms[a]["training_rows"] for a in arms},
                       # the allocator each part ran with (karma_ray.allocator): it moves the seconds, not the metrics
                       "malloc_by_part": {f"{p['arm']}-s{p['seed']}": p.get("malloc", "system") for p in parts}}
    meta = json.loads((ctx.data_dir / "meta.json").read_text())
    return {"protocol": ctx.cfg.eval.protocol, "budget": budget,
            "data": {"dataset": meta.get("dataset"), "path": str(ctx.data_dir), "data_hash": meta.get("data_hash"),
                     "counts": meta.get("counts"), "n_events": {s: len(e.targets) for s, e in ctx.splits.items()},
                     "n_clusters": {s: int(len(np.unique(e.clusters))) for s, e in ctx.splits.items()}},
            "eval": {k: v for k, v in vars(ctx.cfg.eval).items()},
            "arms": arms, "paired": pairs, "targets": targets(arms, len(ctx.catalog), l_gen, pairs),
            "details": {a: {str(s): _without_ranks(m) for s, m in seeds.items()} for a, seeds in raw.items()}}


def _without_ranks(m: dict[str, Any]) -> dict[str, Any]:
    """A part's metrics minus the per-event ranks (kept in the part files, which the pairing reads)."""
    out = {k: v for k, v in m.items() if k != "ranks" and not k.startswith("summary")}
    if "prior" in out:
        out["prior"] = {k: v for k, v in out["prior"].items() if k != "ranks"}
    return out
