"""KarmaModel: the item/interest encoders and every KARMA loss, in one file (no Ray imports).

One causal LM f, kept at full depth, is shared by both towers (docs/design.md §3):
  e_i = norm(W_e · pool(f(item_text + [ITEM])) + b_e)                item embedding (offline, indexed)
  h   = norm(W_h · pool(f(query + history + [INT])) + b_h)            next-interest embedding (online)
  L_act   pairwise logistic  Σ_j −log σ(s(h,e⁺) − s(h,e_j))  over hard + in-batch negatives (or InfoNCE)
  L_gen   CE of "Next: " + target text appended after [INT] in the same sequence (history-conditioned)
  L_recon CE of the same text from P(h) alone: k soft tokens, nothing of the history visible
  L_img   optional: reconstruct the target's image embedding from h
  L = L_act + λ_gen·L_gen + λ_rec·L_recon + λ_img·L_img; a λ of 0 skips that loss's forward pass.

Frozen trunk, trainable top (model.trainable_layers = k > 0): the embeddings, the bottom L−k layers and
the tied LM head never change, so their output for fixed text ("states" entering layer L−k) can be
computed once and cached (karma_ray.cache). Every method takes either token ids (the trunk runs) or
those cached states. The soft prefix P(h) and the image soft token enter at the first trainable layer,
so reconstruction runs through the top k layers only and still has no path to the history.

Training starts from what the frozen model knows: `init_readout` sets W = I (or the principal
directions when emb_dim < d) and b = −W·mean, so at step 0 h·e is the frozen model's centred
cosine. Only e_i and h are needed at inference; the decoder path is train-only (and for /explain).
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from karma_ray.config import LossConfig, ModelConfig
from karma_ray.data.prompts import IGNORE, bos_id
from karma_ray.models.backbone import SPECIAL_TOKENS, DecoderView, fingerprint

Batch = dict[str, torch.Tensor]
TRUNK_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LM_WEIGHTS = "encoder/lm.safetensors"


class KarmaModel(nn.Module):
    def __init__(self, lm: nn.Module, model_cfg: ModelConfig, loss_cfg: LossConfig, token_ids: dict[str, int],
                 bos: int | None = None):
        super().__init__()
        self.lm = lm
        self.model_cfg, self.loss_cfg, self.token_ids, self.bos = model_cfg, loss_cfg, dict(token_ids), bos
        decoder = lm.get_decoder()
        n_layers, k = len(decoder.layers), model_cfg.trainable_layers
        if k > n_layers:
            raise ValueError(f"model.trainable_layers={k} but the backbone has {n_layers} layers")
        self.frozen_trunk = k > 0
        self.split = n_layers - k if k else 0  # states "entering layer `split`" are what the cache holds
        self.trunk_dtype = TRUNK_DTYPES[model_cfg.trunk_dtype] if self.frozen_trunk else torch.float32
        self._trunk = DecoderView(decoder, 0, self.split, final_norm=False)
        self._top = DecoderView(decoder, self.split, n_layers, final_norm=True)
        for i, layer in enumerate(list(decoder.layers)[self.split:]):
            layer.self_attn.layer_idx = i  # the top keeps its own KV cache when decoding (see decode_from_h)
        self._decoder = self._top  # the top layers L_recon and decode_from_h run through
        if loss_cfg.recon_decoder == "frozen":
            if not self.frozen_trunk:
                raise ValueError("loss.recon_decoder=frozen needs model.trainable_layers > 0")
            # The backbone's own top layers, copied before any training and never trained: not part of the
            # artifact (rebuilt from the backbone at load) and not in trainable_names.
            self.anchor = nn.ModuleDict({"layers": copy.deepcopy(nn.ModuleList(list(decoder.layers)[self.split:])),
                                         "norm": copy.deepcopy(decoder.norm)}).requires_grad_(False)
            self._decoder = DecoderView(decoder, self.split, n_layers, final_norm=True,
                                        layers=self.anchor["layers"], norm=self.anchor["norm"])

        d, emb, kp = lm.config.hidden_size, model_cfg.emb_dim or lm.config.hidden_size, model_cfg.prefix_tokens
        self.item_proj = nn.Linear(d, emb)  # W_e, b_e
        self.int_proj = nn.Linear(d, emb)  # W_h, b_h
        with torch.no_grad():
            w = torch.eye(d)[:emb] if emb <= d else torch.nn.init.orthogonal_(torch.empty(emb, d))
            for proj in (self.item_proj, self.int_proj):
                proj.weight.copy_(w)
                proj.bias.zero_()
        self.prefix = nn.Sequential(nn.Linear(emb, d), nn.GELU(), nn.Linear(d, kp * d))  # P: h -> k soft states
        # (1,)-shaped, not scalars: FSDP2 shards parameters along a dimension
        self.log_inv_tau = nn.Parameter(torch.tensor([math.log(1.0 / loss_cfg.init_temperature)]))
        if model_cfg.image_dim:
            self.image_in = nn.Linear(model_cfg.image_dim, d)  # image_emb -> the [IMG] soft state
            self.image_head = nn.Sequential(nn.Linear(emb, d), nn.GELU(), nn.Linear(d, model_cfg.image_dim))
        if self.frozen_trunk:
            for name, p in lm.named_parameters():
                p.requires_grad_(self._in_top(name))
        # Soft states (prefix, image) start at the scale of the residual stream where they enter.
        self.soft_scale = nn.Parameter(torch.tensor([self._residual_rms()]))

    # ---- structure ---------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.lm.config.hidden_size

    @property
    def num_layers(self) -> int:
        return len(self.lm.get_decoder().layers)

    def _in_top(self, lm_param_name: str) -> bool:
        """Trainable LM parameters under a frozen trunk: the top layers and the final norm."""
        parts = lm_param_name.split(".")
        if "layers" in parts:
            return int(parts[parts.index("layers") + 1]) >= self.split
        return parts[-2:-1] == ["norm"] and "layers" not in parts

    def _residual_rms(self) -> float:
        """Median per-token RMS of the states entering layer `split`, on a fixed token run (first token
        skipped: it carries the attention sink's outsized activations)."""
        ids = torch.arange(1000, 1016)[None, :]
        with torch.no_grad():
            x = self.trunk(ids, torch.ones_like(ids)).float()[0, 1:]
        return float(x.pow(2).mean(-1).sqrt().median())

    # ---- the two halves of the LM ------------------------------------------------------------
    def trunk(self, ids: torch.Tensor, mask: torch.Tensor | None, **decoder_kwargs) -> torch.Tensor:
        """(B, T) ids -> (B, T, d) states entering layer `split`, rounded to the trunk dtype (no grad when frozen).

        With trunk_dtype=bf16 the frozen layers run under bf16 autocast: 2-3x faster on CPUs with AVX-512
        BF16, and the states are what the cache stores. (Single-token decode steps pass `autocast=False`:
        bf16 matrix-vector products are slower than fp32 ones on CPU.)
        """
        x = self.lm.get_input_embeddings()(ids)  # (B, T, d)
        if not self.frozen_trunk:
            return x
        fast = decoder_kwargs.pop("autocast", True) and self.trunk_dtype != torch.float32
        with torch.no_grad(), torch.autocast(x.device.type, dtype=self.trunk_dtype, enabled=fast):
            if self.split:
                x = self._trunk(x, mask, **decoder_kwargs).last_hidden_state
            return x.to(self.trunk_dtype)

    def top(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, d) states entering layer `split` -> (B, T, d) final (normed) states.

        In eval mode (serving, evaluation, export) a bf16 trunk's top layers run under bf16 autocast too, as
        the bf16 presets train them: their input is bf16 already, and on AVX-512-BF16 CPUs the pass is 1.8x
        faster than in fp32. The residual stream and the final norm stay fp32, so pooling and the readout
        see fp32 states. In train mode the caller's autocast (train.precision) decides.
        """
        x = states.to(self.item_proj.weight.dtype)
        if self.training or self.trunk_dtype == torch.float32:
            return self._top(x, mask).last_hidden_state
        with torch.autocast(x.device.type, dtype=self.trunk_dtype):
            return self._top(x, mask).last_hidden_state

    def _states(self, batch: Batch, key: str) -> torch.Tensor:
        """Cached states `{key}_states` when the batch has them, else the trunk over `{key}_ids`."""
        if f"{key}_states" in batch:
            return batch[f"{key}_states"]
        ids, mask = batch[f"{key}_ids"], batch[f"{key}_mask"]  # (..., T): negatives come as (B, N, T)
        x = self.trunk(ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, mask.shape[-1]))
        return x.reshape(*ids.shape, x.shape[-1])

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        """RMS-normalise soft states and put them at the residual stream's scale."""
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.soft_scale

    # ---- readout -----------------------------------------------------------------------------
    def pool(self, hidden: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(B, T, d) final states -> (B, d): the mean over the text up to `pos` (BOS excluded), or the state
        at `pos` ([INT]/[ITEM]) with readout=token. Tokens after `pos` (L_gen's target) never count."""
        if self.model_cfg.readout == "token":
            return hidden[torch.arange(len(pos)), pos]
        t = torch.arange(hidden.shape[1], device=hidden.device)[None, :]
        keep = (mask > 0) & (t <= pos[:, None]) & (t >= (1 if self.bos is not None else 0))  # (B, T)
        w = keep.to(hidden.dtype)[..., None]
        return (hidden * w).sum(1) / w.sum(1).clamp(min=1.0)

    def _embed_out(self, pooled: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        return F.normalize(proj(pooled.to(proj.weight.dtype)).float(), dim=-1)  # (B, emb)

    @torch.no_grad()
    def init_readout(self, item_pooled: torch.Tensor, int_pooled: torch.Tensor) -> None:
        """Start from the frozen model: W = I (or the top principal directions of the items when
        emb_dim < d) and b = −W·mean of each tower's pooled states, so h·e at step 0 is the frozen
        model's centred cosine (the readout every arm must beat)."""
        mu_item, mu_int = item_pooled.float().mean(0), int_pooled.float().mean(0)
        emb, d = self.item_proj.weight.shape
        if emb == d:
            w = torch.eye(d)
        else:
            w = torch.linalg.svd(item_pooled.float() - mu_item, full_matrices=False).Vh[:emb]
        for proj, mu in ((self.item_proj, mu_item), (self.int_proj, mu_int)):
            proj.weight.copy_(w)
            proj.bias.copy_(-(w @ mu))

    def _with_image(self, states: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        """Put the projected image at the [IMG] slot (the first text position) of item states."""
        if image is None or not self.model_cfg.image_dim:
            return states
        slot = 1 if self.bos is not None else 0
        soft = self._scaled(self.image_in(image.to(self.item_proj.weight.dtype)))  # (N, d)
        x = states.to(soft.dtype).clone()
        x[:, slot] = soft
        return x

    # ---- encoders ----------------------------------------------------------------------------
    def item_pooled(self, ids: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                    pos: torch.Tensor | None = None, image: torch.Tensor | None = None,
                    states: torch.Tensor | None = None) -> torch.Tensor:
        """(N, T) item sequences (ids, or cached trunk states) -> (N, d) pooled final states, unprojected."""
        x = states if states is not None else self.trunk(ids, mask)
        return self.pool(self.top(self._with_image(x, image), mask), mask, pos)

    def interest_pooled(self, ids: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                        pos: torch.Tensor | None = None, states: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) interest prompts ending in [INT] (ids, or cached states) -> (B, d) pooled final states."""
        x = states if states is not None else self.trunk(ids, mask)
        return self.pool(self.top(x, mask), mask, pos)

    def encode_items(self, ids: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                     pos: torch.Tensor | None = None, image: torch.Tensor | None = None,
                     states: torch.Tensor | None = None) -> torch.Tensor:
        """-> (N, emb) unit vectors e_i (inputs as for `item_pooled`)."""
        return self._embed_out(self.item_pooled(ids, mask, pos, image, states), self.item_proj)

    def encode_interest(self, ids: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                        pos: torch.Tensor | None = None, states: torch.Tensor | None = None) -> torch.Tensor:
        """-> (B, emb) unit vectors h (inputs as for `interest_pooled`)."""
        return self._embed_out(self.interest_pooled(ids, mask, pos, states), self.int_proj)

    def soft_prefix(self, h: torch.Tensor) -> torch.Tensor:
        """P(h): (B, emb) -> (B, k, d) soft states at the residual stream's scale."""
        k, d = self.model_cfg.prefix_tokens, self.hidden_size
        return self._scaled(self.prefix(h.to(self.item_proj.weight.dtype)).view(len(h), k, d))

    # ---- losses ------------------------------------------------------------------------------
    def _token_ce(self, hidden: torch.Tensor, labels: torch.Tensor, per_row: bool = False) -> torch.Tensor:
        """Next-token CE, computing vocab logits only where a label exists (the LM head is the big matmul).
        With `per_row`, (B,) summed nats per row instead of the mean over every labelled token."""
        shifted = labels[:, 1:]  # (B, T-1): token t+1 is predicted from position t
        where = shifted != IGNORE
        logits = self.lm.get_output_embeddings()(hidden[:, :-1][where])  # (n, V)
        if not per_row:
            return F.cross_entropy(logits.float(), shifted[where])
        nats = F.cross_entropy(logits.float(), shifted[where], reduction="none")  # (n,)
        row = torch.arange(len(labels), device=labels.device)[:, None].expand_as(shifted)[where]  # (n,)
        return torch.zeros(len(labels), device=nats.device).index_add_(0, row, nats)  # (B,)

    def action_loss(self, h: torch.Tensor, e_pos: torch.Tensor, e_neg: torch.Tensor, pos_item: torch.Tensor,
                    neg_item: torch.Tensor, pos_logq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """L_act over each row's hard negatives plus the batch's other clicks (and, optionally, other rows'
        hard negatives). Returns (loss, in-batch accuracy).

        A candidate is a negative for row b when it is a real item whose id differs from b's target, so
        in-batch copies of the target never count. In-batch negatives are other users' clicks, drawn in
        proportion to click share q; with `pos_logq` the pairs that compare against them are corrected by
        −log q on both sides (Yi et al. 2019). Hard negatives are not sampled by click share, so their
        pairs are not corrected.
        """
        B, N = neg_item.shape
        pool = torch.cat([e_pos, e_neg.reshape(B * N, -1)])  # (M, emb), M = B + B·N
        pool_id = torch.cat([pos_item, neg_item.reshape(-1)])  # (M,)
        pool_row = torch.cat([torch.arange(B), torch.arange(B).repeat_interleave(N)]).to(h.device)
        in_batch = torch.arange(len(pool_id), device=h.device) < B  # (M,): the click-sampled candidates
        scale = self.log_inv_tau.exp().clamp(max=100.0)
        s_pos = (h * e_pos).sum(-1) * scale  # (B,)
        s_all = h @ pool.T * scale  # (B, M)
        is_neg = (pool_id[None, :] >= 0) & (pool_id[None, :] != pos_item[:, None])  # (B, M)
        own_row = pool_row[None, :] == torch.arange(B, device=h.device)[:, None]
        if not self.loss_cfg.in_batch_negatives:
            is_neg &= ~in_batch[None, :]
        if not self.loss_cfg.cross_row_hard_negatives:
            is_neg &= in_batch[None, :] | own_row
        s_cmp, s_ref = s_all, s_pos[:, None].expand_as(s_all)  # compare s_j against s⁺ per pair
        if self.loss_cfg.logq_correction and pos_logq is not None:
            lq = torch.where(in_batch, torch.cat([pos_logq, pos_logq.new_zeros(B * N)]), 0.0).float()  # (M,)
            s_cmp = s_all - lq[None, :]
            s_ref = torch.where(in_batch[None, :], (s_pos - pos_logq.float())[:, None], s_pos[:, None])
        if self.loss_cfg.act == "pairwise":
            pair = F.softplus(s_cmp - s_ref) * is_neg  # −log σ(s⁺ − s_j)
            loss = (pair.sum(1) / is_neg.sum(1).clamp(min=1)).mean()  # mean over j keeps λ batch-size-free
        else:  # InfoNCE; the positive carries the in-batch correction (mixed negative sampling)
            pos_logit = s_pos - (pos_logq.float() if self.loss_cfg.logq_correction and pos_logq is not None else 0.0)
            logits = torch.cat([pos_logit[:, None], s_cmp.masked_fill(~is_neg, float("-inf"))], dim=1)
            loss = F.cross_entropy(logits, torch.zeros(B, dtype=torch.long, device=h.device))
        acc = (s_pos > s_all.masked_fill(~is_neg, float("-inf")).max(1).values).float().mean()
        return loss, acc

    def reconstruction_loss(self, h: torch.Tensor, rec_states: torch.Tensor, rec_mask: torch.Tensor,
                            rec_labels: torch.Tensor, per_row: bool = False) -> torch.Tensor:
        """L_recon: decode "Next: " + target text from [BOS][P(h)] alone — the history is not in this sequence.

        `rec_states` are the trunk's states of [BOS] "Next: " + text on its own; P(h) is inserted after BOS
        at the first trainable layer, and the top layers decode (their frozen copy with loss.recon_decoder=frozen).
        `per_row` gives (B,) summed nats per row (for per-event statistics).
        """
        x, mask, labels = self._with_prefix(h, rec_states, rec_mask, rec_labels)
        hidden = self._decoder(x.to(self.item_proj.weight.dtype), mask).last_hidden_state  # (B, 1+k+Tr, d)
        return self._token_ce(hidden, labels, per_row)

    def _with_prefix(self, h: torch.Tensor, states: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None):
        B, k, cut = len(h), self.model_cfg.prefix_tokens, 1 if self.bos is not None else 0
        p = self.soft_prefix(h)  # (B, k, d)
        x = torch.cat([states[:, :cut].to(p.dtype), p, states[:, cut:].to(p.dtype)], dim=1)  # (B, k+Tr, d)
        ones = torch.ones(B, k, dtype=mask.dtype, device=mask.device)
        mask = torch.cat([mask[:, :cut], ones, mask[:, cut:]], dim=1)
        if labels is not None:
            pad = torch.full((B, k), IGNORE, dtype=labels.dtype, device=labels.device)
            labels = torch.cat([labels[:, :cut], pad, labels[:, cut:]], dim=1)
        return x, mask, labels

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """All training losses for one batch (ids from PromptBuilder.training_batch, or cached states)."""
        cfg = self.loss_cfg
        B, N = batch["neg_item"].shape
        # Interest tower; with L_gen on, the target text rides after [INT] in the same causal pass.
        hid = self.top(self._states(batch, "int"), batch["int_mask"])  # (B, T, d)
        h = self._embed_out(self.pool(hid, batch["int_mask"], batch["int_pos"]), self.int_proj)  # (B, emb)
        # Item tower: targets and their hard negatives in one pass.
        pos_x, neg_x = self._states(batch, "pos"), self._states(batch, "neg")  # (B, Ti, d), (B, N, Ti, d)
        item_x = torch.cat([pos_x, neg_x.reshape(B * N, *neg_x.shape[2:])])
        item_mask = torch.cat([batch["pos_mask"], batch["neg_mask"].reshape(B * N, -1)])
        item_pos = torch.cat([batch["pos_pos"], batch["neg_pos"].reshape(-1)])
        image = torch.cat([batch["pos_image"], batch["neg_image"].reshape(B * N, -1)]) if "pos_image" in batch else None
        e = self.encode_items(mask=item_mask, pos=item_pos, image=image, states=item_x)  # (B+B·N, emb)
        l_act, acc = self.action_loss(h, e[:B], e[B:].view(B, N, -1), batch["pos_item"], batch["neg_item"],
                                      batch.get("pos_logq"))
        out = {"act": l_act, "act_acc": acc}
        total = l_act
        if cfg.lambda_gen > 0:
            out["gen"] = self._token_ce(hid, batch["gen_labels"])
            total = total + cfg.lambda_gen * out["gen"]
        if cfg.lambda_rec > 0:
            out["rec"] = self.reconstruction_loss(h, self._states(batch, "rec"), batch["rec_mask"], batch["rec_labels"])
            total = total + cfg.lambda_rec * out["rec"]
        if self.model_cfg.image_dim and cfg.lambda_img > 0 and "pos_image" in batch:
            out["img"] = self.image_loss(h, batch["pos_image"])
            total = total + cfg.lambda_img * out["img"]
        out["loss"] = total
        return out

    def image_loss(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred = self.image_head(h.to(self.item_proj.weight.dtype)).float()
        if self.loss_cfg.image_recon == "cosine":
            return (1 - F.cosine_similarity(pred, target.float(), dim=-1)).mean()
        return F.mse_loss(pred, target.float())

    # ---- diagnostics (sink rate, interest-row concentration) ----------------------------------
    @torch.no_grad()
    def interest_attentions(self, ids: torch.Tensor | None, mask: torch.Tensor,
                            states: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Per trainable layer, (B, H, T, T) attention maps over interest prompts.

        SDPA does not return weights, so the call runs with eager attention and restores the
        previous implementation afterwards (same weights, same maths).
        """
        x = states if states is not None else self.trunk(ids, mask)
        previous = self.lm.config._attn_implementation
        if previous != "eager":
            self.lm.set_attn_implementation("eager")
        try:
            out = self._top(x.to(self.item_proj.weight.dtype), mask, output_attentions=True)
        finally:
            if previous != "eager":
                self.lm.set_attn_implementation(previous)
        return tuple(a.float() for a in out.attentions)

    # ---- decoding (explain, fidelity) --------------------------------------------------------
    @torch.no_grad()
    def decode_from_h(self, h: torch.Tensor, start_ids: torch.Tensor, eos_id: int, max_new_tokens: int = 24) -> list[list[int]]:
        """Greedy text from [BOS][P(h)] + start_ids ("Next: "): the path L_recon trains, with a KV cache
        on each half of the LM (the trunk sees the text alone, the top sees prefix + text)."""
        from transformers import DynamicCache

        B = len(h)
        first = ([self.bos] if self.bos is not None else []) + start_ids.tolist()
        ids = torch.tensor([first] * B, dtype=torch.long, device=h.device)
        trunk_cache, top_cache = DynamicCache(), DynamicCache()

        def trunk_step(step_ids: torch.Tensor) -> torch.Tensor:
            return self.trunk(step_ids, None, cache=trunk_cache, use_cache=True, autocast=step_ids.shape[1] > 1)

        def top_step(x: torch.Tensor) -> torch.Tensor:
            return self._decoder(x.to(self.item_proj.weight.dtype), None, cache=top_cache, use_cache=True).last_hidden_state

        states = trunk_step(ids)  # (B, s, d)
        x, _, _ = self._with_prefix(h, states, torch.ones(ids.shape, dtype=torch.long, device=h.device), None)
        hid = top_step(x)
        out = torch.zeros(B, 0, dtype=torch.long, device=h.device)
        done = torch.zeros(B, dtype=torch.bool, device=h.device)
        for _ in range(max_new_tokens):
            nxt = self.lm.get_output_embeddings()(hid[:, -1]).argmax(-1)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == eos_id
            if done.all():
                break
            hid = top_step(trunk_step(nxt[:, None]))
        return [[t for t in row if t != eos_id] for row in out.tolist()]

    # ---- persistence (safetensors + JSON only: loading never unpickles) ----------------------
    def trainable_names(self) -> list[str]:
        """Every weight training can change: the heads, plus the top layers and final norm (or the whole LM
        when it all trains). named_parameters lists tied weights once."""
        return [n for n, p in self.named_parameters()
                if not n.startswith(("lm.", "anchor.")) or (n.startswith("lm.") and (p.requires_grad or not self.frozen_trunk))]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The `trainable_names` weights, by name: what checkpoints and the artifact hold."""
        params = dict(self.named_parameters())
        return {n: params[n].detach().contiguous().cpu() for n in self.trainable_names()}

    def load_trainable_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        wanted = set(self.trainable_names())
        missing, unexpected = sorted(wanted - set(state)), sorted(set(state) - wanted)
        if missing or unexpected:
            raise ValueError(f"{source} does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
        self.load_state_dict(state, strict=False)

    def lm_state(self) -> dict[str, torch.Tensor]:
        """The LM part of `trainable_state`, named as in the LM (what the artifact's encoder/ stores)."""
        return {n.removeprefix("lm."): t for n, t in self.trainable_state().items() if n.startswith("lm.")}

    def frozen_fingerprint(self) -> str:
        """Identifies the frozen part the artifact does not store (checked when the artifact loads)."""
        return fingerprint([(n, p) for n, p in self.lm.named_parameters() if not p.requires_grad])

    def head_state(self) -> dict[str, torch.Tensor]:
        return {n: t for n, t in self.trainable_state().items() if not n.startswith("lm.")}

    def save(self, out_dir: str | Path, tokenizer) -> None:
        """encoder/ (tokenizer, LM config, the changed LM weights), heads.safetensors, karma_model.json."""
        out = Path(out_dir)
        tokenizer.save_pretrained(out / "encoder")
        self.lm.config.save_pretrained(out / "encoder")
        save_file(self.lm_state(), str(out / LM_WEIGHTS))
        save_file(self.head_state(), str(out / "heads.safetensors"))
        meta = {"model": asdict(self.model_cfg), "loss": asdict(self.loss_cfg), "token_ids": self.token_ids,
                "bos": self.bos, "backbone": {"name": self.model_cfg.backbone, "frozen_sha256": self.frozen_fingerprint()}}
        (out / "karma_model.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, art_dir: str | Path, attn_implementation: str = "sdpa") -> tuple["KarmaModel", Any]:
        """Rebuild the backbone from its source, check its frozen part, then apply the stored weights."""
        from transformers import AutoTokenizer

        from karma_ray.models.backbone import load_backbone

        art = Path(art_dir)
        meta = json.loads((art / "karma_model.json").read_text())
        model_cfg = ModelConfig(**meta["model"])
        tok = AutoTokenizer.from_pretrained(art / "encoder")
        lm, _ = load_backbone(model_cfg, tok, attn_implementation)
        model = cls(lm, model_cfg, LossConfig(**meta["loss"]), meta["token_ids"], meta.get("bos"))
        want, got = meta["backbone"]["frozen_sha256"], model.frozen_fingerprint()
        if want != got:
            raise ValueError(f"{art}: the installed backbone {model_cfg.backbone!r} differs from the one this "
                             f"artifact was trained on (frozen weights sha256 {got[:12]} != {want[:12]})")
        state = {f"lm.{n}": t for n, t in load_file(str(art / LM_WEIGHTS)).items()}
        state.update(load_file(str(art / "heads.safetensors")))
        model.load_trainable_state(state, f"{art / LM_WEIGHTS} + heads.safetensors")
        return model.eval(), tok


def special_token_ids(tokenizer) -> dict[str, int]:
    return {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in zip(("item", "interest", "image"), SPECIAL_TOKENS)}


def build_model(model_cfg: ModelConfig, loss_cfg: LossConfig, tokenizer=None, attn_implementation: str | None = None):
    """Backbone + fresh heads: the one constructor training, evaluation, tests and benchmarks share."""
    from karma_ray.models.backbone import load_backbone

    lm, tok = load_backbone(model_cfg, tokenizer, attn_implementation)
    return KarmaModel(lm, model_cfg, loss_cfg, special_token_ids(tok), bos_id(tok)), tok
