"""Ray Train step time vs a plain single-process torch loop: same model, same data, one run.

  python benchmarks/train_throughput.py                 # demo preset (full-depth SmolLM2, top 2 layers train)
  python benchmarks/train_throughput.py --preset tiny --steps 20

Both sides build the model with the same seed, start from the same readout, and run the loop's own
`train_step` on the same cached trunk states (`WorkerInputs.collate` builds both sides' batches) with
the same batch size and torch threads. The plain loop collates its batches before timing (pure compute);
the Ray side is wall time per step between reports, so everything Ray adds (the Ray Data stream, the DDP
wrapper, reports) lands in the ratio. Warm-up steps are dropped. Ray Data may hand rows out in another
order, so batches differ in length: the headline ratio is token throughput (plain tokens/s over Ray
tokens/s); the raw step-time ratio is recorded beside it.
Writes benchmarks/results/train_throughput.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", help="config preset (default demo)")
    p.add_argument("--steps", type=int, default=25, help="timed steps per side (default 25)")
    p.add_argument("--warmup", type=int, default=10, help="untimed warm-up steps per side (default 10)")
    p.add_argument("--threads", default="",
                   help="comma list of torch thread counts to measure, e.g. 2,1 (default: the preset's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override, repeatable")
    return p.parse_args()


def plain_loop(cfg, cache, steps: int, warmup: int) -> tuple[list[float], list[int]]:
    """Single process, no Ray: the reference step times and tokens per step."""
    import torch

    from karma_ray.models.karma import build_model
    from karma_ray.train.loop import MASK_KEYS, WorkerInputs, lr_lambda, param_groups, train_step

    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    torch.manual_seed(cfg.train.seed)
    model, tok = build_model(cfg.model, cfg.loss)
    inputs = WorkerInputs(cfg, str(cache.root), tok)
    model.init_readout(*inputs.readout_statistics(model))
    B = cfg.train.batch_size
    rows = cache.train_rows((steps + warmup) * B).to_pydict()
    batches = [inputs.collate({k: v[i * B:(i + 1) * B] for k, v in rows.items()}, torch.device("cpu"))
               for i in range(steps + warmup)]
    opt = torch.optim.AdamW(param_groups(model, cfg), betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    times, tokens = [], []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        train_step(model, model, batch, opt, sched, cfg, autocast)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            tokens.append(int(sum(batch[k].sum() for k in MASK_KEYS if k in batch)))  # as the Ray loop counts
    return times, tokens


def ray_loop(cfg, cache, steps: int, warmup: int, log_every: int) -> list[dict]:
    """The real TorchTrainer path; per-report step time and tokens/s after warm-up."""
    from karma_ray.train.trainer import fit, run_name_for

    cfg = cfg.with_overrides([f"train.max_steps={steps + warmup}", f"train.log_every={log_every}",
                              f"train.checkpoint_every={steps + warmup}", "train.num_workers=1"])
    _, reports = fit(cfg, run_name_for(cfg) + "-bench", show_progress=False, cache_root=str(cache.root))
    return [{"step_s": r["step_s"], "tokens_per_s": r["tokens_per_s"]} for r in reports if r["step"] > warmup]


def measure(cfg, cache, steps: int, warmup: int, log_every: int) -> dict:
    """Plain loop then Ray Train on one config: step times, token throughput and both ratios."""
    plain, plain_tokens = plain_loop(cfg, cache, steps, warmup)
    ray_reports = ray_loop(cfg, cache, steps, warmup, log_every)
    p_med, r_med = statistics.median(plain), statistics.median(r["step_s"] for r in ray_reports)
    p_tps = sum(plain_tokens) / sum(plain)
    r_tps = statistics.median(r["tokens_per_s"] for r in ray_reports)
    return {"torch_threads": cfg.train.torch_threads,
            "plain": {"median_step_s": p_med, "tokens_per_s": p_tps, "steps": plain, "tokens": plain_tokens},
            "ray_train": {"median_step_s": r_med, "median_tokens_per_s": r_tps, "per_report": ray_reports,
                          "log_every": log_every},
            "ratio": p_tps / r_tps, "ratio_step_time": r_med / p_med}


def main() -> int:
    args = parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from karma_ray.cache.build import ensure_cache
    from karma_ray.config import get_preset
    from karma_ray.data.prepare import ensure_prepared
    from karma_ray.runtime import ensure_ray

    log_every = 5
    warmup = max(args.warmup, log_every)
    cfg = get_preset(args.preset).with_overrides(args.overrides).with_absolute_paths()
    ensure_prepared(cfg)
    ensure_ray()
    cache = ensure_cache(cfg)  # both sides train on the same cached trunk states
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [cfg.train.torch_threads]
    runs = [measure(cfg.with_overrides([f"train.torch_threads={t}"]), cache, args.steps, warmup, log_every) for t in threads]
    head = runs[0]  # the headline: the first thread count (the preset's own by default)
    result = {
        "preset": args.preset, "batch_size": cfg.train.batch_size, "trainable_layers": cfg.model.trainable_layers,
        "timed_steps": args.steps, "warmup_steps": warmup, **head, "goal": 1.15,
        "by_threads": {str(r["torch_threads"]): {k: r[k] for k in ("ratio", "ratio_step_time")} |
                       {"plain_tokens_per_s": r["plain"]["tokens_per_s"],
                        "ray_tokens_per_s": r["ray_train"]["median_tokens_per_s"]} for r in runs},
        "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
    }
    rows = "".join(f"| {r['torch_threads']} | {r['plain']['median_step_s']:.3f} | {r['plain']['tokens_per_s']:.0f} | "
                   f"{r['ray_train']['median_step_s']:.3f} | {r['ray_train']['median_tokens_per_s']:.0f} | "
                   f"**{r['ratio']:.3f}** | {r['ratio_step_time']:.3f} |\n" for r in runs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "train_throughput.md").write_text(
        f"# Ray Train vs plain torch loop ({args.preset})\n\n"
        "| torch threads | plain step (s) | plain tokens/s | Ray step (s) | Ray tokens/s | slowdown (tokens/s) | step-time ratio |\n"
        "|---|---|---|---|---|---|---|\n" + rows +
        f"\nGoal: slowdown ≤ 1.15. Ray side: TorchTrainer with 1 worker fed by streamed Ray Data; plain side: one "
        f"process, batches collated before timing. Batch {cfg.train.batch_size}, top {cfg.model.trainable_layers} layers trained, "
        f"{args.steps} timed steps after {warmup} warm-up, {os.cpu_count()} CPUs, 1-min load average at the end "
        f"{os.getloadavg()[0]:.1f}. Ray Data may order rows differently from the plain loop, so the headline compares "
        "token throughput; the raw step-time ratio is beside it.\n")
    print(json.dumps({t: v for t, v in result["by_threads"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
