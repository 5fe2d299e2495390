"""What one optimiser step costs, apart from data, validation, probes and Ray: the training budget's floor.

  python benchmarks/train_step_cost.py                       # ml100k: KARMA and action-only, SDPA, both allocators
  python benchmarks/train_step_cost.py --preset demo --steps 4 --attn sdpa,eager

Builds the preset's model (all layers, the top k trainable) and runs the loop's own `train_step` on one
synthetic batch of cached-trunk shape: B rows of `max_prompt_tokens` interest states whose last
`max_target_tokens` positions carry L_gen labels, N hard negatives, items of `max_item_tokens + 1` states,
and L_recon sequences of `max_target_tokens + 4`. The widths are the config's maxima, so a real batch
(trimmed to its longest row) costs the same or less. Arms, attention kernels and memory allocators (glibc's,
and tcmalloc where installed: karma_ray.allocator) run interleaved, `--repeats` times, each cell in its own
process (an allocator is chosen at process start), after warm-up steps; seconds per step × `train.max_steps`
is the floor of an arm's training time. Page faults per step show what the allocator changes.
Writes benchmarks/results/train_step_cost.{json,md} with the machine's load.
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
    p.add_argument("--preset", default="ml100k")
    p.add_argument("--arms", default="karma,action_only", help="comma list of quality arms")
    p.add_argument("--attn", default="sdpa", help="comma list of attention implementations (sdpa, eager)")
    p.add_argument("--malloc", default="system,tcmalloc", help="comma list of allocators: system, tcmalloc")
    p.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds over arms × kernels × allocators")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--cell", help=argparse.SUPPRESS)  # internal: "arm,attn" measured in this process
    return p.parse_args()


def synthetic_batch(cfg, d: int, vocab: int, seed: int = 0) -> dict:
    """One cached-trunk training batch at the config's maximum widths (random bf16 states at unit-ish scale)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    B, N = cfg.train.batch_size, cfg.data.max_negatives
    T, Ti, Tg = cfg.data.max_prompt_tokens, cfg.data.max_item_tokens + 1, cfg.data.max_target_tokens
    Tr = Tg + 4

    def states(*shape):
        return (torch.randn(*shape, d, generator=g) * 2).to(torch.bfloat16)

    def ones(*shape):
        return torch.ones(*shape, dtype=torch.long)

    gen = torch.full((B, T), -100)
    gen[:, T - Tg:] = torch.randint(0, vocab, (B, Tg), generator=g)
    rec = torch.full((B, Tr), -100)
    rec[:, 4:] = torch.randint(0, vocab, (B, Tr - 4), generator=g)
    return {"int_states": states(B, T), "int_mask": ones(B, T), "int_pos": torch.full((B,), T - Tg - 1),
            "pos_item": torch.arange(B), "neg_item": torch.arange(B, B + B * N).view(B, N),
            "pos_states": states(B, Ti), "pos_mask": ones(B, Ti), "pos_pos": torch.full((B,), Ti - 1),
            "neg_states": states(B, N, Ti), "neg_mask": ones(B, N, Ti), "neg_pos": torch.full((B, N), Ti - 1),
            "gen_labels": gen, "rec_states": states(B, Tr), "rec_mask": ones(B, Tr), "rec_labels": rec,
            "pos_logq": torch.full((B,), -7.0)}


def step_cost(cfg, attn: str, batch: dict, steps: int, warmup: int) -> tuple[float, float]:
    """(seconds, minor page faults) per timed step."""
    import resource

    import torch

    from karma_ray.models.karma import build_model
    from karma_ray.train.loop import lr_lambda, param_groups, train_step

    torch.manual_seed(cfg.train.seed)
    model, _ = build_model(cfg.model, cfg.loss, attn_implementation=attn)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, cfg), betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    for _ in range(warmup):
        train_step(model, model, batch, opt, sched, cfg, autocast)
    faults0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(steps):
        train_step(model, model, batch, opt, sched, cfg, autocast)
    seconds = time.perf_counter() - t0
    return seconds / steps, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / steps


