"""KarmaModel losses on tiny randomly initialised Llama / Gemma-3 models (real HF classes, real tokenizer)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
import torch

from karma_ray.config import LossConfig, get_preset
from karma_ray.data.prompts import PromptBuilder, UnknownItemError
from karma_ray.models.karma import KarmaModel, build_model

CFG = get_preset("tiny")
ITEMS = pa.table({
    "item_id": pa.array(range(1, 41), pa.int64()),
    "title": [f"product {i} {'red' if i % 2 else 'blue'} lamp" for i in range(1, 41)],
    "category": ["Home > Lighting" if i < 20 else "Garden > Tools" for i in range(1, 41)],
    "attributes": [f"brand=b{i % 5}" for i in range(1, 41)],
})
ROWS = {"query": ["red lamp", "", "garden tool"], "history": [[1, 2, 3], [4], [21, 22]],
        "target": [5, 6, 23], "negatives": [[7, 8], [9], [24, 5]]}


@pytest.fixture(scope="module")
def model_and_builder():
    model, tok = build_model(CFG.model, CFG.loss)
    return model, PromptBuilder(tok, ITEMS, CFG.data)


def to_torch(arrays) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def batch_for(builder, rows, gen=True, rec=True):
    return to_torch(builder.training_batch(rows, gen, rec))


def test_forward_reports_each_loss_separately(model_and_builder):
    model, builder = model_and_builder
    out = model(batch_for(builder, ROWS))
    for key in ("loss", "act", "gen", "rec"):
        assert torch.isfinite(out[key]), key
    expected = out["act"] + CFG.loss.lambda_gen * out["gen"] + CFG.loss.lambda_rec * out["rec"]
    assert torch.allclose(out["loss"], expected)


def test_recon_is_a_bottleneck_history_only_reaches_it_through_h(model_and_builder):
    """With W_h zeroed, h = norm(bias) is the same for any history: L_recon must not move, L_gen must."""
    model, builder = model_and_builder
    other = dict(ROWS, history=[[30, 31, 32], [33, 34], [35]], query=["x", "y", "z"])
    with torch.no_grad():
        saved = model.int_proj.weight.clone()
        model.int_proj.weight.zero_()
        try:
            a, b = model(batch_for(builder, ROWS)), model(batch_for(builder, other))
        finally:
            model.int_proj.weight.copy_(saved)
    assert torch.allclose(a["rec"], b["rec"], atol=1e-6)
    assert not torch.allclose(a["gen"], b["gen"], atol=1e-4)


def test_deep_prefix_recon_has_no_path_to_the_history(model_and_builder):
    """P(h) enters at the first trainable layer: with h held fixed, no gradient of L_recon reaches the
    interest prompt's states, and the prompt's states cannot change L_recon."""
    model, builder = model_and_builder
    batch = batch_for(builder, ROWS)
    int_states = model.trunk(batch["int_ids"], batch["int_mask"]).float().requires_grad_(True)
    h = model.encode_interest(mask=batch["int_mask"], pos=batch["int_pos"], states=int_states)
    rec_states = model.trunk(batch["rec_ids"], batch["rec_mask"])
    loss = model.reconstruction_loss(h.detach(), rec_states, batch["rec_mask"], batch["rec_labels"])
    assert torch.autograd.grad(loss, int_states, allow_unused=True)[0] is None
    (g,) = torch.autograd.grad(model.reconstruction_loss(h, rec_states, batch["rec_mask"], batch["rec_labels"]), int_states)
    assert g.abs().sum() > 0  # ... while through h it does
    assert model.split == 1 and model._top.lo == 1  # the prefix sits at layer L - k, above the frozen trunk


def test_recon_gradients_reach_the_trainable_top_and_never_the_frozen_trunk(model_and_builder):
    model, builder = model_and_builder
    model.zero_grad()
    model(batch_for(builder, ROWS))["rec"].backward()
    assert model.int_proj.weight.grad.abs().sum() > 0
    layers = model.lm.get_decoder().layers
    assert layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0  # through h into the trainable top
    assert layers[0].self_attn.q_proj.weight.grad is None  # the frozen trunk gets no gradient at all
    assert model.lm.get_input_embeddings().weight.grad is None
    assert model.item_proj.weight.grad is None or model.item_proj.weight.grad.abs().sum() == 0
    model.zero_grad()


def test_frozen_parameters_stay_bit_identical_through_training_steps():
    """The embeddings (special-token rows included), the bottom layers and the tied LM head never move."""
    from karma_ray.train.loop import param_groups

    model, tok = build_model(CFG.model, CFG.loss)
    builder = PromptBuilder(tok, ITEMS, CFG.data)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("embed_tokens" in n for n in frozen) and any(".layers.0." in n for n in frozen)
    assert all(".layers.1." in n or not n.startswith("lm.") or n.endswith("model.norm.weight") for n in trained)
    opt = torch.optim.AdamW(param_groups(model, CFG), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(batch_for(builder, ROWS))["loss"].backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, trained[n]) for n, p in model.named_parameters() if n in trained)


def test_the_readout_learns_at_readout_lr_and_only_the_fresh_heads_at_head_lr():
    """W_e/W_h start as the frozen model's readout; at head_lr a few Adam steps would outweigh it."""
    from karma_ray.train.loop import param_groups

    model, _ = build_model(CFG.model, CFG.loss)
    cfg = CFG.with_overrides(["train.lr=1e-4", "train.readout_lr=3e-4", "train.head_lr=1e-3"])
    lr_of = {id(p): g["lr"] for g in param_groups(model, cfg) for p in g["params"]}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert id(p) not in lr_of, name
        elif name.startswith("lm."):
            assert lr_of[id(p)] == 1e-4, name
        elif name.startswith(("item_proj.", "int_proj.")):
            assert lr_of[id(p)] == 3e-4, name
        else:
            assert lr_of[id(p)] == 1e-3, name
    assert sum(1 for n, _ in model.named_parameters() if n.startswith("prefix.")) >= 2
    with pytest.raises(ValueError, match="readout_lr"):
        CFG.with_overrides(["train.readout_lr=0"])


