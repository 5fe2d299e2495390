"""KarmaModel: the item/interest encoders and every KARMA loss, in one file (no Ray imports).

One causal LM f is shared by both towers (DESIGN §3):
  e_i = norm(W_e · f(item_text + [ITEM])[last])                    item embedding (offline, indexed)
  h   = norm(W_h · f(query + history + [INT])[INT])                 next-interest embedding (online)
  L_act   pairwise logistic  Σ_j −log σ(s(h,e⁺) − s(h,e_j))  over hard + in-batch negatives (or InfoNCE)
  L_gen   CE of "Next: " + target text appended after [INT] in the same sequence (history-conditioned)
  L_recon CE of the same text from P(h) alone: k soft-prefix tokens, nothing of the history visible
  L_img   optional: reconstruct the target's image embedding from h
  L = L_act + λ_gen·L_gen + λ_rec·L_recon + λ_img·L_img; a λ of 0 skips that loss's forward pass.
Only e_i and h are needed at inference; the decoder path is train-only (and for /explain).
"""
from __future__ import annotations

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

IGNORE = -100
Batch = dict[str, torch.Tensor]


class KarmaModel(nn.Module):
    def __init__(self, lm: nn.Module, model_cfg: ModelConfig, loss_cfg: LossConfig, token_ids: dict[str, int]):
        super().__init__()
        self.lm = lm
        self.model_cfg, self.loss_cfg, self.token_ids = model_cfg, loss_cfg, dict(token_ids)
        d, emb, k = lm.config.hidden_size, model_cfg.emb_dim, model_cfg.prefix_tokens
        self.item_proj = nn.Linear(d, emb)  # W_e
        self.int_proj = nn.Linear(d, emb)  # W_h
        self.prefix = nn.Sequential(nn.Linear(emb, d), nn.GELU(), nn.Linear(d, k * d))  # P: h -> k soft tokens
        rms = lm.get_input_embeddings().weight.detach().pow(2).mean().sqrt().item()
        self.prefix_scale = nn.Parameter(torch.tensor(rms))  # soft tokens start at the LM's embedding scale
        self.log_inv_tau = nn.Parameter(torch.tensor(math.log(1.0 / loss_cfg.init_temperature)))
        if model_cfg.image_dim:
            self.image_in = nn.Linear(model_cfg.image_dim, d)  # image_emb -> the [IMG] soft token
            self.image_head = nn.Sequential(nn.Linear(emb, d), nn.GELU(), nn.Linear(d, model_cfg.image_dim))
        # LM states at a new special token share one dominant direction (cos ≈ 0.98 between any two
        # items on truncated SmolLM2); subtracting a running mean exposes the item-specific part
        # (BERT-whitening style). Set from the first batch, then an EMA; frozen in eval and saved.
        self.register_buffer("item_center", torch.zeros(d))
        self.register_buffer("int_center", torch.zeros(d))
        self.register_buffer("centers_seen", torch.zeros(2))
        self.frozen_readout = False  # True: the "frozen" arm (no heads, last plain-text token)

    # ---- shared pieces -----------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.lm.config.hidden_size

    def _embed(self, ids: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        x = self.lm.get_input_embeddings()(ids)  # (B, T, d)
        if image is not None and self.model_cfg.image_dim:
            slot = ids == self.token_ids["image"]  # (B, T)
            soft = self.image_in(image.to(x.dtype))  # (B, d)
            x = torch.where(slot[..., None], soft[:, None, :].expand_as(x), x)
        return x

    def _hidden(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.lm.get_decoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state  # (B, T, d)

    def _read(self, hidden: torch.Tensor, pos: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        """Embedding at `pos` ([ITEM]/[INT]); the frozen arm reads the token before it, unprojected."""
        if self.frozen_readout:
            return F.normalize(hidden[torch.arange(len(pos)), pos - 1].float(), dim=-1)
        x = hidden[torch.arange(len(pos)), pos]  # (B, d)
        return F.normalize(proj(self._center(x, 0 if proj is self.item_proj else 1)).float(), dim=-1)  # (B, emb)

    def _center(self, x: torch.Tensor, which: int) -> torch.Tensor:
        center = self.item_center if which == 0 else self.int_center
        if self.training and len(x) > 1:
            with torch.no_grad():
                batch_mean = x.detach().mean(0).to(center.dtype)
                momentum = 1.0 if self.centers_seen[which] == 0 else 0.05
                center.lerp_(batch_mean, momentum)
                self.centers_seen[which] += 1
        return x - center.to(x.dtype)

    def _token_ce(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token CE, computing vocab logits only where a label exists (the LM head is the big matmul)."""
        shifted = labels[:, 1:]  # (B, T-1): token t+1 is predicted from position t
        where = shifted != IGNORE
        logits = self.lm.get_output_embeddings()(hidden[:, :-1][where])  # (n, V)
        return F.cross_entropy(logits.float(), shifted[where])

    # ---- encoders ----------------------------------------------------------------------------
    def encode_items(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                     image: torch.Tensor | None = None) -> torch.Tensor:
        """(N, T) item sequences -> (N, emb) unit vectors e_i."""
        return self._read(self._hidden(self._embed(ids, image), mask), pos, self.item_proj)

    def encode_interest(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(B, T) interest prompts ending in [INT] -> (B, emb) unit vectors h."""
        return self._read(self._hidden(self._embed(ids), mask), pos, self.int_proj)

    def soft_prefix(self, h: torch.Tensor) -> torch.Tensor:
        """P(h): (B, emb) -> (B, k, d), RMS-normalised then scaled like token embeddings."""
        k, d = self.model_cfg.prefix_tokens, self.hidden_size
        p = self.prefix(h.to(self.item_proj.weight.dtype)).view(len(h), k, d)
        return p * torch.rsqrt(p.pow(2).mean(-1, keepdim=True) + 1e-6) * self.prefix_scale

    # ---- losses ------------------------------------------------------------------------------
    def action_loss(self, h: torch.Tensor, e_pos: torch.Tensor, e_neg: torch.Tensor, pos_item: torch.Tensor,
                    neg_item: torch.Tensor, pos_logq: torch.Tensor | None = None,
                    neg_logq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """L_act over each row's hard negatives plus every other item in the batch.

        A candidate is a negative for row b when it is a real item whose id differs from b's target,
        so in-batch copies of the target never count as negatives. With `*_logq` (log of each item's
        share of training clicks) every candidate's logit is corrected by −log q (Yi et al. 2019):
        in-batch negatives are drawn in proportion to popularity, and without the correction the
        loss learns to push popular items down, which is exactly what the test targets are.
        Returns (loss, in-batch accuracy).
        """
        B, N = neg_item.shape
        pool = torch.cat([e_pos, e_neg.reshape(B * N, -1)])  # (M, emb), M = B + B·N
        pool_id = torch.cat([pos_item, neg_item.reshape(-1)])  # (M,)
        pool_row = torch.cat([torch.arange(B), torch.arange(B).repeat_interleave(N)]).to(h.device)
        scale = self.log_inv_tau.exp().clamp(max=100.0)
        s_pos = (h * e_pos).sum(-1) * scale  # (B,)
        s_all = h @ pool.T * scale  # (B, M)
        if self.loss_cfg.logq_correction and pos_logq is not None and neg_logq is not None:
            s_pos = s_pos - pos_logq.float()
            s_all = s_all - torch.cat([pos_logq, neg_logq.reshape(-1)]).float()[None, :]
        is_neg = (pool_id[None, :] >= 0) & (pool_id[None, :] != pos_item[:, None])  # (B, M)
        if not self.loss_cfg.in_batch_negatives:
            is_neg &= pool_row[None, :] == torch.arange(B, device=h.device)[:, None]
        if self.loss_cfg.act == "pairwise":
            pair = F.softplus(s_all - s_pos[:, None]) * is_neg  # −log σ(s⁺ − s_j)
            loss = (pair.sum(1) / is_neg.sum(1).clamp(min=1)).mean()  # mean over j keeps λ batch-size-free
        else:
            logits = torch.cat([s_pos[:, None], s_all.masked_fill(~is_neg, float("-inf"))], dim=1)
            loss = F.cross_entropy(logits, torch.zeros(B, dtype=torch.long, device=h.device))
        acc = (s_pos > s_all.masked_fill(~is_neg, float("-inf")).max(1).values).float().mean()
        return loss, acc

    def reconstruction_loss(self, h: torch.Tensor, rec_ids: torch.Tensor, rec_mask: torch.Tensor,
                            rec_labels: torch.Tensor) -> torch.Tensor:
        """L_recon: decode "Next: "+target text from [P(h)] alone — the history is not in this sequence."""
        B, k = len(h), self.model_cfg.prefix_tokens
        x = torch.cat([self.soft_prefix(h), self._embed(rec_ids)], dim=1)  # (B, k+Tr, d)
        mask = torch.cat([torch.ones(B, k, dtype=rec_mask.dtype, device=h.device), rec_mask], dim=1)
        labels = torch.cat([torch.full((B, k), IGNORE, dtype=rec_labels.dtype, device=h.device), rec_labels], 1)
        return self._token_ce(self._hidden(x, mask), labels)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """All training losses for one batch (arrays from PromptBuilder.training_batch)."""
        cfg = self.loss_cfg
        B, N = batch["neg_item"].shape
        # Interest tower; with L_gen on, the target text rides after [INT] in the same causal pass.
        hid = self._hidden(self._embed(batch["int_ids"]), batch["int_mask"])  # (B, T, d)
        h = self._read(hid, batch["int_pos"], self.int_proj)  # (B, emb)
        # Item tower: targets and their hard negatives in one pass.
        item_ids = torch.cat([batch["pos_ids"], batch["neg_ids"].reshape(B * N, -1)])  # (B+B·N, Ti)
        item_mask = torch.cat([batch["pos_mask"], batch["neg_mask"].reshape(B * N, -1)])
        item_pos = torch.cat([batch["pos_pos"], batch["neg_pos"].reshape(-1)])
        image = torch.cat([batch["pos_image"], batch["neg_image"].reshape(B * N, -1)]) if "pos_image" in batch else None
        e = self.encode_items(item_ids, item_mask, item_pos, image)  # (B+B·N, emb)
        l_act, acc = self.action_loss(h, e[:B], e[B:].view(B, N, -1), batch["pos_item"], batch["neg_item"],
                                      batch.get("pos_logq"), batch.get("neg_logq"))
        out = {"act": l_act, "act_acc": acc}
        total = l_act
        if cfg.lambda_gen > 0:
            out["gen"] = self._token_ce(hid, batch["gen_labels"])
            total = total + cfg.lambda_gen * out["gen"]
        if cfg.lambda_rec > 0:
            out["rec"] = self.reconstruction_loss(h, batch["rec_ids"], batch["rec_mask"], batch["rec_labels"])
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
    def interest_attentions(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-layer (B, H, T, T) attention maps over interest prompts.

        SDPA does not return weights, so the call runs with eager attention and restores the
        previous implementation afterwards (same weights, same maths).
        """
        previous = self.lm.config._attn_implementation
        if previous != "eager":
            self.lm.set_attn_implementation("eager")
        try:
            out = self.lm.get_decoder()(inputs_embeds=self._embed(ids), attention_mask=mask, output_attentions=True)
        finally:
            if previous != "eager":
                self.lm.set_attn_implementation(previous)
        return tuple(a.float() for a in out.attentions)

    # ---- decoding (explain, fidelity) --------------------------------------------------------
    @torch.no_grad()
    def decode_from_h(self, h: torch.Tensor, start_ids: torch.Tensor, eos_id: int, max_new_tokens: int = 24) -> list[list[int]]:
        """Greedy text from [P(h)] + start_ids ("Next: "); the same bottleneck path L_recon trains."""
        B = len(h)
        x = torch.cat([self.soft_prefix(h), self._embed(start_ids[None, :].expand(B, -1))], dim=1)  # (B, k+s, d)
        out: list[list[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=h.device)
        for _ in range(max_new_tokens):
            hid = self._hidden(x, torch.ones(x.shape[:2], dtype=torch.long, device=h.device))
            nxt = self.lm.get_output_embeddings()(hid[:, -1]).argmax(-1)  # (B,)
            for b in range(B):
                if not done[b]:
                    out[b].append(int(nxt[b]))
            done |= nxt == eos_id
            if done.all():
                break
            x = torch.cat([x, self._embed(nxt[:, None])], dim=1)
        return [[t for t in seq if t != eos_id] for seq in out]

    # ---- persistence (safetensors + JSON only: loading never unpickles) ----------------------
    def head_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if not k.startswith("lm.")}

    def save(self, out_dir: str | Path, tokenizer) -> None:
        """encoder/ (HF safetensors + tokenizer), heads.safetensors, karma_model.json."""
        out = Path(out_dir)
        self.lm.save_pretrained(out / "encoder")
        tokenizer.save_pretrained(out / "encoder")
        save_file(self.head_state(), str(out / "heads.safetensors"))
        meta = {"model": asdict(self.model_cfg), "loss": asdict(self.loss_cfg), "token_ids": self.token_ids}
        (out / "karma_model.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, art_dir: str | Path, attn_implementation: str = "sdpa") -> tuple["KarmaModel", Any]:
        from karma_ray.models.backbone import load_saved_backbone  # local: keeps import light for tests

        art = Path(art_dir)
        meta = json.loads((art / "karma_model.json").read_text())
        lm, tok = load_saved_backbone(art / "encoder", attn_implementation)
        model = cls(lm, ModelConfig(**meta["model"]), LossConfig(**meta["loss"]), meta["token_ids"])
        missing, unexpected = model.load_state_dict(load_file(str(art / "heads.safetensors")), strict=False)
        bad = [m for m in missing if not m.startswith("lm.")] + list(unexpected)
        if bad:
            raise ValueError(f"{art / 'heads.safetensors'} does not match the model: {bad[:8]}")
        return model.eval(), tok


def special_token_ids(tokenizer) -> dict[str, int]:
    return {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in
            (("item", "[ITEM]"), ("interest", "[INT]"), ("image", "[IMG]"))}


def build_model(model_cfg: ModelConfig, loss_cfg: LossConfig, tokenizer=None, attn_implementation: str | None = None):
    """Backbone + fresh heads: the one constructor training, tests and benchmarks share."""
    from karma_ray.models.backbone import load_backbone

    lm, tok = load_backbone(model_cfg, tokenizer, attn_implementation)
    return KarmaModel(lm, model_cfg, loss_cfg, special_token_ids(tok)), tok
