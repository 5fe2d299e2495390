"""The per-worker training loop: read top to bottom, one numbered step after another.

Runs inside every Ray Train worker. DDP wrapping, device placement and the dataset shard come
from Ray Train; the model and its losses come from `karma_ray.models.karma` and know nothing of Ray.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model

from karma_ray.config import KarmaConfig
from karma_ray.eval.attention import interest_row_concentration, sink_rates
from karma_ray.models.karma import KarmaModel, build_model

log = logging.getLogger(__name__)

LOSS_KEYS = ("loss", "act", "gen", "rec", "img", "act_acc")
# Which mask trims which group of padded arrays (batches arrive padded to the config maxima).
TRIM_GROUPS = {"int_mask": ("int_ids", "int_mask", "gen_labels"), "pos_mask": ("pos_ids", "pos_mask"),
               "neg_mask": ("neg_ids", "neg_mask"), "rec_mask": ("rec_ids", "rec_mask", "rec_labels")}


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut the all-padding tail columns so compute follows the longest real row, not the config max."""
    out = dict(batch)
    for mask_key, keys in TRIM_GROUPS.items():
        if mask_key in batch:
            width = int(batch[mask_key].sum(-1).max())
            for k in keys:
                if k in out:
                    out[k] = out[k][..., :width]
    return out