def measure_cell(args: argparse.Namespace) -> None:
    """One (arm, kernel) cell in this process: prints {"step_s", "faults_per_step", "allocator"} as JSON."""
    import torch

    from karma_ray.allocator import allocator_in_use
    from karma_ray.config import get_preset
    from karma_ray.eval.quality import arm_config
    from karma_ray.models.backbone import load_backbone

    arm, attn = args.cell.split(",")
    base = get_preset(args.preset).with_overrides(args.overrides)
    torch.set_num_threads(base.train.torch_threads or os.cpu_count())
    lm, _ = load_backbone(base.model)
    batch = synthetic_batch(base, lm.config.hidden_size, lm.config.vocab_size)
    del lm
    s, faults = step_cost(arm_config(base, arm, 0), attn, batch, args.steps, args.warmup)
    print(json.dumps({"step_s": s, "faults_per_step": faults, "allocator": allocator_in_use()}))


def run_cell(args: argparse.Namespace, arm: str, attn: str, malloc: str) -> dict:
    import subprocess

    from karma_ray.allocator import fast_allocator_env

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if malloc == "tcmalloc":
        env.update(fast_allocator_env())
    cmd = [sys.executable, __file__, "--preset", args.preset, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--cell", f"{arm},{attn}", *[a for o in args.overrides for a in ("--set", o)]]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    cell = json.loads(out.strip().splitlines()[-1])
    if cell["allocator"] != malloc:
        raise SystemExit(f"asked for the {malloc} allocator, the cell ran with {cell['allocator']} "
                         "(tcmalloc needs libtcmalloc-minimal4: `make allocator`)")
    return cell


def main() -> None:
    from karma_ray.config import get_preset

    args = parse_args()
    if args.cell:
        return measure_cell(args)
    base = get_preset(args.preset).with_overrides(args.overrides)
    arms, kernels, mallocs = args.arms.split(","), args.attn.split(","), args.malloc.split(",")
    load0 = os.getloadavg()
    times = {(a, k, m): [] for a in arms for k in kernels for m in mallocs}
    faults = {key: [] for key in times}
    for r in range(args.repeats):
        for arm in arms:
            for attn in kernels:
                for malloc in mallocs:
                    cell = run_cell(args, arm, attn, malloc)
                    times[(arm, attn, malloc)].append(cell["step_s"])
                    faults[(arm, attn, malloc)].append(cell["faults_per_step"])
                    print(f"round {r + 1}: {arm} {attn} {malloc}: {cell['step_s']:.3f} s a step, "
                          f"{cell['faults_per_step']:.0f} page faults a step", flush=True)
    rows = [{"arm": a, "attn": k, "malloc": m, "step_s": v, "median_step_s": statistics.median(v),
             "faults_per_step": statistics.median(faults[(a, k, m)]),
             "steps_floor_s": round(statistics.median(v) * base.train.max_steps, 1)} for (a, k, m), v in times.items()]
    for row in rows:  # side by side in this run: the allocator's effect as a ratio
        ref = times.get((row["arm"], row["attn"], "system"))
        if ref and row["malloc"] != "system":
            row["vs_system"] = round(statistics.median(row["step_s"]) / statistics.median(ref), 3)
    result = {"preset": args.preset, "trainable_layers": base.model.trainable_layers, "batch_size": base.train.batch_size,
              "widths": {"interest": base.data.max_prompt_tokens, "item": base.data.max_item_tokens + 1,
                         "gen_labels": base.data.max_target_tokens, "recon": base.data.max_target_tokens + 4},
              "max_steps": base.train.max_steps, "torch_threads": base.train.torch_threads or os.cpu_count(), "rows": rows,
              "load_before": load0, "load_after": os.getloadavg(), "machine": f"{os.cpu_count()} CPU cores, no GPU"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_step_cost.json").write_text(json.dumps(result, indent=2))
    lines = [f"# One optimiser step ({args.preset}, top {result['trainable_layers']} layers, batch {result['batch_size']})", "",
             "| arm | attention | allocator | seconds a step (rounds) | × max_steps | vs glibc | page faults a step |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['arm']} | {r['attn']} | {r['malloc']} | {', '.join(f'{s:.3f}' for s in r['step_s'])} | "
              f"{r['steps_floor_s']} | {r.get('vs_system', '')} | {r['faults_per_step']:,.0f} |" for r in rows]
    lines += ["", f"Synthetic batch at the config's maximum widths {result['widths']}; {result['torch_threads']} torch threads; "
              f"{args.warmup} warm-up and {args.steps} timed steps per cell, each cell in its own process, rounds interleaved; 1-min load "
              f"{load0[0]:.1f} → {result['load_after'][0]:.1f}; {result['machine']}.", ""]
    (out / "train_step_cost.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
