"""The Knowledge–Action Gap on real data: every arm on the same split and the same training budget.

  python benchmarks/quality.py --preset ml100k            # the committed run (2 CPU cores: ~1 h)
  python benchmarks/quality.py --smoke                    # tiny random model, ~1-2 min (part of the tests)

Arms (ISSUE 4): popularity · SASRec (ID-only transformer, same rows) · frozen SmolLM2 (no task
training) · action-only (λ_gen = λ_rec = 0) · +gen only · +recon only · KARMA (both). The LLM arms
train through the platform's own path (Ray Data → Ray Train → artifact) with identical configs
except the ablated λ and the seed, then `karma_ray.eval.evaluate` scores every arm on the same
events: last-click test split (full catalogue, history excluded) and every held-out event whose
target is a cold item. Writes benchmarks/results/quality.{json,md} and three plots.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
ARMS = ("popularity", "sasrec", "frozen", "action_only", "gen_only", "recon_only", "karma")
LLM_ARMS = {"action_only": (0.0, 0.0), "gen_only": (None, 0.0), "recon_only": (0.0, None), "karma": (None, None)}
MULTI_SEED = ("action_only", "karma")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ml100k", help="config preset for every LLM arm (default ml100k)")
    p.add_argument("--smoke", action="store_true", help="tiny random model and data, few steps: checks the wiring")
    p.add_argument("--steps", type=int, default=None, help="training steps per LLM arm (default: the preset's)")
    p.add_argument("--seeds", default="0,1", help="seeds for action_only and karma (default 0,1); others use the first")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list, subset of {','.join(ARMS)}")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override for every LLM arm")
    p.add_argument("--sasrec-reference-epochs", type=int, default=3,
                   help="also train SASRec for this many full epochs, reported as a reference (default 3; 0 = off)")
    p.add_argument("--max-events", type=int, default=0, help="cap events per split (default 0: all)")
    p.add_argument("--out", default=str(RESULTS), help="results directory (default benchmarks/results)")
    p.add_argument("--tag", default="quality", help="file stem of the results (default quality)")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild <tag>.md and the plots from <tag>.json (e.g. after editing <tag>_investigation.md)")
    return p.parse_args(argv)


def base_config(args: argparse.Namespace):
    from karma_ray.config import get_preset

    if args.smoke:
        cfg = get_preset("tiny").with_overrides(["data.path=data/quality-smoke", "train.max_steps=4",
                                                 "train.checkpoint_every=4", "train.log_every=2"])
    else:
        cfg = get_preset(args.preset)
    if args.steps:
        cfg = cfg.with_overrides([f"train.max_steps={args.steps}", f"train.checkpoint_every={args.steps}"])
    return cfg.with_overrides(args.overrides + ["train.artifacts_dir=artifacts/quality"])


def budget_of(cfg, seeds: list[int], args) -> dict[str, Any]:
    return {"preset": "tiny (smoke)" if args.smoke else args.preset, "steps": cfg.train.max_steps,
            "batch_size": cfg.train.batch_size, "num_workers": cfg.train.num_workers,
            "training_rows": cfg.train.max_steps * cfg.train.batch_size * cfg.train.num_workers,
            "backbone": cfg.model.backbone, "layers_kept": cfg.model.num_layers, "history_items": cfg.data.history_items,
            "max_prompt_tokens": cfg.data.max_prompt_tokens, "max_target_tokens": cfg.data.max_target_tokens,
            "max_negatives": cfg.data.max_negatives, "prefix_tokens": cfg.model.prefix_tokens, "emb_dim": cfg.model.emb_dim,
            "lr": cfg.train.lr, "head_lr": cfg.train.head_lr, "lambda_gen": cfg.loss.lambda_gen,
            "lambda_rec": cfg.loss.lambda_rec, "act": cfg.loss.act, "logq_correction": cfg.loss.logq_correction,
            "init_temperature": cfg.loss.init_temperature, "seeds": seeds, "machine": f"{os.cpu_count()} CPU cores, no GPU"}


# ---- arms ------------------------------------------------------------------------------------
def popularity_arm(data_dir: Path, ecfg) -> dict[str, Any]:
    import numpy as np
    import pyarrow.dataset as pads

    from karma_ray.data.pipeline import load_items
    from karma_ray.eval.evaluate import SPLITS, exact_ranks, load_events, retrieval_report

    item_ids = np.sort(load_items(data_dir).column("item_id").to_numpy())
    targets = pads.dataset(str(data_dir / "train"), format="parquet").to_table(columns=["target"]).column("target").to_numpy()
    counts = np.zeros(len(item_ids), np.float32)
    np.add.at(counts, np.searchsorted(item_ids, targets), 1.0)
    out = {"splits": {}}
    for split in SPLITS:
        ev = load_events(data_dir, split, ecfg.max_events, ecfg.seed)
        scores = np.broadcast_to(counts, (ev.num_rows, len(counts)))
        out["splits"][split] = retrieval_report(exact_ranks(scores, item_ids, ev.column("history").to_pylist(),
                                                            ev.column("target").to_numpy()), ecfg)
    return out


def sasrec_arm(data_dir: Path, ecfg, n_examples: int, seed: int) -> dict[str, Any]:
    import numpy as np
    import pyarrow.dataset as pads

    from karma_ray.data.pipeline import load_items
    from karma_ray.eval.evaluate import SPLITS, exact_ranks, load_events, retrieval_report
    from karma_ray.models.sasrec import train_sasrec

    item_ids = np.sort(load_items(data_dir).column("item_id").to_numpy())
    train = pads.dataset(str(data_dir / "train"), format="parquet").to_table(columns=["history", "target"])
    model, losses = train_sasrec(item_ids, train.column("history").to_pylist(), train.column("target").to_numpy(),
                                 n_examples, seed=seed)
    out = {"splits": {}, "train_loss_first_last": [losses[0], losses[-1]] if losses else None, "training_rows": n_examples}
    for split in SPLITS:
        ev = load_events(data_dir, split, ecfg.max_events, ecfg.seed)
        hist = ev.column("history").to_pylist()
        ranks = [exact_ranks(model.scores(hist[s : s + 512]), item_ids, hist[s : s + 512],
                             ev.column("target").to_numpy()[s : s + 512]) for s in range(0, len(hist), 512)]
        out["splits"][split] = retrieval_report(np.concatenate(ranks), ecfg)
    return out


def _train_rows(data_dir: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in sorted((data_dir / "train").glob("*.parquet")))


def frozen_arm(cfg, data_dir: Path, ecfg) -> dict[str, Any]:
    """The pretrained LM with no task training: h and e_i read at the last text token, unprojected."""
    import pyarrow.parquet as pq
    import torch

    from karma_ray.data.prompts import PromptBuilder
    from karma_ray.eval.evaluate import evaluate_encoder
    from karma_ray.models.karma import build_model

    torch.manual_seed(cfg.train.seed)
    model, tok = build_model(cfg.model, cfg.loss)
    model.frozen_readout = True
    builder = PromptBuilder(tok, pq.read_table(data_dir / "items.parquet"), cfg.data, cfg.model.image_dim)
    return evaluate_encoder(model, builder, data_dir, ecfg, with_fidelity=False)


def llm_arm(cfg, arm: str, seed: int, ecfg) -> dict[str, Any]:
    from karma_ray.eval.evaluate import evaluate_artifact
    from karma_ray.train.run import run_with_history

    gen, rec = LLM_ARMS[arm]
    arm_cfg = cfg.with_overrides([f"loss.lambda_gen={cfg.loss.lambda_gen if gen is None else gen}",
                                  f"loss.lambda_rec={cfg.loss.lambda_rec if rec is None else rec}",
                                  f"train.seed={seed}", f"train.name=quality-{arm}-s{seed}"])
    t0 = time.perf_counter()
    art, history = run_with_history(arm_cfg, run_name=f"quality-{arm}-s{seed}-{time.strftime('%H%M%S')}",
                                    show_progress=False)
    train_s = time.perf_counter() - t0
    metrics, _ = evaluate_artifact(art, ecfg, progress=False)
    last = history[-1] if history else {}
    metrics.update({"artifact": str(art), "train_seconds": round(train_s, 1),
                    "final_losses": {k: last.get(k) for k in ("loss", "act", "gen", "rec")},
                    "loss_history": [{k: r.get(k) for k in ("step", "act", "gen", "rec", "sink_rate")} for r in history]})
    return metrics


# ---- aggregation, table, plots ---------------------------------------------------------------
def aggregate(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds per summary metric (None stays None), plus each seed's value and the spread."""
    from karma_ray.eval.evaluate import SUMMARY_KEYS

    rows = {s: m["summary"] for s, m in per_seed.items()}
    out: dict[str, Any] = {}
    for k in SUMMARY_KEYS:
        vals = [r[k] for r in rows.values() if r.get(k) is not None]
        out[k] = statistics.mean(vals) if vals else None
    out["seeds"] = {str(s): r for s, r in rows.items()}
    out["spread"] = {k: (max(v) - min(v)) for k in ("hr@10", "hr@50", "hr@50_cold")
                     if len(v := [r[k] for r in rows.values() if r.get(k) is not None]) > 1}
    return out


