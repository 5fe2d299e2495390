"""The Knowledge–Action Gap on real data: every arm on the same `cold`-protocol split and budget.

  python benchmarks/quality.py --preset ml100k                 # every arm; 2.5 h on 2 cores last time (cache: 29 min)
  python benchmarks/quality.py --arms karma --seeds 0,1,2      # one part; merges with the parts already run
  python benchmarks/quality.py --merge-only                    # rebuild quality.{json,md} and plots from parts
  python benchmarks/quality.py --smoke                         # tiny random model: checks the wiring

Arms: popularity · SASRec (ID-only peer, trained to convergence with early stopping) · frozen SmolLM2
(no task training; mean-pooled or [INT] readout, the better on validation) · action-only · +gen ·
+recon · KARMA. Trained arms share one trunk cache (the frozen bottom layers' output, built once)
and differ only in the ablated λ and the seed (initialisation and data order). Each arm-seed writes a
part under benchmarks/results/parts/<tag>/; the merge pairs KARMA with action-only by seed and event.
Knobs are chosen on validation; test is reported once per configuration.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import statistics
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
MULTI_SEED = ("action_only", "karma")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from karma_ray.eval.quality import ARMS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ml100k", help="config preset for every arm (default ml100k)")
    p.add_argument("--smoke", action="store_true", help="tiny random model and data, few steps: checks the wiring")
    p.add_argument("--seeds", default="0,1,2", help="seeds of action_only and karma (default 0,1,2); other arms use the first")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list, subset of {','.join(ARMS)}")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override for every arm")
    p.add_argument("--out", default=str(RESULTS), help="results directory (default benchmarks/results)")
    p.add_argument("--tag", default="quality", help="file stem of the results and name of the parts folder")
    p.add_argument("--rerun", action="store_true", help="run arm-seeds again even when their part exists")
    p.add_argument("--merge-only", action="store_true", help="only merge the existing parts and write the report")
    return p.parse_args(argv)


def base_config(args: argparse.Namespace):
    from karma_ray.config import EVAL_SPLITS, get_preset

    if args.smoke:
        cfg = get_preset("tiny").with_overrides([
            "data.path=data/quality-smoke", "train.max_steps=4", "train.checkpoint_every=4", "train.log_every=2",
            "train.valid_every=2", "eval.max_events=40", "eval.max_cold_events=40", "eval.probe_prompts=16",
            "eval.fidelity_samples=8", "eval.fidelity_fit_steps=3", "eval.n_boot=200", "baselines.sasrec_max_epochs=2"])
    else:
        cfg = get_preset(args.preset)
    # The protocol scores every evaluation split on the cached trunk (a preset may cache fewer, as the demo does).
    every_split = "data.cache_eval_splits=" + ",".join(EVAL_SPLITS)
    return cfg.with_overrides([every_split] + args.overrides + ["train.artifacts_dir=artifacts/quality"]).with_absolute_paths()


# Train fields that change no trained weight: names and places, and diagnostics that only read the model.
NOT_FINGERPRINTED = ("seed", "name", "storage_path", "artifacts_dir", "log_every", "checkpoint_every", "max_failures",
                     "probe_every", "probe_prompts", "sink_alarm_ratio", "valid_every", "update_share_every")
# Knobs added after parts were measured, at the value that reproduces those parts' training exactly: left out
# of the fingerprint at that value, so adding a knob does not orphan every earlier part.
SAME_AS_BEFORE = {"loss": {"recon_decoder": "shared"},
                  "data": {"cache_eval_splits": ("valid", "test", "valid_cold", "test_cold")}}


def fingerprint(cfg) -> str:
    """Parts merge only with parts of the same configuration (seeds, run names, what a run only measures or
    logs, and the serving index aside: the evaluation scores every item exactly, so the FAISS settings never
    reach a metric) and of where the clone lives: paths count relative to the repository, output folders not
    at all."""
    d = cfg.to_dict()
    d.pop("index", None)
    d["train"] = {k: v for k, v in d["train"].items() if k not in NOT_FINGERPRINTED}
    for section, knobs in SAME_AS_BEFORE.items():
        d[section] = {k: v for k, v in d[section].items() if knobs.get(k, object()) != v}
    for name in ("path", "cache_dir"):
        if d["data"].get(name) and Path(d["data"][name]).is_relative_to(REPO):
            d["data"][name] = str(Path(d["data"][name]).relative_to(REPO))
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def budget_of(cfg, ctx, cache_s: float | None, seeds: list[int], args) -> dict[str, Any]:
    from karma_ray.models.backbone import tiny_config

    layers = (tiny_config(cfg.model.backbone, 8, 8).num_hidden_layers if cfg.model.backbone.startswith("tiny")
              else json.loads((Path(_backbone_dir(cfg)) / "config.json").read_text())["num_hidden_layers"])
    return {"preset": "tiny (smoke)" if args.smoke else args.preset, "protocol": cfg.eval.protocol,
            "backbone": cfg.model.backbone, "layers_total": layers, "trainable_layers": cfg.model.trainable_layers,
            "trunk_dtype": cfg.model.trunk_dtype, "readout": cfg.model.readout, "emb_dim": cfg.model.emb_dim or "hidden",
            "steps": cfg.train.max_steps, "batch_size": cfg.train.batch_size, "num_workers": cfg.train.num_workers,
            "cached_train_rows": cfg.data.train_rows, "history_items": cfg.data.history_items,
            "max_prompt_tokens": cfg.data.max_prompt_tokens, "max_negatives": cfg.data.max_negatives,
            "prefix_tokens": cfg.model.prefix_tokens, "lr": cfg.train.lr, "head_lr": cfg.train.head_lr,
            "readout_lr": cfg.train.readout_lr,
            "precision": cfg.train.precision, "lambda_gen": cfg.loss.lambda_gen, "lambda_rec": cfg.loss.lambda_rec,
            "act": cfg.loss.act, "logq_correction": cfg.loss.logq_correction,
            "cross_row_hard_negatives": cfg.loss.cross_row_hard_negatives, "init_temperature": cfg.loss.init_temperature,
            "seeds": seeds, "cache_build_s": cache_s, "machine": f"{os.cpu_count()} CPU cores, no GPU"}


def _backbone_dir(cfg) -> str:
    from karma_ray.models.backbone import resolve_backbone_path

    return resolve_backbone_path(cfg.model.backbone)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from karma_ray.allocator import allocator_in_use
    from karma_ray.data.prepare import ensure_prepared
    from karma_ray.eval.quality import ARMS, Context, merge, run_arm
    from karma_ray.runtime import ensure_ray

    arms = [a for a in args.arms.split(",") if a]
    if unknown := sorted(set(arms) - set(ARMS)):
        raise SystemExit(f"unknown arms {unknown}; choose from {ARMS}")
    seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    cfg = base_config(args)
    ensure_prepared(cfg)
    cache, cache_s = None, None
    if cfg.model.trainable_layers and args.merge_only:  # a merge needs the build time, not the states
        from karma_ray.cache.build import cache_location

        key_file = cache_location(cfg)[1] / "key.json"
        cache_s = json.loads(key_file.read_text()).get("build_seconds") if key_file.exists() else None
    elif cfg.model.trainable_layers:
        from karma_ray.cache.build import ensure_cache

        ensure_ray()
        t0 = time.perf_counter()
        cache = ensure_cache(cfg, progress=True)  # its key.json records how long the build took
        cache_s = json.loads((cache.root / "key.json").read_text()).get("build_seconds") or round(time.perf_counter() - t0, 1)
    ctx = Context.create(cfg, cache)
    fp = fingerprint(cfg)
    parts_dir = Path(args.out) / "parts" / args.tag
    parts_dir.mkdir(parents=True, exist_ok=True)
    if not args.merge_only:
        for arm in arms:
            for seed in (seeds if arm in MULTI_SEED else seeds[:1]):
                path = parts_dir / f"{arm}-s{seed}.json"
                if path.exists() and not args.rerun and json.loads(path.read_text()).get("fingerprint") == fp:
                    print(f"== {arm} seed {seed}: part exists, kept ({path.name})", flush=True)
                    continue
                print(f"== {arm} seed {seed} ==", flush=True)
                if arm not in ("popularity", "sasrec", "frozen"):
                    ensure_ray()
                metrics = run_arm(ctx, arm, seed)
                path.write_text(json.dumps({"arm": arm, "seed": seed, "fingerprint": fp, "malloc": allocator_in_use(),
                                            "metrics": metrics}, default=str))
                print(f"   {arm} s{seed}: {json.dumps(metrics['summary'])} ({metrics['seconds']} s)", flush=True)
    parts = [p for p in (json.loads(f.read_text()) for f in sorted(parts_dir.glob("*.json"))) if p.get("fingerprint") == fp]
    if not parts:
        raise SystemExit(f"no parts of this configuration ({fp}) in {parts_dir}")
    merged_seeds = sorted({p["seed"] for p in parts if p["arm"] in MULTI_SEED}) or seeds[:1]  # what the report holds
    budget = budget_of(cfg, ctx, cache_s, merged_seeds, args)
    result = merge(parts, ctx, budget)
    result["budget"]["total_seconds"] = round(sum(p["metrics"]["seconds"] for p in parts) + (cache_s or 0), 1)
    out = Path(args.out)
    (out / f"{args.tag}.json").write_text(json.dumps(result, indent=2, default=str))
    write_report(out, args.tag, result)
    return 0


# ---- report ----------------------------------------------------------------------------------
def _f(x, d=4):
    return "–" if x is None else f"{x:.{d}f}"


def markdown(r: dict[str, Any], tag: str) -> str:
    b, arms = r["budget"], r["arms"]
    lines = [f"# Quality: the Knowledge–Action Gap on {r['data']['dataset']} (`{r['protocol']}` protocol)", "",
             f"{b['backbone']}, all {b['layers_total']} layers, the top {b['trainable_layers']} trained over a cached "
             f"{b['trunk_dtype']} trunk; {b['steps']} steps × batch {b['batch_size']}; seeds {b['seeds']} for action-only and "
             f"KARMA (initialisation and data order). L_gen at step 0: {_f(b.get('l_gen_step0'), 2)} nats. Trunk cache "
             f"built in {b.get('cache_build_s')} s; whole run {b.get('total_seconds')} s of compute.", "",
             "Events: " + ", ".join(f"{s} n={n} ({r['data']['n_clusters'][s]} {'items' if 'cold' in s else 'users'})"
                                   for s, n in r["data"]["n_events"].items())
             + ". 95% CIs resample users on warm splits and items on cold splits.", "",
             "## Validation and test, side by side (mean over seeds; no prior)", "",
             "| arm | rows trained | valid HR@50 | test HR@10 | test HR@50 | test HR@200 | valid HR@50 cold | test HR@50 cold | "
             "sink % | [INT] entropy | fidelity F1 (refit P) | F1 as trained | text nats read from h | eff. rank |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, m in arms.items():
        v = m.get("valid", {})
        lines.append(f"| {arm} | {m.get('training_rows')} | {_f(v.get('hr@50'))} | {_f(m['hr@10'])} | {_f(m['hr@50'])} | "
                     f"{_f(m['hr@200'])} | {_f(v.get('hr@50_cold'))} | {_f(m['hr@50_cold'])} | {_f(m['sink_rate'], 1)} | "
                     f"{_f(m['int_attn_entropy'], 3)} | {_f(m['fidelity_f1'], 3)} | {_f(m.get('fidelity_f1_as_trained'), 3)} | "
                     f"{_f(m.get('recon_gain_nats'), 3)} | {_f(m['effective_rank'], 2)} |")
    lines += ["", "## With the score-time prior α·log(click share) (α chosen on validation per split family)", "",
              "| arm | α warm | α cold | valid HR@50 | test HR@10 | test HR@50 | test HR@50 cold |", "|---|---|---|---|---|---|---|"]
    for arm, seeds in r["details"].items():
        first = next(iter(seeds.values()))
        if "prior" in first and arm in arms and "prior" in arms[arm]:
            p, a = arms[arm]["prior"], first["prior"]["alpha"]
            lines.append(f"| {arm} | {a.get('test')} | {a.get('test_cold')} | {_f(first['prior']['splits']['valid']['hr@50'])} | "
                         f"{_f(p['hr@10'])} | {_f(p['hr@50'])} | {_f(p['hr@50_cold'])} |")
    lines += ["", "## Paired differences (KARMA − action-only, by seed and event; hierarchical bootstrap over seeds and clusters)", "",
              "| metric | diff | 95% CI | seeds | events | clusters |", "|---|---|---|---|---|---|"]
    for name, row in r["paired"].items():
        for metric, d in row.items():
            if isinstance(d, dict):
                lines.append(f"| {name} {metric} | {d['diff']:+.4f} | [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] | {d['n_seeds']} | "
                             f"{d['n_events']} | {d['n_clusters']} |")
    lines += ["", "## Targets", "", "| measure | target | measured | row | met |", "|---|---|---|---|---|"]
    for t in r["targets"]:
        extra = f" (paired CI {t['paired_ci']})" if t.get("paired_ci") else ""
        lines.append(f"| {t['measure']} | {t['target']} | {t['value']}{extra} | {t.get('row', '')} | {'yes' if t['met'] else 'no'} |")
    lines += update_share_table(r["details"])
    lines += ["", "## Per seed (test, 95% cluster-bootstrap CIs)", "",
              "| arm | seed | HR@10 | HR@50 | HR@50 cold | train s | of which optimiser steps | eval s | load (1 min) |", "|---|---|---|---|---|---|---|---|---|"]
    for arm, seeds in r["details"].items():
        for s, m in seeds.items():
            t, c = m["splits"]["test"], m["splits"].get("test_cold", {})

            def ci(x, k):
                return f"{_f(x.get(f'hr@{k}'))} [{_f(x[f'hr@{k}_ci95'][0], 3)}, {_f(x[f'hr@{k}_ci95'][1], 3)}]" if x.get(f"hr@{k}") is not None else "–"
            lines.append(f"| {arm} | {s} | {ci(t, 10)} | {ci(t, 50)} | {ci(c, 50)} | {m.get('train_seconds', '–')} | "
                         f"{m.get('train_time', {}).get('optimizer_steps_s', '–')} | {m.get('eval_seconds', '–')} | {m['load_before'][0]:.1f} → {m['load_after'][0]:.1f} |")
    lines += ["", "## Budget", "", "```json", json.dumps(b, indent=1), "```", "",
              f"![HR@K]({tag}_hr_at_k.png)", f"![learning curves]({tag}_learning_curve.png)", f"![sink]({tag}_sink.png)",
              f"![fidelity]({tag}_fidelity.png)", ""]
    return "\n".join(lines)


def update_share_table(details: dict[str, Any]) -> list[str]:
    """Each loss's share of AdamW's step (÷ √v̂), averaged over a run's readings and the seeds."""
    rows = []
    for arm, seeds in details.items():
        readings = [u for m in seeds.values() for u in m.get("update_shares") or []]
        if readings:
            keys = sorted({k for u in readings for k in u if k != "update_share_step"})
            mean = {k: statistics.mean(u[k] for u in readings if k in u) for k in keys}
            rows.append(f"| {arm} | {len(readings)} | " + "; ".join(
                f"{k.removeprefix('update_')} {v:.3f}" for k, v in mean.items()) + " |")
    if not rows:
        return []
    return ["", "## Which loss moves the weights (train.update_share_every)", "",
            "Each weighted loss's gradient scaled as AdamW scales it (÷ √v̂), as a share of Σ‖u_k‖² per parameter group "
            "(lm = trainable top layers, heads = KARMA heads), and the cosine of u_gen / u_rec with u_act; mean over "
            "the run's readings and seeds.", "", "| arm | readings | shares and cosines |", "|---|---|---|", *rows]


