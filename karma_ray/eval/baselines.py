"""The arms every trained encoder is compared with, scored by the same code on the same events.

- popularity: exact training-click counts (what peer code calls Pop);
- SASRec: the ID-only sequential peer, trained to convergence with early stopping on validation;
- frozen: the pretrained LM with no task training, read out by mean pooling or at [INT]/[ITEM],
  whichever is better on validation.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np

from karma_ray.config import KarmaConfig
from karma_ray.data.catalog import ItemCatalog
from karma_ray.data.events import train_events_path, train_targets
from karma_ray.eval.evaluate import SELECT_METRIC, SplitEvents, evaluate_encoder, score_splits, split_ranks


def popularity_arm(data_dir: str | Path, catalog: ItemCatalog, splits: dict[str, SplitEvents], cfg) -> dict[str, Any]:
    """Rank every item by its number of training clicks."""
    counts = catalog.click_counts(train_targets(data_dir))
    return score_splits(splits, catalog.ids, lambda split: (lambda s, e: np.broadcast_to(counts, (e - s, len(counts)))), cfg)


def sasrec_arm(data_dir: str | Path, catalog: ItemCatalog, splits: dict[str, SplitEvents], cfg: KarmaConfig,
               seed: int = 0, log=print) -> dict[str, Any]:
    """Train SASRec on every training event, stopping early on validation HR@10; score it."""
    import pyarrow.dataset as pads

    from karma_ray.models.sasrec import train_sasrec

    train = pads.dataset(str(train_events_path(data_dir)), format="parquet").to_table(columns=["history", "target"])

    def scores_of(model):
        return lambda split: (lambda s, e: model.scores(splits[split].histories[s:e]))

    curve: list[dict[str, Any]] = []

    def validate(model) -> float:
        """Validation HR@10 (what stops training, like RecBole's valid metric); HR@50 goes on the curve."""
        ranks = split_ranks(splits["valid"], catalog.ids, scores_of(model)("valid"))
        curve.append({"hr@10": float(((ranks > 0) & (ranks <= 10)).mean()), "hr@50": float(((ranks > 0) & (ranks <= 50)).mean())})
        return curve[-1]["hr@10"]

    def on_epoch(epoch: int, loss: float, valid: float | None) -> None:
        log(f"   sasrec epoch {epoch}: loss {loss:.4f}, valid HR@10 {valid:.4f}, HR@50 {curve[-1]['hr@50']:.4f}")

    t0 = time.perf_counter()
    model, history = train_sasrec(catalog.ids, train.column("history").to_pylist(), train.column("target").to_numpy(),
                                  cfg.baselines, seed=seed, validate=validate, on_epoch=on_epoch)
    out = score_splits(splits, catalog.ids, scores_of(model), cfg.eval)
    best = max(history, key=lambda r: r["valid"])
    out.update({"epochs": len(history), "best_epoch": best["epoch"], "rows_per_epoch": history[0]["rows_seen"],
                "training_rows": best["rows_seen"], "train_seconds": round(time.perf_counter() - t0, 1),
                "learning_curve": [r | {"valid_hr@50": c["hr@50"]} for r, c in zip(history, curve)], "loss_first_last": [history[0]["loss"], history[-1]["loss"]]})
    return out


def frozen_model(cfg: KarmaConfig, readout: str, readout_stats_of):
    """The untrained LM with `readout` ("mean" or "token") and the centred identity readout training starts from."""
    from karma_ray.models.karma import build_model

    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.readout = readout
    model, _ = build_model(model_cfg, cfg.loss)
    model.init_readout(*readout_stats_of(model))
    return model


def frozen_arm(cfg: KarmaConfig, inputs, data_dir: str | Path, catalog: ItemCatalog, logq: np.ndarray,
               readout_stats_of, fidelity=None, progress: bool = False) -> dict[str, Any]:
    """The untrained LM with the same centred identity readout training starts from, for each readout;
    the one with the better validation HR@50 is the arm (both are recorded)."""
    results = {}
    for readout in ("mean", "token"):
        model = frozen_model(cfg, readout, readout_stats_of)
        results[readout] = evaluate_encoder(model, inputs, data_dir, cfg.eval, catalog, logq, fidelity, progress)
    pick = max(results, key=lambda r: results[r]["splits"]["valid"][SELECT_METRIC])
    return results[pick] | {"readout": pick, "readout_valid": {  # HR@10/200 too: equal HR@50s can be a tie
        r: {k: m["splits"]["valid"][k] for k in ("hr@10", "hr@50", "hr@200")} for r, m in results.items()}}


__all__ = ["frozen_arm", "frozen_model", "popularity_arm", "sasrec_arm"]