def ci_text(metrics: dict[str, Any], split: str, k: int) -> str:
    r = metrics["splits"].get(split, {})
    if r.get(f"hr@{k}") is None:
        return "–"
    lo, hi = r[f"hr@{k}_ci95"]
    return f"{r[f'hr@{k}']:.4f} [{lo:.3f}, {hi:.3f}]"


def markdown(result: dict[str, Any], raw: dict[str, dict[int, dict]], tag: str = "quality") -> str:
    def f(x, d=4):
        return "–" if x is None else f"{x:.{d}f}"

    arms = result["arms"] | result.get("reference_arms", {})
    lines = ["# Quality: the Knowledge–Action Gap on " + result["data"]["dataset"], "",
             "## Budget", "", "```json", json.dumps(result["budget"], indent=1), "```", "",
             "## Table (mean over seeds where there are several)", "",
             "| arm | HR@10 | HR@50 | HR@200 | NDCG@10 | HR@10 cold | HR@50 cold | sink % | [INT] entropy | [INT] top-1 | fidelity F1 | eff. rank |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, m in arms.items():
        lines.append(f"| {arm} | {f(m['hr@10'])} | {f(m['hr@50'])} | {f(m['hr@200'])} | {f(m['ndcg@10'])} | "
                     f"{f(m['hr@10_cold'])} | {f(m['hr@50_cold'])} | {f(m['sink_rate'], 1)} | {f(m['int_attn_entropy'], 3)} | "
                     f"{f(m['int_attn_top1'], 3)} | {f(m['fidelity_f1'], 3)} | {f(m['effective_rank'], 2)} |")
    n_test = next(iter(next(iter(raw.values())).values()))["splits"]["test"]["n"]
    n_cold = next(iter(next(iter(raw.values())).values()))["splits"]["test_cold"]["n"]
    lines += ["", f"n = {n_test} test events (last click per user); cold: n = {n_cold} held-out events whose target is a "
              "cold item (every such event, not only the last click).", "",
              "## 95% bootstrap CIs per seed", "", "| arm | seed | HR@10 | HR@50 | HR@50 cold | train s |", "|---|---|---|---|---|---|"]
    for arm, seeds in raw.items():
        for s, m in seeds.items():
            lines.append(f"| {arm} | {s} | {ci_text(m, 'test', 10)} | {ci_text(m, 'test', 50)} | "
                         f"{ci_text(m, 'test_cold', 50)} | {m.get('train_seconds', '–')} |")
    lines += ["", "## Ratios against the goals", ""] + [f"- {k}: {v}" for k, v in result["ratios"].items()]
    lines += ["", f"![HR@K]({tag}_hr_at_k.png)", f"![sink]({tag}_sink.png)", f"![fidelity]({tag}_fidelity.png)", ""]
    return "\n".join(lines)


def ratios(arms: dict[str, Any]) -> dict[str, Any]:
    def r(a, b, k):
        x, y = arms.get(a, {}).get(k), arms.get(b, {}).get(k)
        return round(x / y, 3) if x is not None and y not in (None, 0) else None

    return {"karma/action_only hr@50 (goal >= 1.20)": r("karma", "action_only", "hr@50"),
            "karma/action_only hr@50_cold (goal >= 1.5)": r("karma", "action_only", "hr@50_cold"),
            "karma/sasrec hr@10 (goal >= 1.0)": r("karma", "sasrec", "hr@10"),
            "karma/sasrec hr@50_cold (goal: well above)": r("karma", "sasrec", "hr@50_cold")}


def plots(raw: dict[str, dict[int, dict]], out: Path, stem: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for arm, seeds in raw.items():
        m = next(iter(seeds.values()))
        for ax, split in zip(axes, ("test", "test_cold")):
            curve = m["splits"][split].get("hr_curve")
            if curve:
                ax.plot(range(1, len(curve) + 1), curve, label=arm)
    for ax, split in zip(axes, ("test", "test_cold")):
        ax.set(xscale="log", xlabel="K", ylabel="HR@K", title=f"HR@K, {split} (first seed)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{stem}_hr_at_k.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for arm, seeds in raw.items():
        att = next(iter(seeds.values())).get("attention") or {}
        if att.get("sink_rate_per_layer"):
            ax[0].plot(att["sink_rate_per_layer"], marker="o", label=arm)
            ax[1].plot(att["int_attn_entropy_per_layer"], marker="o", label=arm)
    ax[0].set(xlabel="layer", ylabel="sink rate (%)", title="first-key attention-sink rate")
    ax[1].set(xlabel="layer", ylabel="normalised entropy", title="[INT] row entropy (keys after the first)")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{stem}_sink.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.4))
    names, vals = [], []
    for arm, seeds in raw.items():
        v = [m["summary"]["fidelity_f1"] for m in seeds.values() if m["summary"].get("fidelity_f1") is not None]
        if v:
            names.append(arm)
            vals.append(statistics.mean(v))
    ax.bar(names, vals)
    ax.set(ylabel="token-F1", title="semantic fidelity: text decoded from h vs target")
    fig.tight_layout()
    fig.savefig(out / f"{stem}_fidelity.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from karma_ray.eval.evaluate import EvalConfig, summarize
    from karma_ray.runtime import ensure_ray
    from karma_ray.train.run import ensure_data

    if args.report_only:
        return write_outputs(Path(args.out), args.tag, json.loads((Path(args.out) / f"{args.tag}.json").read_text()))
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; choose from {ARMS}")
    seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    cfg = base_config(args)
    ensure_data(cfg)
    data_dir = Path(cfg.data.path)
    ecfg = EvalConfig(max_events=args.max_events or (40 if args.smoke else 0), probe_prompts=16 if args.smoke else 128,
                      fidelity_samples=8 if args.smoke else 128, n_boot=200 if args.smoke else 1000)
    budget = budget_of(cfg, seeds, args)
    raw: dict[str, dict[int, dict[str, Any]]] = {}
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    for arm in arms:
        t0 = time.perf_counter()
        print(f"== arm {arm} ==", flush=True)
        if arm == "popularity":
            raw[arm] = {seeds[0]: popularity_arm(data_dir, ecfg)}
        elif arm == "sasrec":
            raw[arm] = {seeds[0]: sasrec_arm(data_dir, ecfg, budget["training_rows"], seeds[0])}
            if args.sasrec_reference_epochs and not args.smoke:  # a reference beside the arm, not an arm
                ref = f"sasrec_{args.sasrec_reference_epochs}_epochs"
                raw[ref] = {seeds[0]: sasrec_arm(data_dir, ecfg, args.sasrec_reference_epochs * _train_rows(data_dir), seeds[0])}
                raw[ref][seeds[0]]["summary"] = summarize({**raw[ref][seeds[0]], "attention": None, "fidelity": None})
        elif arm == "frozen":
            raw[arm] = {seeds[0]: frozen_arm(cfg, data_dir, ecfg)}
        else:
            ensure_ray(None)
            raw[arm] = {s: llm_arm(cfg, arm, s, ecfg) for s in (seeds if arm in MULTI_SEED else seeds[:1])}
        for m in raw[arm].values():
            m["summary"] = summarize(m) if "attention" in m else summarize({**m, "attention": None, "fidelity": None})
        timings[arm] = round(time.perf_counter() - t0, 1)
        print(f"   {arm}: {json.dumps(aggregate(raw[arm]), default=str)[:400]} ({timings[arm]} s)", flush=True)
    meta = json.loads((data_dir / "meta.json").read_text())
    result = {"budget": budget | {"arm_seconds": timings, "total_seconds": round(time.perf_counter() - t_all, 1)},
              "data": {"dataset": meta.get("dataset"), "path": str(data_dir), "data_hash": meta.get("data_hash"),
                       "counts": meta.get("counts")},
              "eval": {"ks": list(ecfg.ks), "max_events": ecfg.max_events, "probe_prompts": ecfg.probe_prompts,
                       "fidelity_samples": ecfg.fidelity_samples, "bootstrap": ecfg.n_boot},
              "arms": {arm: aggregate(raw[arm]) for arm in arms},
              "reference_arms": {arm: aggregate(raw[arm]) for arm in raw if arm not in arms}}
    result["ratios"] = ratios(result["arms"])
    result["details"] = {arm: {str(s): {k: v for k, v in m.items() if k not in ("summary",)} for s, m in seeds_.items()}
                         for arm, seeds_ in raw.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(json.dumps(result, indent=2, default=str))
    return write_outputs(out, args.tag, result)


SWEEP_FIXED = ("arm_seconds", "total_seconds", "seeds", "preset")


def sweep_table(out: Path, base: dict[str, Any]) -> str:
    """One row per arm and seed of every `quality_sweep_*.json` beside the run, with the settings it
    changed against the committed budget, under the committed run's seed-0 rows for reference."""
    from karma_ray.eval.evaluate import summarize

    def fmt(x, d=4):
        return "–" if x is None else f"{x:.{d}f}"

    def row(run: str, changed: str, arm: str, m: dict[str, Any]) -> str:
        s = summarize({"attention": None, "fidelity": None} | m)
        return (f"| {run} | {changed} | {arm} | {fmt(s['hr@10'])} | {ci_text(m, 'test', 50)} | {ci_text(m, 'test_cold', 50)} | "
                f"{fmt(s['sink_rate'], 1)} | {fmt(s['int_attn_entropy'], 3)} | {fmt(s['fidelity_f1'], 3)} | "
                f"{fmt(s['effective_rank'], 2)} | {m.get('train_seconds', '–')} |")

    files = sorted(out.glob("quality_sweep_*.json"))
    if not files:
        return ""
    lines = ["", "### Every investigation run (generated from `benchmarks/results/quality_sweep_*.json`)", "",
             "| run | changed vs the committed budget | arm | HR@10 | HR@50 [95% CI] | HR@50 cold [95% CI] | sink % | "
             "[INT] entropy | fidelity F1 | eff. rank | train s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row("committed run", "–", f"{arm} (seed 0)", base["details"][arm]["0"]) for arm in ("action_only", "karma")]
    for path in files:
        r = json.loads(path.read_text())
        changed = ", ".join(f"{k}={v}" for k, v in r["budget"].items()
                            if k not in SWEEP_FIXED and base["budget"].get(k) != v) or "–"
        lines += [row(path.stem.removeprefix("quality_sweep_"), changed, f"{arm} (seed {seed})", m)
                  for arm, seeds in r["details"].items() for seed, m in seeds.items()]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, tag: str, result: dict[str, Any]) -> int:
    """<tag>.md (+ <tag>_investigation.md, the hand-written log of tries, when present) and the plots."""
    from karma_ray.eval.evaluate import summarize

    raw = {arm: {s: m | {"summary": summarize({"attention": None, "fidelity": None} | m)} for s, m in seeds.items()}
           for arm, seeds in result["details"].items()}
    notes = out / f"{tag}_investigation.md"
    text = markdown(result, raw, tag)
    sweeps = sweep_table(out, result) if tag == "quality" else ""
    (out / f"{tag}.md").write_text(text + ("\n" + notes.read_text() if notes.exists() else "") + sweeps)
    plots(raw, out, tag)
    print(text.split("## 95%")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