def test_update_shares_split_adams_step_by_loss_and_leave_no_gradient():
    """Nothing before Adam has a second moment; after, the shares of each group sum to 1, and no .grad is
    left behind (the diagnostic must not leak into the next optimiser step)."""
    from contextlib import nullcontext

    from karma_ray.train.loop import param_groups, update_shares

    model, tok = build_model(CFG.model, CFG.loss)
    builder = PromptBuilder(tok, ITEMS, CFG.data)
    batch = batch_for(builder, ROWS)
    opt = torch.optim.AdamW(param_groups(model, CFG), lr=1e-3)
    assert update_shares(model, batch, opt, CFG, nullcontext()) == {}  # no second moment before the first step
    model(batch)["loss"].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    shares = update_shares(model, batch, opt, CFG, nullcontext())
    for group in ("lm", "readout", "heads"):
        total = sum(v for k, v in shares.items() if k.startswith(f"update_share_{group}_"))
        assert total == pytest.approx(1.0, abs=1e-5), group
        assert -1.0 <= shares[f"update_cos_{group}_act_gen"] <= 1.0
    assert all(p.grad is None for p in model.parameters())


def test_training_starts_from_the_frozen_readout():
    """init_readout: W = I and b = −W·mean, so h·e at step 0 is the centred cosine of the pooled states."""
    model, tok = build_model(CFG.model.__class__(**{**dataclasses.asdict(CFG.model), "emb_dim": 0}), CFG.loss)
    builder = PromptBuilder(tok, ITEMS, CFG.data)
    items = to_torch(builder.items_batch(list(range(1, 41))))
    prompts = to_torch(builder.interest_batch(ROWS["query"], ROWS["history"]))
    with torch.no_grad():
        item_x = model.item_pooled(items["ids"], items["mask"], items["pos"])
        int_x = model.interest_pooled(prompts["int_ids"], prompts["int_mask"], prompts["int_pos"])
        model.init_readout(item_x, int_x)
        e = model.encode_items(ids=items["ids"], mask=items["mask"], pos=items["pos"])
        h = model.encode_interest(ids=prompts["int_ids"], mask=prompts["int_mask"], pos=prompts["int_pos"])
    expect_e = torch.nn.functional.normalize(item_x - item_x.mean(0), dim=-1)
    expect_h = torch.nn.functional.normalize(int_x - int_x.mean(0), dim=-1)
    assert torch.allclose(e, expect_e, atol=1e-5) and torch.allclose(h, expect_h, atol=1e-5)


