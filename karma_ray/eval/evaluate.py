"""Offline evaluation (docs/design.md §4): full-catalogue retrieval with honest CIs, collapse, fidelity.

One scorer serves every arm (popularity, SASRec, the frozen LM, trained KARMA variants): it turns
(n, N) scores over the catalogue into exact 1-based ranks with each user's earlier clicks excluded,
then into HR/NDCG with cluster-bootstrap intervals (users on warm splits, items on cold splits).
LM arms may add the score-time prior α·log(click share); α is chosen on the validation split of the
same family (warm on `valid`, cold on `valid_cold`) and reported beside the prior-free figures.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from karma_ray.config import EvalConfig
from karma_ray.data.catalog import ItemCatalog
from karma_ray.data.events import COLD_SPLITS, eval_events
from karma_ray.eval.attention import interest_row_concentration, sink_rates
from karma_ray.eval.fidelity import effective_rank
from karma_ray.eval.retrieval import exclude_and_cut, retrieval_metrics, target_ranks
from karma_ray.eval.stats import cluster_bootstrap_ci, hits_at
from karma_ray.progress import progress_bar

PROTOCOL_SPLITS = {"standard": ("valid", "test"), "cold": ("valid", "test", "valid_cold", "test_cold")}
SELECT_ON = {"test": "valid", "test_cold": "valid_cold"}  # what a knob reported on a test split is chosen on
SELECT_METRIC = "hr@50"


@dataclass
class SplitEvents:
    """One evaluation split: its events, and the clusters its bootstrap resamples."""

    name: str
    events: pa.Table
    histories: list[list[int]]
    targets: np.ndarray
    clusters: np.ndarray  # user ids on warm splits, target item ids on cold splits

    @classmethod
    def load(cls, data_dir: str | Path, split: str, cfg: EvalConfig) -> "SplitEvents":
        ev = eval_events(data_dir, split, cfg)
        targets = ev.column("target").to_numpy()
        clusters = targets if split in COLD_SPLITS else ev.column("user_id").to_numpy()
        return cls(split, ev, ev.column("history").to_pylist(), targets, clusters)


def load_splits(data_dir: str | Path, cfg: EvalConfig) -> dict[str, SplitEvents]:
    return {s: SplitEvents.load(data_dir, s, cfg) for s in PROTOCOL_SPLITS[cfg.protocol]
            if (Path(data_dir) / f"{s}.parquet").exists()}


# ---- ranks and reports ---------------------------------------------------------------------
def exact_ranks(scores: np.ndarray, item_ids: np.ndarray, histories: Sequence[Sequence[int]],
                targets: np.ndarray) -> np.ndarray:
    """1-based rank of each target among all catalogue items minus the user's earlier clicks.

    `scores` is (n, N) over `item_ids` (sorted). Ties count against the target (pessimistic), so a
    constant scorer cannot look good. Targets outside the catalogue get rank 0 (a miss).
    """
    scores = np.array(scores, dtype=np.float64, copy=True)
    catalog = item_ids if isinstance(item_ids, ItemCatalog) else ItemCatalog.of_ids(item_ids)
    pos = catalog.rows_or(targets)
    ranks = np.zeros(len(targets), np.int64)
    for r, hist in enumerate(histories):
        if len(hist):
            h = np.asarray(hist, np.int64)
            hp = catalog.rows_or(h[h != targets[r]])
            scores[r, hp[hp >= 0]] = -np.inf
        if pos[r] >= 0:
            ranks[r] = int((scores[r] >= scores[r, pos[r]]).sum())  # the target plus every item tying or beating it
    return ranks


def split_ranks(split: SplitEvents, item_ids: np.ndarray, score_rows, chunk: int = 512) -> np.ndarray:
    """Ranks for a split, scoring `chunk` events at a time: `score_rows(start, stop) -> (m, N)`."""
    item_ids = item_ids if isinstance(item_ids, ItemCatalog) else ItemCatalog.of_ids(item_ids)
    out = [exact_ranks(score_rows(s, min(s + chunk, len(split.targets))), item_ids, split.histories[s : s + chunk],
                       split.targets[s : s + chunk]) for s in range(0, len(split.targets), chunk)]
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def retrieval_report(ranks: np.ndarray, cfg: EvalConfig, clusters: np.ndarray | None = None) -> dict[str, Any]:
    """HR@K with a 95% cluster-bootstrap CI, NDCG@K, n, and the HR curve for K = 1..max(ks)."""
    out: dict[str, Any] = {"n": int(len(ranks)), "n_clusters": int(len(np.unique(clusters))) if clusters is not None else int(len(ranks))}
    for k in cfg.ks:
        hits = hits_at(ranks, k)
        out[f"hr@{k}"] = float(hits.mean()) if len(hits) else None
        out[f"hr@{k}_ci95"] = list(cluster_bootstrap_ci(hits, clusters, cfg.n_boot, cfg.seed)) if len(hits) else None
    for k in cfg.ndcg_ks:
        gain = np.where((ranks > 0) & (ranks <= k), 1.0 / np.log2(np.maximum(ranks, 1) + 1.0), 0.0)
        out[f"ndcg@{k}"] = float(gain.mean()) if len(gain) else None
    grid = np.arange(1, max(cfg.ks) + 1)
    out["hr_curve"] = [float(hits_at(ranks, int(k)).mean()) if len(ranks) else None for k in grid]
    return out


def score_splits(splits: dict[str, SplitEvents], item_ids: np.ndarray, score_rows_of, cfg: EvalConfig) -> dict[str, Any]:
    """Reports and per-event ranks for every split; `score_rows_of(split) -> score_rows(start, stop)`."""
    ranks = {name: split_ranks(s, item_ids, score_rows_of(name)) for name, s in splits.items()}
    return {"splits": {name: retrieval_report(r, cfg, splits[name].clusters) for name, r in ranks.items()},
            "ranks": {name: r.tolist() for name, r in ranks.items()}}


def embedding_scores(h: dict[str, np.ndarray], item_emb: np.ndarray, logq: np.ndarray | None = None,
                     alpha: float = 0.0):
    """score_rows_of for inner-product arms, with the optional prior α·log(click share)."""
    prior = alpha * logq[None, :] if alpha and logq is not None else 0.0
    return lambda split: (lambda s, e: h[split][s:e] @ item_emb.T + prior)


def score_with_prior(splits: dict[str, SplitEvents], item_ids: np.ndarray, h: dict[str, np.ndarray],
                     item_emb: np.ndarray, logq: np.ndarray, cfg: EvalConfig) -> dict[str, Any]:
    """Prior-free scores, plus the prior with α chosen per split family on its validation split."""
    base = score_splits(splits, item_ids, embedding_scores(h, item_emb), cfg)
    chosen: dict[str, float] = {}
    for valid in ("valid", "valid_cold"):
        if valid in splits:
            scored = {a: retrieval_report(split_ranks(splits[valid], item_ids, embedding_scores(h, item_emb, logq, a)(valid)),
                                          cfg)[SELECT_METRIC] for a in cfg.prior_alphas}
            chosen[valid] = max(scored, key=lambda a: (scored[a], -a))
    alpha_of = {name: chosen.get(SELECT_ON.get(name, name), 0.0) for name in splits}
    with_prior = score_splits(splits, item_ids, lambda name: embedding_scores(h, item_emb, logq, alpha_of[name])(name), cfg)
    return base | {"prior": {"alpha": alpha_of, "chosen_on": SELECT_METRIC} | with_prior}


# ---- encoders ------------------------------------------------------------------------------
def interest_batches(inputs, split: SplitEvents, by_length: bool = False):
    """Interest inputs for a split: cached states when `inputs` is a CachedInputs (length-sorted with
    `by_length`, for `embed`), else token ids in event order."""
    from karma_ray.models.inference import CachedInputs

    if isinstance(inputs, CachedInputs):
        return inputs.interests(split.name, by_length)
    return inputs.interests([q or "" for q in split.events.column("query").to_pylist()], split.histories)


def attention_report(model, batches, cfg: EvalConfig) -> dict[str, Any]:
    """Sink rate and the [INT] row's entropy / top-1 mass per trainable layer, over `probe_prompts` prompts."""
    sink, ent, top, n = [], [], [], 0
    for b in batches:
        if n >= cfg.probe_prompts:
            break
        take = min(len(b["pos"]), cfg.probe_prompts - n)
        b = {k: v[:take] for k, v in b.items()}
        attns = model.interest_attentions(b.get("ids"), b["mask"], states=b.get("states"))
        sink.append((take, sink_rates(attns, b["mask"], cfg.sink_eps)[1]))
        e, p = interest_row_concentration(attns, b["pos"])
        ent.append((take, e))
        top.append((take, p))
        n += take
    if not sink:
        return {"n_prompts": 0}

    def avg(parts):  # sample-weighted mean per layer
        total = sum(w for w, _ in parts)
        return [float(sum(w * v[layer] for w, v in parts) / total) for layer in range(len(parts[0][1]))]

    per_sink, per_ent, per_top = avg(sink), avg(ent), avg(top)
    return {"n_prompts": n, "eps": cfg.sink_eps, "layers": f"top {len(per_sink)} (the trainable ones)",
            "sink_rate": float(np.mean(per_sink)), "sink_rate_per_layer": per_sink,
            "int_attn_entropy": float(np.mean(per_ent)), "int_attn_entropy_per_layer": per_ent,
            "int_attn_top1": float(np.mean(per_top)), "int_attn_top1_per_layer": per_top}


