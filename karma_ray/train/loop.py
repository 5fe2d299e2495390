"""The per-worker training loop: read top to bottom, one numbered step after another.

Runs inside every Ray Train worker. DDP wrapping, device placement and the dataset shard come
from Ray Train; the model and its losses come from `karma_ray.models.karma` and know nothing of Ray.
Batches arrive either as cached trunk states (model.trainable_layers > 0: `karma_ray.cache`) or as
token ids (`karma_ray.data.pipeline.TokenizeEvents`); `WorkerInputs` turns both into model inputs.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from karma_ray.allocator import allocator_in_use
from karma_ray.config import KarmaConfig
from karma_ray.eval.attention import interest_row_concentration, sink_rates
from karma_ray.models.karma import KarmaModel, build_model
from karma_ray.progress import quiet_worker_logs

log = logging.getLogger(__name__)

LOSS_KEYS = ("loss", "act", "gen", "rec", "img", "act_acc")
# Which masks set the width of which padded arrays (token batches arrive padded to the config maxima).
# Targets and hard negatives share one width: the item tower encodes them in one concatenated pass.
TRIM_GROUPS = {("int_mask",): ("int_ids", "int_mask", "gen_labels", "int_states"),
               ("pos_mask", "neg_mask"): ("pos_ids", "pos_mask", "neg_ids", "neg_mask"),
               ("rec_mask",): ("rec_ids", "rec_mask", "rec_labels")}
MASK_KEYS = tuple(m for group in TRIM_GROUPS for m in group)  # tokens counted per batch = their sum
SHUFFLE_BATCHES = 16  # local shuffle buffer, in batches: a seed changes the order rows arrive in


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut the all-padding tail columns so compute follows the longest real row, not the config max.

    Cached item states (`pos_states`/`neg_states`) already come at the batch's item width, which is the
    width the item masks are trimmed to here."""
    out = dict(batch)
    for mask_keys, keys in TRIM_GROUPS.items():
        present = [batch[m] for m in mask_keys if m in batch]
        if present:
            width = max(int(m.sum(-1).max()) for m in present)
            for k in keys:
                if k in out:
                    out[k] = out[k][..., :width] if not k.endswith("_states") else out[k][:, :width]
    return out


READOUT = ("item_proj", "int_proj")  # KarmaModel's W_e, W_h


def param_groups(model: KarmaModel, cfg: KarmaConfig) -> list[dict[str, Any]]:
    """Trainable LM weights at `lr`, the readout projections W_e/W_h at `readout_lr`, the fresh KARMA heads at
    `head_lr`; no weight decay on norms/biases/scales."""
    lrs = {"lm": cfg.train.lr, "readout": cfg.train.readout_lr, "heads": cfg.train.head_lr}
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            kind = "lm" if name.startswith("lm.") else "readout" if name.split(".")[0] in READOUT else "heads"
            groups.setdefault((kind, p.ndim >= 2), []).append(p)
    return [{"params": ps, "lr": lrs[kind], "name": kind, "weight_decay": cfg.train.weight_decay if decay else 0.0}
            for (kind, decay), ps in groups.items()]


def lr_lambda(cfg: KarmaConfig):
    warm, total = max(cfg.train.warmup_steps, 1), cfg.train.max_steps

    def f(step: int) -> float:  # linear warm-up, then cosine to 10%
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
    return f