def test_tiny_gemma3_trains_through_the_same_code_with_bos():
    cfg = CFG.model.__class__(**{**dataclasses.asdict(CFG.model), "backbone": "tiny-gemma3"})
    model, tok = build_model(cfg, CFG.loss)
    tok.add_bos_token = True  # Gemma's tokenizer prepends BOS to plain text; SmolLM2's does not
    model.bos = tok.bos_token_id
    builder = PromptBuilder(tok, ITEMS, CFG.data)
    batch = batch_for(builder, ROWS)
    assert (batch["int_ids"][:, 0] == tok.bos_token_id).all() and (batch["rec_ids"][:, 0] == tok.bos_token_id).all()
    out = model(batch)
    assert all(torch.isfinite(out[k]) for k in ("act", "gen", "rec"))
    out["loss"].backward()
    assert model.lm.get_decoder().layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0
    seqs = model.decode_from_h(torch.nn.functional.normalize(torch.randn(2, model.item_proj.out_features), dim=-1),
                               torch.tensor(builder.decode_prefix), builder.eos_id, 3)
    assert len(seqs) == 2


def test_soft_states_start_at_the_residual_stream_scale_where_they_enter(model_and_builder):
    model, builder = model_and_builder
    batch = batch_for(builder, ROWS)
    states = model.trunk(batch["int_ids"], batch["int_mask"]).float()[:, 1:]
    rms = states.pow(2).mean(-1).sqrt()[batch["int_mask"][:, 1:] > 0]
    assert 0.5 < float(model.soft_scale.detach()) / float(rms.median()) < 2.0
    p = model.soft_prefix(torch.nn.functional.normalize(torch.randn(2, model.item_proj.out_features), dim=-1))
    assert torch.allclose(p.pow(2).mean(-1).sqrt(), model.soft_scale.expand(2, p.shape[1]), rtol=1e-3)


@pytest.mark.parametrize("off", ["gen", "rec"])
def test_lambda_zero_removes_the_loss_and_its_inputs(model_and_builder, off):
    model, builder = model_and_builder
    loss_cfg = dataclasses.replace(CFG.loss, **{f"lambda_{off}": 0.0})
    ablated = KarmaModel(model.lm, CFG.model, loss_cfg, model.token_ids, model.bos)
    ablated.load_state_dict(model.state_dict())
    batch = batch_for(builder, ROWS, gen=off != "gen", rec=off != "rec")
    assert ("gen_labels" in batch) == (off != "gen") and ("rec_ids" in batch) == (off != "rec")
    out = ablated(batch)
    assert off not in out
    remaining = [k for k in ("gen", "rec") if k != off][0]
    weight = getattr(loss_cfg, f"lambda_{remaining}")
    assert torch.allclose(out["loss"], out["act"] + weight * out[remaining])


