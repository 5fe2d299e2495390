"""Ray Train step time vs a plain single-process torch loop: same model, same data, one run.

  python benchmarks/train_throughput.py                 # demo preset (SmolLM2 cut to 4 layers)
  python benchmarks/train_throughput.py --preset tiny --steps 20

Both sides build the model with the same seed and train on the same prepared parquet rows with the
same batch size and torch threads. The plain loop tokenises its batches before timing (so it measures
pure compute); the Ray side is measured as wall time per step between reports, so everything Ray adds
(streamed tokenisation, DDP wrapper, report/bookkeeping) lands in the ratio. Warm-up steps are dropped.
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
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps per side (default 5)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override, repeatable")
    return p.parse_args()


def plain_loop(cfg, steps: int, warmup: int) -> list[float]:
    """Single process, no Ray: the reference step time."""
    import pyarrow.parquet as pq
    import torch

    from karma_ray.data.prompts import PromptBuilder
    from karma_ray.models.karma import build_model
    from karma_ray.train.loop import lr_lambda, param_groups, trim_padding

    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    torch.manual_seed(cfg.train.seed)
    model, tok = build_model(cfg.model, cfg.loss)
    builder = PromptBuilder(tok, pq.read_table(Path(cfg.data.path) / "items.parquet"), cfg.data, cfg.model.image_dim)
    events = pq.read_table(Path(cfg.data.path) / "train").to_pydict()
    B = cfg.train.batch_size
    batches = []
    for i in range(steps + warmup):
        rows = {k: events[k][i * B:(i + 1) * B] for k in ("query", "history", "target", "negatives")}
        arrays = builder.training_batch(rows, cfg.loss.lambda_gen > 0, cfg.loss.lambda_rec > 0)
        batches.append(trim_padding({k: torch.from_numpy(v) for k, v in arrays.items()}))
    opt = torch.optim.AdamW(param_groups(model, cfg), betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        out = model(batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def ray_loop(cfg, steps: int, warmup: int, log_every: int) -> list[float]:
    """The real TorchTrainer path; per-step wall time from the reports after warm-up."""
    from karma_ray.train.run import ensure_ray
    from karma_ray.train.trainer import fit, run_name_for

    ensure_ray(None)
    cfg = cfg.with_overrides([f"train.max_steps={steps + warmup}", f"train.log_every={log_every}",
                              f"train.checkpoint_every={steps + warmup}", "train.num_workers=1"])
    _, reports = fit(cfg, run_name_for(cfg) + "-bench", show_progress=False)
    return [r["step_s"] for r in reports if r["step"] > warmup]


def main() -> int:
    args = parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from karma_ray.config import get_preset
    from karma_ray.train.run import ensure_data

    log_every = 5
    warmup = max(args.warmup, log_every)
    cfg = get_preset(args.preset).with_overrides(args.overrides)
    ensure_data(cfg)
    plain = plain_loop(cfg, args.steps, warmup)
    ray_steps = ray_loop(cfg, args.steps, warmup, log_every)
    p_med, r_med = statistics.median(plain), statistics.median(ray_steps)
    result = {
        "preset": args.preset, "batch_size": cfg.train.batch_size, "num_layers": cfg.model.num_layers,
        "torch_threads": cfg.train.torch_threads, "timed_steps": args.steps, "warmup_steps": warmup,
        "plain": {"median_step_s": p_med, "steps": plain},
        "ray_train": {"median_step_s": r_med, "per_report_step_s": ray_steps, "log_every": log_every},
        "ratio": r_med / p_med, "goal": 1.15, "load_avg_1m": os.getloadavg()[0],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "train_throughput.md").write_text(
        f"# Ray Train vs plain torch loop ({args.preset})\n\n"
        f"| side | median step (s) |\n|---|---|\n| plain single-process loop | {p_med:.3f} |\n"
        f"| Ray Train (1 worker, streamed Ray Data) | {r_med:.3f} |\n\n"
        f"ratio Ray/plain = **{r_med / p_med:.3f}** (goal ≤ 1.15); batch {cfg.train.batch_size}, "
        f"{cfg.model.num_layers} layers, {args.steps} timed steps after {warmup} warm-up, "
        f"torch threads {cfg.train.torch_threads}, 1-min load average at the end {os.getloadavg()[0]:.1f}.\n")
    print(json.dumps({k: result[k] for k in ("ratio", "goal")} | {"plain_s": p_med, "ray_s": r_med}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