def evaluate_encoder(model, inputs, data_dir: str | Path, cfg: EvalConfig, catalog: ItemCatalog,
                     logq: np.ndarray | None = None, fidelity=None, progress: bool = True) -> dict[str, Any]:
    """Every §4 metric for one LM encoder over `inputs` (TokenInputs: full depth; CachedInputs: the top only).

    `fidelity`, when given, is a callable (model, test h, test targets) -> fidelity report.
    """
    from karma_ray.models.inference import embed

    model.eval()
    splits = load_splits(data_dir, cfg)
    stages = progress_bar(total=len(splits) + 3, desc="evaluate", unit="stage", enabled=progress)
    item_emb = embed(model, inputs.items(catalog.ids), "item")
    stages.update()
    h = {}
    for name, s in splits.items():
        h[name] = embed(model, interest_batches(inputs, s, by_length=True), "interest")
        stages.update()
    out: dict[str, Any] = (score_with_prior(splits, catalog.ids, h, item_emb, logq, cfg) if logq is not None
                           else score_splits(splits, catalog.ids, embedding_scores(h, item_emb), cfg))
    out["attention"] = attention_report(model, interest_batches(inputs, splits["test"]), cfg)
    stages.update()
    out["effective_rank"] = effective_rank(h["test"])
    out["emb_dim"] = int(h["test"].shape[1])
    out["fidelity"] = fidelity(model, h["test"], splits["test"].targets) if fidelity else {"fidelity_f1": None}
    stages.update()
    stages.close()
    return out