def test_in_batch_copy_of_the_target_is_not_a_negative(model_and_builder):
    model, _ = model_and_builder
    h = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    e_pos = h.clone()  # perfect positives
    e_neg = torch.nn.functional.normalize(torch.randn(2, 1, 8), dim=-1)
    same_target = torch.tensor([5, 5])  # both rows clicked item 5: row 1's positive is not row 0's negative
    loss_same, _ = model.action_loss(h, e_pos, e_neg, same_target, torch.tensor([[-1], [-1]]))
    assert loss_same.item() == pytest.approx(0.0)  # no valid negatives left at all
    loss_diff, _ = model.action_loss(h, e_pos, e_neg, torch.tensor([5, 6]), torch.tensor([[-1], [-1]]))
    assert loss_diff.item() > 0


def test_pairwise_and_infonce_agree_on_direction():
    h = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    neg = torch.nn.functional.normalize(torch.randn(4, 2, 8), dim=-1)
    pos_item, neg_item = torch.arange(4), torch.arange(10, 18).view(4, 2)
    for act in ("pairwise", "infonce"):
        m = KarmaModel.__new__(KarmaModel)
        torch.nn.Module.__init__(m)
        m.loss_cfg = LossConfig(act=act)
        m.log_inv_tau = torch.nn.Parameter(torch.tensor(2.0))
        good, acc_good = m.action_loss(h, h, neg, pos_item, neg_item)
        bad, _ = m.action_loss(h, -h, neg, pos_item, neg_item)
        assert good < bad and acc_good == 1.0


def test_unknown_history_ids_raise_a_precise_error(model_and_builder):
    _, builder = model_and_builder
    with pytest.raises(UnknownItemError, match="999"):
        builder.interest_batch(["q"], [[1, 999]])


def test_save_and_load_round_trip_without_pickle(model_and_builder, tmp_path):
    model, builder = model_and_builder
    model.save(tmp_path, builder.tok)
    loaded, _ = KarmaModel.load(tmp_path)
    arr = to_torch(builder.interest_batch(["red lamp"], [[1, 2]]))
    with torch.no_grad():
        a = model.eval().encode_interest(ids=arr["int_ids"], mask=arr["int_mask"], pos=arr["int_pos"])
        b = loaded.encode_interest(ids=arr["int_ids"], mask=arr["int_mask"], pos=arr["int_pos"])
    model.train()
    assert torch.allclose(a, b, atol=1e-5)
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))
    assert not any(".layers.0." in k for k in __import__("safetensors.torch").torch.load_file(
        str(tmp_path / "encoder" / "lm.safetensors")))  # the frozen trunk is not stored


def _bare_model(**loss) -> KarmaModel:
    m = KarmaModel.__new__(KarmaModel)
    torch.nn.Module.__init__(m)
    m.loss_cfg = LossConfig(**loss)
    m.log_inv_tau = torch.nn.Parameter(torch.tensor(0.0))  # scale 1: logits are plain cosines
    return m


def test_logq_correction_applies_to_in_batch_candidates_only():
    """Two rows, one hard negative each, cross-row hard negatives off. Row 0's in-batch pair (against row 1's
    click) is corrected on both sides; its hard-negative pair is not: hard negatives are not drawn by click share."""
    sp = torch.nn.functional.softplus
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    e_pos = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    e_neg = torch.tensor([[[0.8, 0.6]], [[0.6, 0.8]]])
    pos_item, neg_item = torch.tensor([1, 2]), torch.tensor([[3], [4]])
    logq = torch.tensor([-4.0, -1.0])  # row 1's click (item 2) is the popular one
    m = _bare_model(cross_row_hard_negatives=False)
    loss, _ = m.action_loss(h, e_pos, e_neg, pos_item, neg_item, logq)
    row0 = (sp(torch.tensor((0.8 + 1.0) - (0.6 + 4.0))) + sp(torch.tensor(0.8 - 0.6))) / 2
    row1 = (sp(torch.tensor((0.8 + 4.0) - (0.6 + 1.0))) + sp(torch.tensor(0.8 - 0.6))) / 2
    assert loss.item() == pytest.approx(((row0 + row1) / 2).item(), rel=1e-5)
    plain, _ = _bare_model(cross_row_hard_negatives=False, logq_correction=False).action_loss(
        h, e_pos, e_neg, pos_item, neg_item, logq)
    assert plain.item() == pytest.approx(sp(torch.tensor(0.8 - 0.6)).item(), rel=1e-5)