# ---- inputs --------------------------------------------------------------------------------
class WorkerInputs:
    """Everything a worker needs besides the stream: item states (cached path), log click shares,
    and the statistics that start the readout from the frozen model."""

    def __init__(self, cfg: KarmaConfig, cache_root: str | None, tokenizer):
        from karma_ray.data.catalog import ItemCatalog
        from karma_ray.data.events import load_items, train_targets
        from karma_ray.data.prompts import PromptBuilder

        self.cfg = cfg
        self.catalog = ItemCatalog(load_items(cfg.data_dir, cfg.model.image_dim))
        self.builder = PromptBuilder(tokenizer, self.catalog, cfg.data, cfg.model.image_dim)
        self.logq = (torch.from_numpy(self.catalog.log_click_share(train_targets(cfg.data_dir)))
                     if cfg.loss.logq_correction else None)
        self.cache = None
        if cache_root:
            from karma_ray.cache.store import TrunkCache

            self.cache = TrunkCache(cache_root)
            self.items = self.cache.items()
            if cfg.model.image_dim and self.catalog.image is not None:
                self.items.image = torch.from_numpy(self.catalog.image)

    def readout_statistics(self, model: KarmaModel, n_items: int = 2048, n_prompts: int = 256):
        """Pooled final states of (a seeded sample of) the catalogue and of the first training prompts."""
        from karma_ray.models.inference import CachedInputs, TokenInputs, readout_statistics

        rng = np.random.default_rng(self.cfg.data.seed)
        ids = self.catalog.ids if len(self.catalog) <= n_items else np.sort(rng.choice(self.catalog.ids, n_items, replace=False))
        if self.cache is not None:
            from karma_ray.cache.store import pad_states

            rows = self.cache.train_rows(n_prompts)
            states, mask = pad_states(rows["states"].to_pylist(), rows["length"].to_numpy(), self.cache.dtype)
            pos = torch.from_numpy(rows["pos"].to_numpy().astype(np.int64))
            prompts = ({"states": states[s : s + 32], "mask": mask[s : s + 32], "pos": pos[s : s + 32]}
                       for s in range(0, len(pos), 32))
            image = self.catalog.image if self.cfg.model.image_dim else None
            return readout_statistics(model, CachedInputs(self.cache, 64, image).items(ids), prompts)
        from karma_ray.data.events import train_events_path
        import pyarrow.parquet as pq

        first = pq.ParquetFile(sorted(train_events_path(self.cfg.data_dir).glob("*.parquet"))[0]).read_row_group(0)
        first = first.slice(0, n_prompts)
        tokens = TokenInputs(self.builder, 32)
        return readout_statistics(model, tokens.items(ids), tokens.interests(
            [q or "" for q in first["query"].to_pylist()], first["history"].to_pylist()))

    def valid_hr(self, model: KarmaModel, k: int = 50) -> float:
        """Validation HR@k on the cached validation prompts, history excluded, no prior (rank 0's curve)."""
        from karma_ray.eval.evaluate import SplitEvents, embedding_scores, split_ranks
        from karma_ray.eval.stats import hits_at
        from karma_ray.models.inference import CachedInputs, embed

        was = model.training
        split = SplitEvents.load(self.cfg.data_dir, "valid", self.cfg.eval)
        cached = CachedInputs(self.cache, 64, self.items.image.numpy() if self.items.image is not None else None)
        h = {"valid": embed(model, cached.interests("valid", by_length=True), "interest")}
        e = embed(model, cached.items(), "item")
        model.train(was)
        return float(hits_at(split_ranks(split, self.catalog.ids, embedding_scores(h, e)("valid")), k).mean())

    def collate(self, raw: dict[str, Any], device) -> dict[str, torch.Tensor]:
        if self.cache is not None:
            from karma_ray.cache.store import collate_train

            batch = collate_train(raw, self.items, self.cfg.data.max_negatives, self.cache.dtype, self.logq,
                                  self.cfg.loss.lambda_gen > 0, self.cfg.loss.lambda_rec > 0)
        else:
            batch = {k: torch.as_tensor(v) for k, v in raw.items()}
        return trim_padding({k: v.to(device) for k, v in batch.items()})


# ---- parallelism and checkpoints ----------------------------------------------------------
def parallelize(model: KarmaModel, cfg: KarmaConfig, device):
    """DDP through Ray Train (only trainable parameters are reduced), or FSDP2 for backbones too big to
    replicate: every decoder layer and then the whole model are sharded over the workers (gloo on CPU,
    NCCL on GPU); frozen and trainable parameters shard alike. Each worker keeps its own data shard."""
    if cfg.train.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for layer in model.lm.get_decoder().layers:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    unused = cfg.loss.lambda_rec == 0 or (cfg.model.image_dim and cfg.loss.lambda_img == 0) or not cfg.model.image_dim
    return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": bool(unused)})