def index_metrics(index, h: np.ndarray, events: pa.Table, ks=(10, 50), prefix: str = "") -> dict[str, float]:
    """HR/NDCG@K through a FAISS index (what serving returns), excluding each user's earlier clicks."""
    if events.num_rows == 0:
        return {f"{prefix}n": 0}
    histories = events.column("history").to_pylist()
    depth = max(ks) + max((len(x) for x in histories), default=0)
    scores, ids = index.search(np.ascontiguousarray(h, np.float32), min(depth, index.ntotal))
    topk, _ = exclude_and_cut(ids, scores, histories, max(ks))
    return retrieval_metrics(target_ranks(topk, events.column("target").to_numpy()), ks, prefix)


SUMMARY_KEYS = ("hr@10", "hr@50", "hr@200", "ndcg@10", "hr@10_cold", "hr@50_cold", "hr@200_cold", "sink_rate",
                "int_attn_entropy", "int_attn_top1", "fidelity_f1", "fidelity_f1_as_trained", "effective_rank")


def summarize(metrics: dict[str, Any], split_of: dict[str, str] | None = None) -> dict[str, Any]:
    """The flat per-arm row of benchmarks/results/quality.json (None where a metric does not apply).

    `split_of` maps "warm"/"cold" to the splits read (default test and test_cold; valid and valid_cold
    for the validation row)."""
    split_of = split_of or {"warm": "test", "cold": "test_cold"}
    warm, cold = metrics["splits"].get(split_of["warm"], {}), metrics["splits"].get(split_of["cold"], {})
    att, fid = metrics.get("attention") or {}, metrics.get("fidelity") or {}
    return {"hr@10": warm.get("hr@10"), "hr@50": warm.get("hr@50"), "hr@200": warm.get("hr@200"),
            "ndcg@10": warm.get("ndcg@10"), "hr@10_cold": cold.get("hr@10"), "hr@50_cold": cold.get("hr@50"),
            "hr@200_cold": cold.get("hr@200"), "sink_rate": att.get("sink_rate"),
            "int_attn_entropy": att.get("int_attn_entropy"), "int_attn_top1": att.get("int_attn_top1"),
            "fidelity_f1": fid.get("fidelity_f1"), "fidelity_f1_as_trained": fid.get("fidelity_f1_as_trained"),
            "recon_gain_nats": fid.get("recon_gain_nats"), "effective_rank": metrics.get("effective_rank")}