def param_groups(model: KarmaModel, cfg: KarmaConfig) -> list[dict[str, Any]]:
    """Pretrained LM at `lr`, fresh KARMA heads at `head_lr`; no weight decay on norms/biases/scales."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        is_lm, decay = name.startswith("lm."), p.ndim >= 2
        groups.setdefault((is_lm, decay), []).append(p)
    return [{"params": ps, "lr": cfg.train.lr if is_lm else cfg.train.head_lr, "name": "lm" if is_lm else "heads",
             "weight_decay": cfg.train.weight_decay if decay else 0.0} for (is_lm, decay), ps in groups.items()]


def lr_lambda(cfg: KarmaConfig):
    warm, total = max(cfg.train.warmup_steps, 1), cfg.train.max_steps

    def f(step: int) -> float:  # linear warm-up, then cosine to 10%
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
    return f


def save_checkpoint(model: KarmaModel, opt, sched, step: int, out: Path, extra: dict | None = None) -> None:
    """safetensors for weights (handles the tied embedding), torch.save only for optimizer state."""
    save_model(model, str(out / "model.safetensors"))
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, out / "optimizer.pt")
    (out / "train_state.json").write_text(json.dumps({"step": step, **(extra or {})}))


def load_checkpoint(model: KarmaModel, opt, sched, ckpt_dir: Path) -> tuple[int, dict]:
    load_model(model, str(ckpt_dir / "model.safetensors"))
    state = torch.load(ckpt_dir / "optimizer.pt", weights_only=True)  # tensors and plain containers only
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    train_state = json.loads((ckpt_dir / "train_state.json").read_text())
    return int(train_state["step"]), train_state


def probe_batch(batch: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """The first n interest prompts of a batch, cut at [INT] (the L_gen target after it is not prompt)."""
    pos = batch["int_pos"][:n]
    width = int(pos.max()) + 1
    mask = batch["int_mask"][:n, :width] * (torch.arange(width, device=pos.device)[None, :] <= pos[:, None]).to(batch["int_mask"].dtype)
    return {"ids": batch["int_ids"][:n, :width], "mask": mask, "pos": pos}


def probe_collapse(model: KarmaModel, probe: dict[str, torch.Tensor]) -> dict[str, float]:
    """Sink rate and mean [INT]-row entropy on the fixed probe (the collapse alarm's reading)."""
    was_training = model.training
    model.eval()
    attns = model.interest_attentions(probe["ids"], probe["mask"])
    model.train(was_training)
    entropy, _ = interest_row_concentration(attns, probe["pos"])
    return {"sink_rate": sink_rates(attns, probe["mask"])[0], "int_attn_entropy": sum(entropy) / len(entropy)}


def _lr_of(opt, name: str) -> float:
    return next(g["lr"] for g in opt.param_groups if g["name"] == name)


def _mean_across_workers(values: dict[str, float], device) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def _batches(shard, batch_size: int, skip: int) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of the shard; skips the batches a resumed run has already trained on."""
    for i, batch in enumerate(shard.iter_torch_batches(batch_size=batch_size, drop_last=True, prefetch_batches=2)):
        if i >= skip:
            yield batch


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg = KarmaConfig.from_dict(config["karma"])
    steps_per_epoch = max(1, int(config["steps_per_epoch"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed + rank)
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)  # Ray pins fractional-CPU workers to 1 thread
    device = ray.train.torch.get_device()

    # 1. Model, optimiser, schedule.
    model, _ = build_model(cfg.model, cfg.loss)
    model.to(device)
    opt = torch.optim.AdamW(param_groups(model, cfg), betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))

    # 2. Resume from the latest checkpoint, if this is a restarted attempt.
    step, resumed_from, train_state = 0, -1, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            step, train_state = load_checkpoint(model, opt, sched, Path(d))
            resumed_from = step
    probe, probe_base, reading = None, train_state.get("probe_base"), {}  # collapse alarm (rank 0)

    # 3. DDP (gloo on CPU, NCCL on GPU). A λ of 0 leaves heads unused, which DDP must be told about.
    unused = cfg.loss.lambda_rec == 0 or (cfg.model.image_dim and cfg.loss.lambda_img == 0) or not cfg.model.image_dim
    ddp_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": bool(unused)})
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    shard = ray.train.get_dataset_shard("train")

    # 4. The loop: fetch (timed) → forward → backward → clip → step; log, checkpoint.
    sums: dict[str, float] = {}
    wait_s = busy_s = 0.0
    tokens = n_steps = 0
    t_last = time.perf_counter()
    while step < cfg.train.max_steps:
        epoch = step // steps_per_epoch
        t_fetch = time.perf_counter()
        for batch in _batches(shard, cfg.train.batch_size, skip=step % steps_per_epoch):
            t_start = time.perf_counter()
            wait_s += t_start - t_fetch
            batch = trim_padding({k: v.to(device) for k, v in batch.items()})
            tokens += int(sum(batch[k].sum() for k in TRIM_GROUPS if k in batch))
            if cfg.train.probe_every and rank == 0 and probe is None:
                probe = probe_batch(batch, cfg.train.probe_prompts)
                if probe_base is None:  # before the first update: the frozen model's reading
                    probe_base = probe_collapse(model, probe)

            with autocast:
                out = ddp_model(batch)  # dict of scalar losses
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            sched.step()
            step += 1
            n_steps += 1
            last = step >= cfg.train.max_steps
            if probe is not None and (step % cfg.train.probe_every == 0 or last):
                reading = _collapse_alarm(model, probe, probe_base, cfg.train.sink_alarm_ratio, step)
            for k in LOSS_KEYS:
                if k in out:
                    sums[k] = sums.get(k, 0.0) + float(out[k].detach())
            busy_s += time.perf_counter() - t_start

            if step % cfg.train.log_every == 0 or step % cfg.train.checkpoint_every == 0 or last:
                elapsed = time.perf_counter() - t_last
                metrics = _mean_across_workers({k: v / n_steps for k, v in sums.items()}, device)
                metrics.update(step=step, epoch=epoch, lr=_lr_of(opt, "lm"), resumed_from_step=resumed_from,
                               tokens_per_s=tokens * world / max(elapsed, 1e-9), step_s=elapsed / n_steps,
                               data_wait_frac=wait_s / max(wait_s + busy_s, 1e-9), world_size=world)
                if reading:  # the latest probe reading rides on the next report
                    metrics.update(reading)
                    reading = {}
                _report(metrics, model, opt, sched, step, rank,
                        with_checkpoint=step % cfg.train.checkpoint_every == 0 or last,
                        extra={"probe_base": probe_base} if probe_base else None)
                sums, wait_s, busy_s, tokens, n_steps, t_last = {}, 0.0, 0.0, 0, 0, time.perf_counter()
            if last:
                return
            t_fetch = time.perf_counter()


def collapse_alarm(sink_rate: float, frozen_rate: float, ratio: float) -> bool:
    """True when the sink rate has risen past ratio × the frozen rate (floored at 1%: a frozen rate
    of 0 would otherwise alarm on the first head that turns into a sink)."""
    return sink_rate > ratio * max(frozen_rate, 1.0)


def _collapse_alarm(model: KarmaModel, probe: dict[str, torch.Tensor], base: dict[str, float], ratio: float,
                    step: int) -> dict[str, float]:
    """Probe reading as report metrics; a warning when the sink rate passes ratio × the frozen rate."""
    now = probe_collapse(model, probe)
    alarm = collapse_alarm(now["sink_rate"], base["sink_rate"], ratio)
    if alarm:
        log.warning("collapse alarm at step %d: attention-sink rate %.1f%% > %.1f× the frozen model's %.1f%% "
                    "([INT] entropy %.3f, frozen %.3f): the interest encoder's attention is drifting from the "
                    "pretrained model's", step,
                    now["sink_rate"], ratio, base["sink_rate"], now["int_attn_entropy"], base["int_attn_entropy"])
    return {"probe_step": step, "sink_rate": now["sink_rate"], "sink_rate_frozen": base["sink_rate"], "int_attn_entropy": now["int_attn_entropy"],
            "int_attn_entropy_frozen": base["int_attn_entropy"], "collapse_alarm": float(alarm)}


def _report(metrics: dict[str, Any], model: KarmaModel, opt, sched, step: int, rank: int, with_checkpoint: bool,
            extra: dict | None = None) -> None:
    """Every rank reports the same number of times; only rank 0 attaches the checkpoint."""
    if not (with_checkpoint and rank == 0):
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(model, opt, sched, step, Path(tmp), extra)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
