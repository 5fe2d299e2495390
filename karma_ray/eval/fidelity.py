"""Semantic fidelity (token-F1 of text decoded from h) and the effective rank of h."""
from __future__ import annotations

import re
from collections import Counter

import numpy as np

from karma_ray.data.prompts import IGNORE

_TOKEN = re.compile(r"\w+", re.UNICODE)


def text_tokens(text: str) -> list[str]:
    """Lower-cased word tokens; separators like '|' and punctuation do not count."""
    return _TOKEN.findall((text or "").lower())


def token_f1(pred: str, ref: str) -> float:
    """SQuAD-style bag-of-tokens F1 between a decoded text and the true item text."""
    p, r = text_tokens(pred), text_tokens(ref)
    if not p and not r:
        return 1.0
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def effective_rank(h: np.ndarray) -> float:
    """Participation ratio (Σλ)² / Σλ² of the covariance of h (N, d): 1 = collapsed, d = isotropic."""
    if len(h) < 2:
        return float("nan")
    lam = np.clip(np.linalg.eigvalsh(np.cov(np.asarray(h, np.float64), rowvar=False)), 0.0, None)
    return float(lam.sum() ** 2 / max((lam**2).sum(), 1e-30))


class FidelityProbe:
    """Fair semantic fidelity: how much of the target's text h still carries, the same way for every arm.

    An arm's own P(·) has seen h only if that arm trained L_recon, so decoding through it would score
    action-only low by construction. The probe re-initialises P (seeded), fits it on the arm's frozen h
    of `n_train` training rows for `eval.fidelity_fit_steps` steps (nothing else moves), then greedily
    decodes test h and scores token-F1 against the target text. The arm's weights are left as found;
    the as-trained F1 (through the arm's own P) is reported beside it. Greedy text shows only the decoder's
    mode, so it also reports `recon_gain_nats`: the target tokens' L_recon with h shuffled across the test
    rows minus with each row's own h, the nats a token the decoder actually reads from h.
    """

    def __init__(self, builder, data_dir, karma_cfg, eval_cfg, cache=None, n_train: int = 512, batch_size: int = 32,
                 lr: float = 1e-3):
        self.builder, self.data_dir, self.cfg, self.eval_cfg, self.cache = builder, data_dir, karma_cfg, eval_cfg, cache
        self.n_train, self.batch_size, self.lr = n_train, batch_size, lr

    def __call__(self, model, h_test: np.ndarray, targets: np.ndarray) -> dict:
        n = min(self.eval_cfg.fidelity_samples, len(h_test))
        as_trained, _ = self.decode_f1(model, h_test[:n], targets[:n])
        gain_as_trained = self.information(model, h_test[:n], targets[:n])["recon_gain_nats"]
        saved = {k: v.detach().clone() for k, v in model.prefix.state_dict().items()}
        losses = self.refit(model) if self.eval_cfg.fidelity_fit_steps else []
        refit, examples = self.decode_f1(model, h_test[:n], targets[:n])
        info = self.information(model, h_test[:n], targets[:n])
        model.prefix.load_state_dict(saved)
        return {"fidelity_f1": refit, "fidelity_f1_as_trained": as_trained, "n": n, "examples": examples,
                "fit_steps": self.eval_cfg.fidelity_fit_steps, "fit_loss_first_last": [losses[0], losses[-1]] if losses else None,
                **info, "recon_gain_nats_as_trained": gain_as_trained}

    def information(self, model, h: np.ndarray, targets: np.ndarray, seed: int = 0, n_boot: int = 1000) -> dict:
        """How much of the target's text the decoder reads from h: L_recon per token (teacher-forced) with each
        row's own h, and with h shuffled across the rows, with a 95% CI that resamples the rows (events).
        Greedy decoding shows only the decoder's mode, so two arms whose P both decode one popular title can
        still differ here; a decoder that ignores h scores 0."""
        import torch

        h_t = torch.from_numpy(np.ascontiguousarray(h, np.float32))
        states, mask, labels = self._rec_inputs(model, np.asarray(targets))
        perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(h_t)))
        own, shuffled = self.recon_nats(model, h_t, states, mask, labels), self.recon_nats(model, h_t[perm], states, mask, labels)
        tokens = (labels != IGNORE).sum(1).numpy().astype(np.float64)  # (n,) the target tokens scored
        rng = np.random.default_rng(seed)
        boot = [(shuffled[b].sum() - own[b].sum()) / tokens[b].sum()
                for b in (rng.integers(0, len(own), len(own)) for _ in range(n_boot))]
        return {"recon_nats": float(own.sum() / tokens.sum()), "recon_nats_shuffled_h": float(shuffled.sum() / tokens.sum()),
                "recon_gain_nats": float((shuffled.sum() - own.sum()) / tokens.sum()),
                "recon_gain_ci": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))] if n_boot else None}

    def recon_nats(self, model, h, states, mask, labels) -> np.ndarray:
        """(n,) summed L_recon nats per row, in the arm's training precision, without gradients."""
        import torch

        out = []
        with torch.no_grad(), self._autocast(h.device.type):
            for s in range(0, len(h), self.batch_size):
                sl = slice(s, s + self.batch_size)
                width = int(mask[sl].sum(1).max())
                out.append(model.reconstruction_loss(h[sl], states[sl, :width], mask[sl, :width], labels[sl, :width],
                                                     per_row=True).float().numpy())
        return np.concatenate(out).astype(np.float64)

    def _autocast(self, device_type: str):
        import torch

        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bf16")

    def _rec_inputs(self, model, target_ids: np.ndarray):
        """(states, mask, labels) of L_recon's "Next: " + text sequences for the target ids (cached or via the trunk)."""
        import torch

        if self.cache is not None:
            items = self.cache.items()
            r = items.rows(target_ids)
            return items.rec_states[r], items.rec_mask[r], items.rec_labels[r]
        rec = self.builder.target_batch(target_ids.tolist())
        ids, mask = torch.from_numpy(rec["rec_ids"]), torch.from_numpy(rec["rec_mask"])
        with torch.no_grad():
            states = model.trunk(ids, mask)
        return states, mask, torch.from_numpy(rec["rec_labels"])

    def decode_f1(self, model, h: np.ndarray, targets: np.ndarray) -> tuple[float | None, list[dict]]:
        import torch

        start = torch.tensor(self.builder.decode_prefix, dtype=torch.long)
        scores, examples = [], []
        for s in range(0, len(h), self.batch_size):
            seqs = model.decode_from_h(torch.from_numpy(h[s : s + self.batch_size]), start, self.builder.eos_id,
                                       self.eval_cfg.max_new_tokens)
            for j, seq in enumerate(seqs):
                decoded = self.builder.tok.decode(seq, skip_special_tokens=True).strip()
                ref = self.builder.text(int(targets[s + j]))
                scores.append(token_f1(decoded, ref))
                if len(examples) < 8:
                    examples.append({"target": ref, "decoded": decoded, "f1": round(scores[-1], 3)})
        return (float(np.mean(scores)) if scores else None), examples

    def target_embeddings(self, model, target_ids: np.ndarray) -> np.ndarray:
        """(n, emb) e_i of the given items: the decoder's ceiling when it is handed the item itself instead of h."""
        from karma_ray.models.inference import CachedInputs, TokenInputs, embed

        inputs = CachedInputs(self.cache, self.batch_size) if self.cache is not None else TokenInputs(self.builder, self.batch_size)
        return embed(model, inputs.items(np.asarray(target_ids).tolist()), "item")

    def _training_rows(self, model, condition: str = "h"):
        """(condition, rec states, rec mask, rec labels) of the first `n_train` training rows: the row's h, or
        with condition="target_e" its target's e_i."""
        import torch

        from karma_ray.models.inference import TokenInputs, embed

        if condition == "target_e":
            targets = self._training_targets()
            return (torch.from_numpy(self.target_embeddings(model, targets)), *self._rec_inputs(model, targets))
        if self.cache is not None:
            from karma_ray.models.inference import state_batches

            rows = self.cache.train_rows(self.n_train)
            h = embed(model, state_batches(rows["states"].to_pylist(), rows["length"].to_numpy(), rows["pos"].to_numpy(),
                                           self.cache.dtype, 32, by_length=True), "interest")
            return (torch.from_numpy(h), *self._rec_inputs(model, rows["target"].to_numpy()))
        first = self._first_training_events()
        h = embed(model, TokenInputs(self.builder, 32).interests([q or "" for q in first["query"].to_pylist()],
                                                                 first["history"].to_pylist()), "interest")
        return (torch.from_numpy(h), *self._rec_inputs(model, first["target"].to_numpy()))

    def _first_training_events(self):
        import pyarrow.parquet as pq

        from karma_ray.data.events import train_events_path

        return pq.read_table(sorted(train_events_path(self.data_dir).glob("*.parquet"))[0]).slice(0, self.n_train)

    def _training_targets(self) -> np.ndarray:
        if self.cache is not None:
            return self.cache.train_rows(self.n_train)["target"].to_numpy()
        return self._first_training_events()["target"].to_numpy()

    def refit(self, model, condition: str = "h") -> list[float]:
        """Re-initialise P (seeded) and fit it alone on the training rows' `condition` ("h", or "target_e" for
        the ceiling); returns the per-step losses."""
        import torch

        h, states, mask, labels = self._training_rows(model, condition)
        flags = {p: p.requires_grad for p in model.parameters()}
        torch.manual_seed(self.eval_cfg.seed)
        for layer in model.prefix:
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
        for p in model.parameters():
            p.requires_grad_(False)
        params = list(model.prefix.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=self.lr)
        # P is fitted in the precision the arm trained in: the refit is most of an evaluation, and bf16 cuts it by a quarter.
        autocast = self._autocast(h.device.type)
        rng = np.random.default_rng(self.eval_cfg.seed)
        losses = []
        model.train()
        try:
            for _ in range(self.eval_cfg.fidelity_fit_steps):
                b = torch.from_numpy(rng.choice(len(h), size=min(self.batch_size, len(h)), replace=False))
                width = int(mask[b].sum(1).max())
                with autocast:
                    loss = model.reconstruction_loss(h[b], states[b, :width], mask[b, :width], labels[b, :width])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        finally:
            model.eval()
            for p, flag in flags.items():
                p.requires_grad_(flag)
        return losses
