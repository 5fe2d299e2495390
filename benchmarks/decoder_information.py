"""Does the decoder read h? Nats of the next item's text that h explains, per arm, against a ceiling.

  python benchmarks/decoder_information.py                        # parts/quality, seed 0, P refit 300 steps
  python benchmarks/decoder_information.py --seeds 0,1,2          # adds seeds; rows already measured are kept

Token-F1 of greedy decodes shows only the decoder's mode: when every h decodes to one popular title, F1
cannot say whether h carries anything about the item. This measures it directly. For each arm's artifact
(seeds `--seeds` of the quality parts) and the frozen model, P is refit on the arm's frozen h of the first
training rows (`FidelityProbe.refit`, the fidelity probe's own fit, for `--steps` steps), then L_recon per
target token is scored on `--n` test events with each event's own h and with h shuffled across the events.
Their difference, `recon_gain_nats`, is what the decoder reads from h; 0 means it ignores h. The ceiling
refits P on each row's target e_i instead (the item itself, so all the information is there): it shows
what the soft-prefix path can carry in the same number of steps. Arms that trained P (λ_rec > 0: KARMA,
recon-only) are also scored through their own P. Writes benchmarks/results/decoder_information.{json,md,png}.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
TRAINED = ("action_only", "gen_only", "recon_only", "karma")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=str(RESULTS / "parts" / "quality"), help="quality parts (their artifacts)")
    p.add_argument("--seeds", default="0", help="comma list: whose artifacts (the frozen arm has no seed; arms "
                   "without a part for a seed are skipped)")
    p.add_argument("--arms", default="frozen," + ",".join(TRAINED))
    p.add_argument("--ceiling-arm", default="karma", help="arm whose model also gets the target-e_i ceiling ('' for none)")
    p.add_argument("--steps", type=int, default=300, help="refit steps of P")
    p.add_argument("--n", type=int, default=256, help="test events scored")
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args()


def frozen(cfg, part: dict, cache):
    """The frozen arm's model (its part's readout), as `frozen_arm` builds it."""
    from karma_ray.eval.baselines import frozen_model
    from karma_ray.models.backbone import load_tokenizer
    from karma_ray.train.loop import WorkerInputs

    worker = WorkerInputs(cfg, str(cache.root), load_tokenizer(cfg.model.backbone))
    return frozen_model(cfg, part["metrics"].get("readout", "mean"), worker.readout_statistics)


def test_h(model, cache, n: int):
    """(n, emb) h of the first n test events (the cache holds them in event order)."""
    from karma_ray.models.inference import CachedInputs, embed

    batches = itertools.islice(CachedInputs(cache, 32).interests("test"), -(-n // 32))
    return embed(model, batches, "interest")[:n]


def measure(name: str, seed: int, model, probe, cache, targets, n: int, ceiling: bool, own_p: bool) -> dict:
    t0 = time.perf_counter()
    h = test_h(model, cache, n)
    row = {"arm": name, "seed": seed}
    if own_p:
        row["as_trained"] = probe.information(model, h, targets)
    saved = {k: v.detach().clone() for k, v in model.prefix.state_dict().items()}
    losses = probe.refit(model, "h")
    row["refit_h"] = probe.information(model, h, targets) | {"fit_loss_first_last": [losses[0], losses[-1]]}
    if ceiling:
        losses = probe.refit(model, "target_e")
        row["refit_target_e"] = (probe.information(model, probe.target_embeddings(model, targets), targets)
                                 | {"fit_loss_first_last": [losses[0], losses[-1]]})
    model.prefix.load_state_dict(saved)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{name} s{seed}: " + ", ".join(f"{k} gain {v['recon_gain_nats']:.3f} nats/token {v['recon_gain_ci']} ({v['recon_nats']:.3f} own h)"
                                  for k, v in row.items() if isinstance(v, dict)) + f" [{row['seconds']} s]", flush=True)
    return row


def main() -> None:
    import dataclasses

    import numpy as np
    import torch

    from karma_ray.artifact.reader import load_artifact
    from karma_ray.cache.build import cache_location
    from karma_ray.cache.store import TrunkCache
    from karma_ray.eval.evaluate import SplitEvents
    from karma_ray.eval.fidelity import FidelityProbe

    args = parse_args()
    seeds = [int(x) for x in args.seeds.split(",")]
    wanted = [(a, 0 if a == "frozen" else sd) for sd in seeds for a in args.arms.split(",")]
    wanted = [w for i, w in enumerate(wanted) if w not in wanted[:i] and part_path(args.parts, *w).exists()]
    parts = {w: json.loads(part_path(args.parts, *w).read_text()) for w in wanted}
    if missing := [p["metrics"]["artifact"] for (a, _), p in parts.items() if a != "frozen" and not Path(p["metrics"]["artifact"]).exists()]:
        raise SystemExit(f"these parts' artifacts are not on this machine (re-run benchmarks/quality.py for them): {missing}")
    # every arm shares the data, backbone and trunk cache: the first trained arm's artifact gives them
    ref = load_artifact(next(p["metrics"]["artifact"] for (a, _), p in parts.items() if a != "frozen"))
    cfg = ref.config
    torch.set_num_threads(cfg.train.torch_threads or os.cpu_count())
    cache = TrunkCache(cache_location(cfg)[1])
    targets = np.asarray(SplitEvents.load(cfg.data_dir, "test", cfg.eval).targets[: args.n])
    eval_cfg = dataclasses.replace(cfg.eval, fidelity_fit_steps=args.steps)
    out = Path(args.out) / "decoder_information.json"
    settings = {"parts": os.path.relpath(Path(args.parts).resolve(), REPO), "fit_steps": args.steps, "n_test": args.n,
                "n_train": 512}
    old = json.loads(out.read_text()) if out.exists() else {}
    # rows measured before under the same settings are kept, as quality.py keeps its parts
    done = {(r["arm"], r.get("seed", 0)): r for r in old.get("rows", [])} if all(old.get(k) == v for k, v in settings.items()) else {}
    load0, rows, measured = os.getloadavg(), [], 0
    for arm, seed in wanted:
        if (arm, seed) in done:
            rows.append(done[(arm, seed)])
            continue
        art = load_artifact(parts[(arm, seed)]["metrics"]["artifact"]) if arm != "frozen" else None
        model = art.model if art else frozen(cfg, parts[(arm, seed)], cache)
        probe = FidelityProbe((art or ref).builder, cfg.data_dir, cfg, eval_cfg, cache)
        trained_p = art is not None and art.config.loss.lambda_rec > 0  # its own P learned L_recon
        rows.append(measure(arm, seed, model, probe, cache, targets, args.n, arm == args.ceiling_arm and seed == seeds[0],
                            trained_p))
        measured += 1
    rows += [r for key, r in done.items() if key not in wanted]
    # the load is that of the run that measured rows (a run that only reuses rows keeps the old figures)
    load = {"load_before": load0, "load_after": os.getloadavg()} if measured or not old else \
        {k: old[k] for k in ("load_before", "load_after")}
    result = settings | {"rows": rows, "paired": paired(rows)} | load | {"machine": f"{os.cpu_count()} CPU cores, no GPU"}
    write(result, Path(args.out))


def part_path(parts: str, arm: str, seed: int) -> Path:
    return Path(parts) / f"{arm}-s{seed}.json"


def paired(rows: list[dict]) -> dict:
    """KARMA − action-only gain (P refit on h) per seed both have, and their mean."""
    gain = {(r["arm"], r.get("seed", 0)): r["refit_h"]["recon_gain_nats"] for r in rows}
    diffs = {s: gain[("karma", s)] - gain[("action_only", s)] for (a, s) in gain if a == "karma" and ("action_only", s) in gain}
    return {"karma-action_only": {"per_seed": diffs, "mean": sum(diffs.values()) / len(diffs) if diffs else None}}


def write(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "decoder_information.json").write_text(json.dumps(result, indent=2))
    cols = (("refit_h", "P refit on h"), ("as_trained", "arm's own P"), ("refit_target_e", "ceiling: P refit on the target's e_i"))
    lines = [f"# What the decoder reads from h ({result['parts']})", "",
             f"L_recon per target token on {result['n_test']} test events, with each event's own conditioning vector "
             f"and with it shuffled across events; gain = shuffled − own (0: the decoder ignores it). P refit for "
             f"{result['fit_steps']} steps on {result['n_train']} training rows.", "",
             "| arm | seed | conditioning | nats/token, own | nats/token, shuffled | gain (nats/token) | 95% CI (events resampled) |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for key, label in cols:
            if key in r:
                v = r[key]
                ci = v.get("recon_gain_ci") or [float("nan")] * 2
                lines.append(f"| {r['arm']} | {r.get('seed', 0)} | {label} | {v['recon_nats']:.3f} | {v['recon_nats_shuffled_h']:.3f} | "
                             f"{v['recon_gain_nats']:+.3f} | [{ci[0]:+.3f}, {ci[1]:+.3f}] |")
    pair = result["paired"]["karma-action_only"]
    if pair["mean"] is not None:
        lines += ["", f"KARMA − action-only, gain with P refit on h: mean {pair['mean']:+.3f} nats/token over seeds "
                  + ", ".join(f"{s}: {d:+.3f}" for s, d in pair["per_seed"].items()) + "."]
    lines += ["", f"1-min load {result['load_before'][0]:.1f} → {result['load_after'][0]:.1f}; {result['machine']}.",
              "", "![gain](decoder_information.png)", ""]
    (out / "decoder_information.md").write_text("\n".join(lines))
    labels, gains, cis = [], [], []
    for r in result["rows"]:
        for key, label in cols:
            if key in r:
                labels.append(f"{r['arm']} s{r.get('seed', 0)}: {label.split(':')[0]}")
                gains.append(r[key]["recon_gain_nats"])
                cis.append(r[key].get("recon_gain_ci") or [gains[-1]] * 2)
    fig, ax = plt.subplots(figsize=(7.5, 0.3 * len(gains) + 1.2))
    errs = [[g - c[0] for g, c in zip(gains, cis)], [c[1] - g for g, c in zip(gains, cis)]]
    y = list(range(len(gains)))[::-1]
    ax.barh(y, gains, xerr=errs, capsize=2, color=["tab:gray" if "ceiling" in l else "tab:blue" for l in labels])
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.axvline(0, color="black", lw=0.5)
    ax.set(xlabel="nats / target token (symlog)", title="what the decoder reads from its conditioning vector (95% CI)")
    fig.tight_layout()
    fig.savefig(out / "decoder_information.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