def write_report(out: Path, tag: str, r: dict[str, Any]) -> None:
    notes = out / f"{tag}_investigation.md"
    text = markdown(r, tag)
    (out / f"{tag}.md").write_text(text + ("\n" + notes.read_text() if notes.exists() else ""))
    plots(r, out, tag)
    print(text.split("## Per seed")[0])


def plots(r: dict[str, Any], out: Path, stem: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    details = r["details"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for arm, seeds in details.items():
        m = next(iter(seeds.values()))
        for ax, split in zip(axes, ("test", "test_cold")):
            curve = m["splits"].get(split, {}).get("hr_curve")
            if curve:
                ax.plot(range(1, len(curve) + 1), curve, label=arm)
    for ax, split in zip(axes, ("test", "test_cold")):
        ax.set(xscale="log", xlabel="K", ylabel="HR@K", title=f"HR@K, {split} (first seed, no prior)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{stem}_hr_at_k.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    seen: list[int] = []
    for arm, seeds in details.items():
        for s, m in seeds.items():
            lc = m.get("learning_curve") or []
            if lc:
                x = [p["rows_seen"] for p in lc]
                y = [p.get("valid_hr@50") for p in lc]
                ax.plot(x, y, marker=".", label=f"{arm} s{s}", alpha=0.8)
                seen += x
    pop = r["arms"].get("popularity", {}).get("valid", {}).get("hr@50")
    if pop:
        ax.axhline(pop, color="grey", ls="--", label="popularity")
    # SASRec sees ~100x the LM arms' rows: linear up to the first reading, logarithmic beyond, so both read.
    first = min((x for x in seen if x > 0), default=1000)
    ax.set_xscale("symlog", linthresh=first)
    ax.set_xlim(left=0)
    ax.set(xlabel="training rows seen", ylabel="validation HR@50", title="learning curves (validation)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / f"{stem}_learning_curve.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for arm, seeds in details.items():
        att = next(iter(seeds.values())).get("attention") or {}
        if att.get("sink_rate_per_layer"):
            ax[0].plot(att["sink_rate_per_layer"], marker="o", label=arm)
            ax[1].plot(att["int_attn_entropy_per_layer"], marker="o", label=arm)
    ax[0].set(xlabel="trainable layer", ylabel="sink rate (%)", title="first-key attention-sink rate")
    ax[1].set(xlabel="trainable layer", ylabel="normalised entropy", title="[INT] row entropy (keys after the first)")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{stem}_sink.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.4))
    names, vals = [], []
    for arm, seeds in details.items():
        v = [m["fidelity"]["fidelity_f1"] for m in seeds.values() if (m.get("fidelity") or {}).get("fidelity_f1") is not None]
        if v:
            names.append(arm)
            vals.append(statistics.mean(v))
    ax.bar(names, vals)
    ax.set(ylabel="token-F1", title="fidelity: text decoded from h (P refit on each arm's frozen h)")
    fig.tight_layout()
    fig.savefig(out / f"{stem}_fidelity.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    from karma_ray.allocator import reexec_with_fast_allocator

    reexec_with_fast_allocator()  # this process evaluates and exports on CPU
    sys.exit(main())