def _full_states(model: KarmaModel, opt, cfg: KarmaConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trainable weights, optimiser state), whole: under FSDP every rank must take part in gathering them."""
    if cfg.train.strategy != "fsdp":
        return model.trainable_state(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    full, optim = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    wanted = set(model.trainable_names())
    return {k: v.contiguous() for k, v in full.items() if k in wanted}, optim


def save_checkpoint(weights: dict[str, torch.Tensor], optim: dict[str, Any], sched, state: dict[str, Any], out: Path) -> None:
    """safetensors for weights and RNG state, torch.save only for the optimizer's tensors and numbers."""
    save_file(weights, str(out / "model.safetensors"))
    torch.save({"opt": optim, "sched": sched.state_dict()}, out / "optimizer.pt")
    save_file({"torch_rng": torch.get_rng_state()}, str(out / "rng.safetensors"))
    (out / "train_state.json").write_text(json.dumps(state))


def load_checkpoint(model: KarmaModel, ckpt_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Weights and RNG now (before the model is wrapped); (optimiser+schedule state, train state) for later."""
    model.load_trainable_state(load_file(str(ckpt_dir / "model.safetensors")), str(ckpt_dir))
    if (ckpt_dir / "rng.safetensors").exists():
        torch.set_rng_state(load_file(str(ckpt_dir / "rng.safetensors"))["torch_rng"])
    optim = torch.load(ckpt_dir / "optimizer.pt", weights_only=True)  # tensors and plain containers only
    return optim, json.loads((ckpt_dir / "train_state.json").read_text())


def restore_optimizer(model: KarmaModel, opt, sched, optim: dict[str, Any], cfg: KarmaConfig) -> None:
    if cfg.train.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, optim["opt"], options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(optim["opt"])
    sched.load_state_dict(optim["sched"])


# ---- collapse alarm ------------------------------------------------------------------------
def probe_batch(batch: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """The first n interest prompts of a batch, cut at [INT] (the L_gen target after it is not prompt)."""
    pos = batch["int_pos"][:n]
    width = int(pos.max()) + 1
    mask = batch["int_mask"][:n, :width] * (torch.arange(width, device=pos.device)[None, :] <= pos[:, None]).to(batch["int_mask"].dtype)
    key = "int_states" if "int_states" in batch else "int_ids"
    return {key.removeprefix("int_"): batch[key][:n, :width], "mask": mask, "pos": pos}


def probe_collapse(model: KarmaModel, probe: dict[str, torch.Tensor]) -> dict[str, float]:
    """Sink rate and mean [INT]-row entropy of the trainable layers on the fixed probe (the alarm's reading)."""
    was_training = model.training
    model.eval()
    attns = model.interest_attentions(probe.get("ids"), probe["mask"], states=probe.get("states"))
    model.train(was_training)
    entropy, _ = interest_row_concentration(attns, probe["pos"])
    return {"sink_rate": sink_rates(attns, probe["mask"])[0], "int_attn_entropy": sum(entropy) / len(entropy)}


def collapse_alarm(sink_rate: float, frozen_rate: float, ratio: float) -> bool:
    """True when the sink rate has risen past ratio × the frozen rate (floored at 1%: a frozen rate
    of 0 would otherwise alarm on the first head that turns into a sink)."""
    return sink_rate > ratio * max(frozen_rate, 1.0)


def _collapse_reading(model: KarmaModel, probe: dict[str, torch.Tensor], base: dict[str, float], ratio: float,
                      step: int) -> dict[str, float]:
    """Probe reading as report metrics; a warning when the sink rate passes ratio × the frozen rate."""
    now = probe_collapse(model, probe)
    alarm = collapse_alarm(now["sink_rate"], base["sink_rate"], ratio)
    if alarm:
        log.warning("collapse alarm at step %d: attention-sink rate %.1f%% > %.1f× the frozen model's %.1f%% "
                    "([INT] entropy %.3f, frozen %.3f): the interest encoder's attention is drifting from the "
                    "pretrained model's", step,
                    now["sink_rate"], ratio, base["sink_rate"], now["int_attn_entropy"], base["int_attn_entropy"])
    return {"probe_step": step, "sink_rate": now["sink_rate"], "sink_rate_frozen": base["sink_rate"],
            "int_attn_entropy": now["int_attn_entropy"], "int_attn_entropy_frozen": base["int_attn_entropy"],
            "collapse_alarm": float(alarm)}


# ---- which loss moves the weights ----------------------------------------------------------
def weighted_losses(cfg: KarmaConfig) -> dict[str, float]:
    """The losses that move the weights, with their weights: L_act always, the others where λ > 0."""
    weights = {"act": 1.0, "gen": cfg.loss.lambda_gen, "rec": cfg.loss.lambda_rec,
               "img": cfg.loss.lambda_img if cfg.model.image_dim else 0.0}
    return {k: w for k, w in weights.items() if w > 0}


def update_shares(model: KarmaModel, batch: dict[str, torch.Tensor], opt, cfg: KarmaConfig,
                  autocast) -> dict[str, float]:
    """Split the optimiser's step by loss on one batch: u_k = λ_k·∇L_k ÷ (√v̂ + ε), AdamW's per-parameter
    scaling with its current second moment v̂, for k in act/gen/rec(/img).

    Raw gradient norms mislead under Adam: a loss with small gradients on parameters the other losses leave
    still gets full-size steps there. Reported per parameter group (lm = the trainable top layers, heads)
    as each loss's share of Σ_k ‖u_k‖², and the cosine of u_gen and u_rec with u_act (< 0: they pull
    against the action loss). Runs the unwrapped model with `torch.autograd.grad`, so no gradient is
    accumulated and DDP's reducer never fires: call it on one rank, between optimiser steps.
    """
    named = [(g["name"], g["betas"][1], p) for g in opt.param_groups for p in g["params"]]
    was = model.training
    model.train()
    with autocast:
        out = model(batch)
    model.train(was)
    losses = {k: w * out[k] for k, w in weighted_losses(cfg).items() if k in out}
    scaled: dict[str, dict[str, list[torch.Tensor]]] = {}  # loss -> group -> [u of each parameter, flat]
    for k, loss in losses.items():
        grads = torch.autograd.grad(loss, [p for *_, p in named], retain_graph=True, allow_unused=True,
                                    materialize_grads=True)  # zeros where loss k does not reach: aligned vectors
        for (group, beta2, p), g in zip(named, grads):
            st = opt.state.get(p, {})
            if "exp_avg_sq" not in st:  # before the optimiser's first step
                continue
            v_hat = st["exp_avg_sq"] / (1 - beta2 ** float(st["step"]))
            scaled.setdefault(k, {}).setdefault(group, []).append((g.float() / (v_hat.sqrt() + 1e-8)).flatten())
    shares: dict[str, float] = {}
    for group in {g for per in scaled.values() for g in per}:
        u = {k: torch.cat(per[group]) for k, per in scaled.items() if group in per}
        total = sum(float(v.pow(2).sum()) for v in u.values())
        for k, v in u.items():
            shares[f"update_share_{group}_{k}"] = float(v.pow(2).sum()) / max(total, 1e-30)
            if k != "act" and "act" in u:
                shares[f"update_cos_{group}_act_{k}"] = float(F.cosine_similarity(u["act"], v, dim=0))
    return shares


# ---- the loop ------------------------------------------------------------------------------
class PhaseClock:
    """Seconds a worker spends outside the optimiser step, by phase (start-up, validation, probes, update
    shares, checkpoints), reported as `spent_<phase>_s`: why a run took as long as it did."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.spent[phase] = self.spent.get(phase, 0.0) + time.perf_counter() - t

    def take(self) -> dict[str, float]:
        """The seconds since the last take, as report metrics."""
        out, self.spent = {f"spent_{k}_s": v for k, v in self.spent.items()}, {}
        return out


def train_step(ddp_model, model: KarmaModel, batch: dict[str, torch.Tensor], opt, sched, cfg: KarmaConfig,
               autocast) -> dict[str, torch.Tensor]:
    """One optimiser step: forward (every loss) → backward → clip the trainable weights → step."""
    with autocast:
        out = ddp_model(batch)  # dict of scalar losses
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.train.grad_clip)
    opt.step()
    sched.step()
    return out



def _mean_across_workers(values: dict[str, float], device) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def _epoch(shard, cfg: KarmaConfig, epoch: int, skip: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """One pass over this worker's shard as numpy batches, numbered; skips what a resumed run trained on.

    The order is a function of (train.seed, epoch): blocks arrive in a seeded order (the dataset) and
    rows are shuffled in a seeded local buffer, so a restarted worker sees the same batches again.
    """
    batches = shard.iter_batches(batch_size=cfg.train.batch_size, drop_last=True, batch_format="numpy",
                                 local_shuffle_buffer_size=cfg.train.batch_size * SHUFFLE_BATCHES,
                                 local_shuffle_seed=cfg.train.seed * 100_003 + epoch, prefetch_batches=2)
    for i, raw in enumerate(batches):
        if i >= skip:
            yield i, raw


def train_loop_per_worker(config: dict[str, Any]) -> None:
    quiet_worker_logs()
    cfg = KarmaConfig.from_dict(config["karma"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed * 1000 + rank)
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)  # Ray pins fractional-CPU workers to 1 thread
    device = ray.train.torch.get_device()
    clock = PhaseClock()

    # 1. Model and inputs.
    with clock("startup_model"):
        model, tok = build_model(cfg.model, cfg.loss)
        inputs = WorkerInputs(cfg, config.get("cache_root"), tok)

    # 2. Resume from the latest checkpoint (weights, optimiser, RNG, position in the data), or start
    #    from what the frozen model knows (identity readout centred on the data).
    state: dict[str, Any] = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    checkpoint, optim = ray.train.get_checkpoint(), None
    with clock("startup_readout"):
        if checkpoint:
            with checkpoint.as_directory() as d:
                optim, state = load_checkpoint(model, Path(d))
        else:
            model.init_readout(*inputs.readout_statistics(model))
    model.to(device)
    step, resumed_from = int(state["step"]), int(state["step"]) if checkpoint else -1
    probe, probe_base, reading = None, state.get("probe_base"), {}  # collapse alarm (rank 0)
    fsdp = cfg.train.strategy == "fsdp"
    validate = bool(cfg.train.valid_every and rank == 0 and inputs.cache is not None and not fsdp)
    shares_every = cfg.train.update_share_every if len(weighted_losses(cfg)) > 1 else 0  # L_act alone: nothing to split
    if validate and not checkpoint:  # the curve starts at the frozen model's readout (rows seen = 0)
        with clock("valid"):
            reading["valid_hr@50_step0"] = inputs.valid_hr(model)

    # 3. Parallelism (DDP or FSDP2), then the optimiser over the parameters it left, and the schedule.
    model.train()  # the readout statistics above ran the model in eval mode
    ddp_model = parallelize(model, cfg, device)
    reading.update(_parameter_counts(model, ddp_model), malloc=allocator_in_use())
    opt = torch.optim.AdamW(param_groups(model, cfg), betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    if optim is not None:
        restore_optimizer(model, opt, sched, optim, cfg)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    shard = ray.train.get_dataset_shard("train")
    tally = config.get("reject_tally")

    # 4. The loop: fetch (timed) → forward → backward → clip → step; log, checkpoint. Epochs end when
    #    the stream does (rows the tokeniser rejected never stall it); an empty epoch is an error.
    sums: dict[str, float] = {}
    wait_s = busy_s = optim_s = 0.0  # data wait; all work between fetches; forward→step alone
    tokens = n_steps = 0
    t_last = time.perf_counter()
    epoch, skip = int(state["epoch"]), int(state["batch_in_epoch"])
    while step < cfg.train.max_steps:
        t_fetch = time.perf_counter()
        seen = skip
        for i, raw in _epoch(shard, cfg, epoch, skip):
            seen = i + 1
            t_start = time.perf_counter()
            wait_s += t_start - t_fetch
            batch = inputs.collate(raw, device)
            tokens += int(sum(batch[k].sum() for k in MASK_KEYS if k in batch))
            if cfg.train.probe_every and rank == 0 and probe is None and not fsdp:
                probe = probe_batch(batch, cfg.train.probe_prompts)
                if probe_base is None:  # before the first update: the frozen model's reading
                    with clock("probe"):
                        probe_base = probe_collapse(model, probe)
            if step == 0:  # every loss before the first update (e.g. L_gen of the untouched LM)
                with clock("step0_losses"), torch.no_grad(), autocast:
                    reading.update({f"{k}_step0": float(v) for k, v in ddp_model(batch).items()})

            t_optim = time.perf_counter()
            out = train_step(ddp_model, model, batch, opt, sched, cfg, autocast)
            optim_s += time.perf_counter() - t_optim
            step += 1
            n_steps += 1
            last = step >= cfg.train.max_steps
            if probe is not None and (step % cfg.train.probe_every == 0 or last):
                with clock("probe"):
                    reading.update(_collapse_reading(model, probe, probe_base, cfg.train.sink_alarm_ratio, step))
            if validate and (step % cfg.train.valid_every == 0 or last):
                with clock("valid"):
                    reading.update({"valid_hr@50": inputs.valid_hr(model), "valid_step": step})
            if shares_every and rank == 0 and not fsdp and step % shares_every == 0:
                with clock("update_shares"):
                    reading.update(update_shares(model, batch, opt, cfg, autocast) | {"update_share_step": step})
            for k in LOSS_KEYS:
                if k in out:
                    sums[k] = sums.get(k, 0.0) + float(out[k].detach())
            busy_s += time.perf_counter() - t_start

            if step % cfg.train.log_every == 0 or step % cfg.train.checkpoint_every == 0 or last:
                elapsed = time.perf_counter() - t_last
                metrics = _mean_across_workers({k: v / n_steps for k, v in sums.items()}, device)
                metrics.update(step=step, epoch=epoch, rows_seen=step * cfg.train.batch_size * world,
                               lr=_lr_of(opt, "lm"), resumed_from_step=resumed_from,
                               tokens_per_s=tokens * world / max(elapsed, 1e-9), step_s=elapsed / n_steps,
                               optim_step_s=optim_s / n_steps,
                               data_wait_frac=wait_s / max(wait_s + busy_s, 1e-9), world_size=world)
                if tally is not None:
                    metrics["rejected_rows"] = ray.get(tally.total.remote())
                if reading:  # the latest probe reading rides on the next report
                    metrics.update(reading)
                    reading = {}
                metrics.update(clock.take())  # this report's checkpoint is timed in the next one
                state = {"step": step, "epoch": epoch, "batch_in_epoch": seen, "seed": cfg.train.seed}
                if probe_base:
                    state["probe_base"] = probe_base
                with clock("report"):
                    _report(metrics, model, opt, sched, state, rank, cfg,
                            with_checkpoint=step % cfg.train.checkpoint_every == 0 or last)
                sums, wait_s, busy_s, optim_s, tokens, n_steps, t_last = {}, 0.0, 0.0, 0.0, 0, 0, time.perf_counter()
            if last:
                return
            t_fetch = time.perf_counter()
        if seen == skip:
            raise RuntimeError(f"epoch {epoch} gave worker {rank} no training batch of {cfg.train.batch_size} rows: "
                               "too few valid rows for this many workers (see the rejected-row report)")
        epoch, skip = epoch + 1, 0


def _parameter_counts(model: KarmaModel, ddp_model) -> dict[str, float]:
    """Bytes of all / trainable parameters, and what DDP actually all-reduces (frozen ones must not be)."""
    out = {"param_bytes": float(sum(p.numel() * p.element_size() for p in model.parameters())),
           "trainable_param_bytes": float(sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad))}
    if isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        data = ddp_model._get_ddp_logging_data()
        out["ddp_reduced_bytes"] = float(data["total_parameter_size_bytes"])
    return out


def _lr_of(opt, name: str) -> float:
    return next((g["lr"] for g in opt.param_groups if g["name"] == name), opt.param_groups[0]["lr"])


def _report(metrics: dict[str, Any], model: KarmaModel, opt, sched, state: dict[str, Any], rank: int,
            cfg: KarmaConfig, with_checkpoint: bool) -> None:
    """Every rank reports the same number of times; only rank 0 attaches the checkpoint."""
    if not with_checkpoint:
        ray.train.report(metrics, checkpoint=None)
        return
    weights, optim = _full_states(model, opt, cfg)  # collective under FSDP: every rank gathers
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    state = {**state, "node_id": ray.get_runtime_context().get_node_id()}  # where rank 0 ran (multi-node runs)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(weights, optim, sched, state, Path(tmp))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
