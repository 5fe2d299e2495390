"""Offline evaluation (DESIGN §4): full-catalogue retrieval with CIs, collapse diagnostics, fidelity.

`evaluate_artifact(dir)` is what `jobs/evaluate.py` runs; `evaluate_encoder` and `retrieval_report`
are shared with `benchmarks/quality.py`, so every arm (popularity, SASRec, frozen LM, trained
KARMA variants) is scored by the same code on the same events.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from karma_ray.data.prompts import PromptBuilder
from karma_ray.data.schema import EVENTS_SCHEMA, read_table
from karma_ray.eval.attention import SINK_EPS, interest_row_concentration, sink_rates
from karma_ray.eval.fidelity import bootstrap_ci, effective_rank, hits_at, token_f1
from karma_ray.eval.retrieval import exclude_and_cut, retrieval_metrics, target_ranks
from karma_ray.models.inference import embed_interests, embed_items
from karma_ray.progress import progress_bar

SPLITS = ("test", "test_cold")


@dataclass
class EvalConfig:
    """What to measure and on how much; the defaults are the full protocol."""

    ks: tuple[int, ...] = (10, 50, 200)
    ndcg_ks: tuple[int, ...] = (10, 50)
    max_events: int = 0  # per split; 0 = every event (smoke runs cap it)
    probe_prompts: int = 128  # interest prompts for the attention diagnostics
    fidelity_samples: int = 128  # events decoded from h for token-F1
    max_new_tokens: int = 20
    n_boot: int = 1000
    batch_size: int = 32
    seed: int = 0
    sink_eps: float = SINK_EPS

    def __post_init__(self) -> None:
        self.ks, self.ndcg_ks = tuple(sorted(self.ks)), tuple(sorted(self.ndcg_ks))
        if not self.ks or min(self.ks) < 1:
            raise ValueError("eval ks must be positive")
        for name in ("max_events", "probe_prompts", "fidelity_samples", "n_boot"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval {name} must be >= 0")


# ---- events and ranks ------------------------------------------------------------------------
def load_events(data_dir: str | Path, split: str, max_events: int = 0, seed: int = 0) -> pa.Table:
    path = Path(data_dir) / f"{split}.parquet"
    if not path.exists():
        raise FileNotFoundError(f"no {split} events at {path}; prepare the data with jobs/prepare_data.py")
    table = read_table(path, EVENTS_SCHEMA, split)
    if max_events and table.num_rows > max_events:
        rows = np.sort(np.random.default_rng(seed).choice(table.num_rows, max_events, replace=False))
        table = table.take(pa.array(rows))
    return table


def exact_ranks(scores: np.ndarray, item_ids: np.ndarray, histories: Sequence[Sequence[int]],
                targets: np.ndarray) -> np.ndarray:
    """1-based rank of each target among all catalogue items minus the user's earlier history.

    `scores` is (n, N) over `item_ids` (sorted). Ties count against the target (pessimistic), so a
    constant scorer cannot look good. Targets outside the catalogue get rank 0 (a miss).
    """
    scores = np.array(scores, dtype=np.float32, copy=True)
    pos = np.searchsorted(item_ids, targets)
    pos = np.minimum(pos, len(item_ids) - 1)
    known = item_ids[pos] == targets
    ranks = np.zeros(len(targets), np.int64)
    for r, hist in enumerate(histories):
        if len(hist):
            h = np.asarray(hist, np.int64)
            hp = np.minimum(np.searchsorted(item_ids, h), len(item_ids) - 1)
            hp = hp[(item_ids[hp] == h) & (h != targets[r])]
            scores[r, hp] = -np.inf
        if known[r]:
            ranks[r] = int((scores[r] >= scores[r, pos[r]]).sum())  # the target plus every item tying or beating it
    return ranks


def ranks_from_embeddings(h: np.ndarray, item_emb: np.ndarray, item_ids: np.ndarray, events: pa.Table,
                          chunk: int = 1024) -> np.ndarray:
    """Exact full-catalogue ranks for inner-product scores (what a flat FAISS index returns)."""
    histories = events.column("history").to_pylist()
    targets = events.column("target").to_numpy()
    out = [exact_ranks(h[s : s + chunk] @ item_emb.T, item_ids, histories[s : s + chunk], targets[s : s + chunk])
           for s in range(0, len(h), chunk)]
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def retrieval_report(ranks: np.ndarray, cfg: EvalConfig) -> dict[str, Any]:
    """HR@K with a 95% bootstrap CI, NDCG@K, n, and the HR curve for K = 1..max(ks)."""
    out: dict[str, Any] = {"n": int(len(ranks))}
    for k in cfg.ks:
        hits = hits_at(ranks, k)
        out[f"hr@{k}"] = float(hits.mean()) if len(hits) else None
        out[f"hr@{k}_ci95"] = list(bootstrap_ci(hits, n_boot=cfg.n_boot, seed=cfg.seed)) if len(hits) else None
    for k in cfg.ndcg_ks:
        gain = np.where((ranks > 0) & (ranks <= k), 1.0 / np.log2(np.maximum(ranks, 1) + 1.0), 0.0)
        out[f"ndcg@{k}"] = float(gain.mean()) if len(gain) else None
    grid = np.arange(1, max(cfg.ks) + 1)
    out["hr_curve"] = [float(hits_at(ranks, int(k)).mean()) if len(ranks) else None for k in grid]
    return out


def evaluate_split(model, builder: PromptBuilder, index, events: pa.Table, ks=(10, 50), prefix: str = "",
                   batch_size: int = 32) -> dict[str, float]:
    """HR/NDCG@K through a FAISS index (what serving returns), excluding each user's earlier history items."""
    if events.num_rows == 0:
        return {f"{prefix}n": 0}
    queries = events.column("query").to_pylist()
    histories = events.column("history").to_pylist()
    h = embed_interests(model, builder, queries, histories, batch_size)
    depth = max(ks) + max((len(x) for x in histories), default=0)
    scores, ids = index.search(h, min(depth, index.ntotal))
    topk, _ = exclude_and_cut(ids, scores, histories, max(ks))
    return retrieval_metrics(target_ranks(topk, events.column("target").to_numpy()), ks, prefix)