def test_other_rows_hard_negatives_are_a_switch():
    h = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    e_pos, e_neg = h.clone(), torch.nn.functional.normalize(torch.randn(3, 2, 4), dim=-1)
    pos_item, neg_item = torch.tensor([1, 2, 3]), torch.tensor([[4, 5], [6, 7], [8, 9]])
    with_cross, _ = _bare_model().action_loss(h, e_pos, e_neg, pos_item, neg_item)
    own_only, _ = _bare_model(cross_row_hard_negatives=False).action_loss(h, e_pos, e_neg, pos_item, neg_item)
    assert with_cross.item() != pytest.approx(own_only.item())


def test_training_batch_carries_log_click_shares_of_the_targets_only(model_and_builder):
    _, builder = model_and_builder
    builder.item_logq = np.log(np.full(len(builder.item_ids), 1.0 / len(builder.item_ids), np.float32))
    try:
        arrays = builder.training_batch(ROWS, False, False)
    finally:
        builder.item_logq = None
    assert arrays["pos_logq"].shape == (3,) and "neg_logq" not in arrays
    assert np.allclose(arrays["pos_logq"], np.log(1 / 40))


def test_trim_padding_gives_targets_and_negatives_one_width():
    """The item tower encodes targets and hard negatives in one concatenated pass: a batch whose negatives
    are longer than its targets must keep one common width (a cached ml100k run crashed on 19 vs 21)."""
    import torch

    from karma_ray.train.loop import trim_padding

    B, N, W, d = 2, 3, 8, 4
    pos_mask, neg_mask = torch.zeros(B, W, dtype=torch.bool), torch.zeros(B, N, W, dtype=torch.bool)
    pos_mask[:, :3], neg_mask[:, :, :5] = True, True
    int_mask = torch.zeros(B, W, dtype=torch.bool)
    int_mask[:, :2] = True
    out = trim_padding({"pos_mask": pos_mask, "neg_mask": neg_mask, "pos_states": torch.zeros(B, 5, d),
                        "int_mask": int_mask, "int_states": torch.zeros(B, W, d)})
    assert out["pos_mask"].shape == (B, 5) and out["neg_mask"].shape == (B, N, 5)
    assert out["int_mask"].shape == (B, 2) and out["int_states"].shape == (B, 2, d)
    assert torch.cat([out["pos_mask"], out["neg_mask"].reshape(B * N, -1)]).shape == (B + B * N, 5)


def test_fidelity_refit_moves_only_the_prefix_in_the_arms_training_precision(tiny_data):
    """The fair-fidelity probe refits P alone (every other weight and flag left as found), under bf16
    autocast when the arm trained in bf16: its first loss is the fp32 one to bf16 rounding, not equal."""

    from karma_ray.data.catalog import ItemCatalog
    from karma_ray.data.events import load_items
    from karma_ray.eval.fidelity import FidelityProbe

    first = {}
    for precision in ("fp32", "bf16"):
        cfg = CFG.with_overrides([f"data.path={tiny_data}", f"train.precision={precision}", "eval.fidelity_fit_steps=4"])
        torch.manual_seed(0)  # the same model in both precisions
        model, tok = build_model(cfg.model, cfg.loss)
        probe = FidelityProbe(PromptBuilder(tok, ItemCatalog(load_items(cfg.data_dir, 0)), cfg.data), cfg.data_dir, cfg,
                              cfg.eval, n_train=16, batch_size=8)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        losses = probe.refit(model)
        assert len(losses) == 4 and np.isfinite(losses).all()
        changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
        assert changed and all(k.startswith("prefix.") for k in changed), changed
        assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
        first[precision] = losses[0]
    assert first["bf16"] != first["fp32"] and first["bf16"] == pytest.approx(first["fp32"], rel=0.05)