# ---- report ----------------------------------------------------------------------------------
def _fmt(x: Any, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def write_report(metrics: dict[str, Any], out_dir: str | Path, title: str) -> Path:
    """metrics.json, report.md and PNG plots (HR@K curves, per-layer attention) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plots = plot_encoder(metrics, out)
    ks, nks = metrics["eval"]["ks"], metrics["eval"]["ndcg_ks"]
    lines = [f"# Evaluation: {title}", "", f"Protocol `{metrics['eval']['protocol']}`; 95% CIs resample users (warm "
             "splits) or items (cold splits).", "",
             "| split | n | " + " | ".join(f"HR@{k} (95% CI)" for k in ks) + " | " + " | ".join(f"NDCG@{k}" for k in nks) + " |",
             "|---|---|" + "---|" * (len(ks) + len(nks))]
    for split, r in metrics["splits"].items():
        hrs = " | ".join(f"{_fmt(r[f'hr@{k}'])} [{_fmt(r[f'hr@{k}_ci95'][0], 3)}, {_fmt(r[f'hr@{k}_ci95'][1], 3)}]"
                         if r.get(f"hr@{k}") is not None else "–" for k in ks)
        nd = " | ".join(_fmt(r.get(f"ndcg@{k}")) for k in nks)
        lines.append(f"| {split} | {r['n']} | {hrs} | {nd} |")
    att, fid = metrics.get("attention", {}), metrics.get("fidelity", {})
    lines += ["", f"- attention-sink rate (first key > {att.get('eps')}, {att.get('layers')}): "
              f"**{_fmt(att.get('sink_rate'), 1)}%** over {att.get('n_prompts')} prompts; per layer "
              f"{[round(x, 1) for x in att.get('sink_rate_per_layer', [])]}",
              f"- [INT] row over keys after the first: normalised entropy **{_fmt(att.get('int_attn_entropy'), 3)}**, "
              f"top-1 mass **{_fmt(att.get('int_attn_top1'), 3)}**",
              f"- semantic fidelity (token-F1 of text decoded from h): **{_fmt(fid.get('fidelity_f1'), 3)}** (n={fid.get('n')})",
              f"- effective rank of h (participation ratio): **{_fmt(metrics.get('effective_rank'), 2)}** of {metrics.get('emb_dim')} dims",
              "", "Decoded from h (first examples):", ""]
    lines += [f"- `{e['decoded']}` ← target `{e['target']}` (F1 {e['f1']})" for e in fid.get("examples", [])]
    lines += ["", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    (out / "report.md").write_text("\n".join(lines))
    return out


def plot_encoder(metrics: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for split, r in metrics["splits"].items():
        if r.get("hr_curve"):
            ax.plot(range(1, len(r["hr_curve"]) + 1), r["hr_curve"], label=f"{split} (n={r['n']})")
    ax.set(xscale="log", xlabel="K", ylabel="HR@K", title="Full-catalogue HR@K")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "hr_at_k.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    att = metrics.get("attention", {})
    if att.get("sink_rate_per_layer"):
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
        layers = range(len(att["sink_rate_per_layer"]))
        axes[0].bar(layers, att["sink_rate_per_layer"])
        axes[0].set(xlabel="trainable layer", ylabel="sink rate (%)", title="first-key sink rate")
        axes[1].plot(layers, att["int_attn_entropy_per_layer"], marker="o", label="entropy (norm.)")
        axes[1].plot(layers, att["int_attn_top1_per_layer"], marker="s", label="top-1 mass")
        axes[1].set(xlabel="trainable layer", title="[INT] row concentration")
        axes[1].legend()
        fig.tight_layout()
        paths.append(out / "attention.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def evaluate_artifact(path: str | Path, cfg: EvalConfig | None = None, out_dir: str | Path | None = None,
                      data_dir: str | Path | None = None, progress: bool = True, cache=None) -> tuple[dict[str, Any], Path]:
    """Load an artifact, evaluate it on its own data (or `data_dir`), write the report next to it.

    The full-depth model runs on token ids unless `cache` (a TrunkCache matching the artifact's
    backbone and prompt settings) is given, when only the trainable top runs."""
    from karma_ray.artifact.reader import load_artifact
    from karma_ray.data.events import train_targets
    from karma_ray.eval.fidelity import FidelityProbe
    from karma_ray.models.inference import CachedInputs, TokenInputs

    art = load_artifact(path)
    cfg = cfg or art.config.eval
    data = Path(data_dir or art.manifest.get("data", {}).get("path") or art.config.data_dir)
    inputs = (CachedInputs(cache, cfg.batch_size, art.catalog.image if art.config.model.image_dim else None)
              if cache is not None else TokenInputs(art.builder, cfg.batch_size))
    logq = art.catalog.log_click_share(train_targets(data))
    probe = FidelityProbe(art.builder, data, art.config, cfg, cache) if cfg.fidelity_samples else None
    metrics = evaluate_encoder(art.model, inputs, data, cfg, art.catalog, logq, probe, progress)
    metrics.update({"artifact": str(art.path), "model_version": art.version, "data": str(data), "eval": asdict(cfg)})
    metrics["summary"] = summarize(metrics)
    metrics["summary_valid"] = summarize(metrics, {"warm": "valid", "cold": "valid_cold"})
    out = write_report(metrics, out_dir or art.path / "eval", art.version)
    return metrics, out


__all__ = ["EvalConfig", "SplitEvents", "evaluate_artifact", "evaluate_encoder", "exact_ranks", "index_metrics",
           "retrieval_report", "score_splits", "summarize"]