# ---- encoder diagnostics ---------------------------------------------------------------------
def _prompt_tensors(builder: PromptBuilder, events: pa.Table) -> dict[str, torch.Tensor]:
    arr = builder.interest_batch([q or "" for q in events.column("query").to_pylist()],
                                 events.column("history").to_pylist())
    width = int(arr["int_mask"].sum(1).max())
    return {"ids": torch.from_numpy(arr["int_ids"][:, :width]), "mask": torch.from_numpy(arr["int_mask"][:, :width]),
            "pos": torch.from_numpy(arr["int_pos"])}


def attention_report(model, builder: PromptBuilder, events: pa.Table, cfg: EvalConfig, batch: int = 16) -> dict[str, Any]:
    """Sink rate (overall, per layer) and the [INT] row's entropy / top-1 mass, over probe prompts."""
    n = min(cfg.probe_prompts, events.num_rows)
    sink, ent, top = [], [], []
    for s in range(0, n, batch):
        t = _prompt_tensors(builder, events.slice(s, min(batch, n - s)))
        attns = model.interest_attentions(t["ids"], t["mask"])
        w = len(t["ids"])
        sink.append((w, sink_rates(attns, t["mask"], cfg.sink_eps)[1]))
        e, p = interest_row_concentration(attns, t["pos"])
        ent.append((w, e))
        top.append((w, p))

    def avg(parts):  # sample-weighted mean per layer
        total = sum(w for w, _ in parts)
        return [float(sum(w * v[layer] for w, v in parts) / total) for layer in range(len(parts[0][1]))]

    if not sink:
        return {"n_prompts": 0}
    per_sink, per_ent, per_top = avg(sink), avg(ent), avg(top)
    return {"n_prompts": n, "eps": cfg.sink_eps,
            "sink_rate": float(np.mean(per_sink)), "sink_rate_per_layer": per_sink,
            "int_attn_entropy": float(np.mean(per_ent)), "int_attn_entropy_per_layer": per_ent,
            "int_attn_top1": float(np.mean(per_top)), "int_attn_top1_per_layer": per_top}


def fidelity_report(model, builder: PromptBuilder, h: np.ndarray, targets: np.ndarray, cfg: EvalConfig) -> dict[str, Any]:
    """Token-F1 of text greedily decoded from h (the L_recon path) against the target's text."""
    n = min(cfg.fidelity_samples, len(h))
    start = torch.tensor(builder.decode_prefix, dtype=torch.long)
    scores, examples = [], []
    for s in range(0, n, cfg.batch_size):
        hb = torch.from_numpy(h[s : min(s + cfg.batch_size, n)])
        for j, seq in enumerate(model.decode_from_h(hb, start, builder.eos_id, cfg.max_new_tokens)):
            decoded = builder.tok.decode(seq, skip_special_tokens=True).strip()
            ref = builder.text(int(targets[s + j]))
            scores.append(token_f1(decoded, ref))
            if len(examples) < 8:
                examples.append({"target": ref, "decoded": decoded, "f1": round(scores[-1], 3)})
    return {"fidelity_f1": float(np.mean(scores)) if scores else None, "n": n, "examples": examples}


def evaluate_encoder(model, builder: PromptBuilder, data_dir: str | Path, cfg: EvalConfig,
                     item_emb: np.ndarray | None = None, with_fidelity: bool = True,
                     progress: bool = True) -> dict[str, Any]:
    """Every §4 metric for one LM encoder. `item_emb` (rows in sorted-id order) is recomputed if None."""
    model.eval()
    item_ids = builder.item_ids
    steps = progress_bar(total=len(SPLITS) + 3, desc="evaluate", unit="stage", enabled=progress)
    if item_emb is None:
        item_emb = embed_items(model, builder, item_ids, 64, show_progress=False)
    steps.update()
    out: dict[str, Any] = {"splits": {}}
    test_h = test_events = None
    for split in SPLITS:
        steps.set_postfix_str(split)
        events = load_events(data_dir, split, cfg.max_events, cfg.seed)
        h = embed_interests(model, builder, [q or "" for q in events.column("query").to_pylist()],
                            events.column("history").to_pylist(), cfg.batch_size, show_progress=False)
        out["splits"][split] = retrieval_report(ranks_from_embeddings(h, item_emb, item_ids, events), cfg)
        if split == "test":
            test_h, test_events = h, events
        steps.update()
    steps.set_postfix_str("attention")
    out["attention"] = attention_report(model, builder, test_events, cfg)
    steps.update()
    out["effective_rank"] = effective_rank(test_h)
    out["emb_dim"] = int(test_h.shape[1])
    steps.set_postfix_str("fidelity")
    out["fidelity"] = (fidelity_report(model, builder, test_h, test_events.column("target").to_numpy(), cfg)
                       if with_fidelity else {"fidelity_f1": None, "n": 0, "examples": []})
    steps.update()
    steps.close()
    return out