def test_fidelity_information_is_zero_for_an_h_that_carries_nothing(tiny_data):
    """recon_gain_nats compares L_recon with each row's own h against h shuffled across rows: an h that is
    the same for every row explains nothing (exactly 0), and distinct rows' h give a finite figure. The
    ceiling refit (each row's target e_i instead of h) moves only P, like the h refit."""

    from karma_ray.data.catalog import ItemCatalog
    from karma_ray.data.events import load_items
    from karma_ray.eval.fidelity import FidelityProbe

    cfg = CFG.with_overrides([f"data.path={tiny_data}", "eval.fidelity_fit_steps=2"])
    torch.manual_seed(0)
    model, tok = build_model(cfg.model, cfg.loss)
    model.eval()
    catalog = ItemCatalog(load_items(cfg.data_dir, 0))
    probe = FidelityProbe(PromptBuilder(tok, catalog, cfg.data), cfg.data_dir, cfg, cfg.eval, n_train=8, batch_size=4)
    targets = catalog.ids[:6]
    same = np.repeat(np.random.default_rng(0).normal(size=(1, model.item_proj.out_features)), 6, 0).astype(np.float32)
    info = probe.information(model, same, targets)
    assert info["recon_gain_nats"] == 0.0 and info["recon_nats"] == info["recon_nats_shuffled_h"] > 0
    assert info["recon_gain_ci"] == [0.0, 0.0]
    e = probe.target_embeddings(model, targets)
    assert e.shape == (6, model.item_proj.out_features) and np.isfinite(probe.information(model, e, targets)["recon_gain_nats"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert len(probe.refit(model, condition="target_e")) == 2
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith("prefix.") for k in changed), changed


def test_per_row_reconstruction_nats_sum_to_the_mean_loss():
    """reconstruction_loss(per_row=True) gives each row's summed nats; over the batch they are the mean L_recon
    times the number of target tokens (what the fidelity probe's per-event bootstrap rests on)."""
    from karma_ray.data.prompts import IGNORE

    torch.manual_seed(0)
    model, _ = build_model(CFG.model, CFG.loss)
    model.eval()
    B, T, d = 3, 7, model.hidden_size
    states, mask = torch.randn(B, T, d), torch.ones(B, T, dtype=torch.long)
    labels = torch.randint(0, 100, (B, T))
    labels[:, :2] = IGNORE
    labels[0, 5:] = IGNORE  # rows of different lengths
    h = torch.nn.functional.normalize(torch.randn(B, model.item_proj.out_features), dim=-1)
    with torch.no_grad():
        mean = model.reconstruction_loss(h, states, mask, labels)
        rows = model.reconstruction_loss(h, states, mask, labels, per_row=True)
    assert rows.shape == (B,) and (rows > 0).all()
    assert rows.sum() / (labels != IGNORE).sum() == pytest.approx(float(mean), rel=1e-5)


def test_frozen_recon_decoder_is_the_untrained_backbone_and_only_h_can_lower_l_recon(tmp_path):
    """loss.recon_decoder=frozen: L_recon decodes through a frozen copy of the backbone's top layers. Its
    gradient reaches P and (through h) the trainable top, never the copy; after training steps that move the
    top, the copy still equals the backbone; the artifact holds no copy, and a reloaded model decodes alike."""
    from karma_ray.train.loop import param_groups

    loss_cfg = dataclasses.replace(CFG.loss, recon_decoder="frozen")
    model, tok = build_model(CFG.model, loss_cfg)
    builder = PromptBuilder(tok, ITEMS, CFG.data)
    top = model.lm.get_decoder().layers[1]
    anchor = {n: p.detach().clone() for n, p in model.anchor.named_parameters()}
    assert torch.equal(model.anchor["layers"][0].mlp.up_proj.weight, top.mlp.up_proj.weight)
    assert not any(n.startswith("anchor.") for n in model.trainable_names())

    model(batch_for(builder, ROWS))["rec"].backward()
    assert model.prefix[0].weight.grad.abs().sum() > 0 and model.int_proj.weight.grad.abs().sum() > 0
    assert top.self_attn.q_proj.weight.grad.abs().sum() > 0  # through h only
    assert all(p.grad is None for p in model.anchor.parameters())

    opt = torch.optim.AdamW(param_groups(model, CFG), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(batch_for(builder, ROWS))["loss"].backward()
        opt.step()
    assert not torch.equal(top.mlp.up_proj.weight, anchor["layers.0.mlp.up_proj.weight"])
    assert all(torch.equal(p, anchor[n]) for n, p in model.anchor.named_parameters())

    model.eval()
    model.save(tmp_path, tok)
    loaded, _ = KarmaModel.load(tmp_path)
    batch = batch_for(builder, ROWS)
    with torch.no_grad():
        assert torch.allclose(model(batch)["rec"], loaded(batch)["rec"], atol=1e-5)
    with pytest.raises(ValueError, match="recon_decoder"):
        dataclasses.replace(CFG, model=dataclasses.replace(CFG.model, trainable_layers=0), loss=loss_cfg)


def test_length_sorted_batches_embed_to_the_same_rows_in_input_order():
    """state_batches(by_length=True) runs the rows shortest first; embed puts them back, and each row's h is
    its event-order h (only the padding differs)."""
    from karma_ray.cache.store import to_bytes
    from karma_ray.models.inference import embed, state_batches

    torch.manual_seed(0)
    model, _ = build_model(CFG.model, CFG.loss)
    lengths = np.array([9, 3, 7, 3, 12, 5, 8])
    blobs = [to_bytes(torch.randn(int(n), model.hidden_size)) for n in lengths]
    pos = lengths - 1
    sorted_batches = list(state_batches(blobs, lengths, pos, "fp32", 3, by_length=True))
    assert [b["mask"].shape[1] for b in sorted_batches] == [5, 9, 12]  # 54 positions padded, against 71 in event order (9, 12, 8)
    in_order = embed(model, state_batches(blobs, lengths, pos, "fp32", 3), "interest")
    by_length = embed(model, iter(sorted_batches), "interest")
    assert np.allclose(in_order, by_length, atol=1e-5)


def test_eval_mode_runs_a_bf16_trunks_top_layers_in_bf16_and_train_mode_leaves_precision_to_the_caller():
    """Serving, evaluation and export (eval mode) run a bf16 trunk's top layers under bf16 autocast, as the
    bf16 presets train them; in train mode the caller's autocast decides, so an fp32 run stays fp32."""
    torch.manual_seed(0)
    model, _ = build_model(dataclasses.replace(CFG.model, trunk_dtype="bf16"), CFG.loss)
    states = torch.randn(3, 7, model.hidden_size).to(torch.bfloat16)  # (B, T, d) as the cache stores them
    mask = torch.ones(3, 7, dtype=torch.long)
    with torch.no_grad():
        model.train()
        fp32 = model.top(states, mask)  # (B, T, d)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model.top(states, mask)
        model.eval()
        served = model.top(states, mask)
    assert torch.equal(served, bf16) and not torch.equal(served, fp32)
    assert served.dtype == torch.float32 and torch.allclose(served, fp32, atol=0.05)  # the residual stream stays fp32
    fp32_model, _ = build_model(CFG.model, CFG.loss)  # the tiny preset's fp32 trunk: eval mode stays fp32
    fp32_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fp32_model.eval().top(states, mask), fp32)