SUMMARY_KEYS = ("hr@10", "hr@50", "hr@200", "ndcg@10", "hr@10_cold", "hr@50_cold", "sink_rate",
                "int_attn_entropy", "int_attn_top1", "fidelity_f1", "effective_rank")


def summarize(metrics: dict[str, Any]) -> dict[str, Any]:
    """The flat per-arm row of benchmarks/results/quality.json (None where a metric does not apply)."""
    test, cold = metrics["splits"].get("test", {}), metrics["splits"].get("test_cold", {})
    att, fid = metrics.get("attention") or {}, metrics.get("fidelity") or {}
    return {"hr@10": test.get("hr@10"), "hr@50": test.get("hr@50"), "hr@200": test.get("hr@200"),
            "ndcg@10": test.get("ndcg@10"), "hr@10_cold": cold.get("hr@10"), "hr@50_cold": cold.get("hr@50"),
            "sink_rate": att.get("sink_rate"), "int_attn_entropy": att.get("int_attn_entropy"),
            "int_attn_top1": att.get("int_attn_top1"), "fidelity_f1": fid.get("fidelity_f1"),
            "effective_rank": metrics.get("effective_rank")}


# ---- report ----------------------------------------------------------------------------------
def _fmt(x: Any, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def write_report(metrics: dict[str, Any], out_dir: str | Path, title: str) -> Path:
    """metrics.json, report.md and PNG plots (HR@K curves, per-layer attention) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plots = plot_encoder(metrics, out)
    lines = [f"# Evaluation: {title}", "", "| split | n | " + " | ".join(f"HR@{k} (95% CI)" for k in metrics["eval"]["ks"])
             + " | " + " | ".join(f"NDCG@{k}" for k in metrics["eval"]["ndcg_ks"]) + " |",
             "|---|---|" + "---|" * (len(metrics["eval"]["ks"]) + len(metrics["eval"]["ndcg_ks"]))]
    for split, r in metrics["splits"].items():
        hrs = " | ".join(f"{_fmt(r[f'hr@{k}'])} [{_fmt(r[f'hr@{k}_ci95'][0], 3)}, {_fmt(r[f'hr@{k}_ci95'][1], 3)}]"
                         if r.get(f"hr@{k}") is not None else "–" for k in metrics["eval"]["ks"])
        nd = " | ".join(_fmt(r.get(f"ndcg@{k}")) for k in metrics["eval"]["ndcg_ks"])
        lines.append(f"| {split} | {r['n']} | {hrs} | {nd} |")
    att, fid = metrics.get("attention", {}), metrics.get("fidelity", {})
    lines += ["", f"- attention-sink rate (first key > {att.get('eps')}): **{_fmt(att.get('sink_rate'), 1)}%** over "
              f"{att.get('n_prompts')} prompts; per layer {[round(x, 1) for x in att.get('sink_rate_per_layer', [])]}",
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
        axes[0].set(xlabel="layer", ylabel="sink rate (%)", title="first-key sink rate")
        axes[1].plot(layers, att["int_attn_entropy_per_layer"], marker="o", label="entropy (norm.)")
        axes[1].plot(layers, att["int_attn_top1_per_layer"], marker="s", label="top-1 mass")
        axes[1].set(xlabel="layer", title="[INT] row concentration")
        axes[1].legend()
        fig.tight_layout()
        paths.append(out / "attention.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def evaluate_artifact(path: str | Path, cfg: EvalConfig | None = None, out_dir: str | Path | None = None,
                      data_dir: str | Path | None = None, progress: bool = True) -> tuple[dict[str, Any], Path]:
    """Load an artifact, evaluate it on its own data (or `data_dir`), write the report next to it."""
    from karma_ray.artifact.reader import load_artifact

    cfg = cfg or EvalConfig()
    art = load_artifact(path)
    data = Path(data_dir or art.manifest.get("data", {}).get("path") or art.config.data.path)
    metrics = evaluate_encoder(art.model, art.builder, data, cfg, item_emb=art.item_emb, progress=progress)
    metrics.update({"artifact": str(art.path), "model_version": art.version, "data": str(data), "eval": asdict(cfg),
                    "summary": None})
    metrics["summary"] = summarize(metrics)
    out = write_report(metrics, out_dir or art.path / "eval", art.version)
    return metrics, out
