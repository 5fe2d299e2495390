"""KarmaModel losses on a tiny randomly initialised Llama (real HF model class, real tokenizer)."""
from __future__ import annotations

import dataclasses

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


def test_recon_gradients_reach_the_interest_encoder(model_and_builder):
    model, builder = model_and_builder
    model.zero_grad()
    model(batch_for(builder, ROWS))["rec"].backward()
    assert model.int_proj.weight.grad.abs().sum() > 0
    first_layer = model.lm.get_decoder().layers[0]
    assert first_layer.self_attn.q_proj.weight.grad.abs().sum() > 0  # through h into the shared LM
    assert model.item_proj.weight.grad is None or model.item_proj.weight.grad.abs().sum() == 0
    model.zero_grad()


@pytest.mark.parametrize("off", ["gen", "rec"])
def test_lambda_zero_removes_the_loss_and_its_inputs(model_and_builder, off):
    model, builder = model_and_builder
    loss_cfg = dataclasses.replace(CFG.loss, **{f"lambda_{off}": 0.0})
    ablated = KarmaModel(model.lm, CFG.model, loss_cfg, model.token_ids)
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
        a = model.eval().encode_interest(arr["int_ids"], arr["int_mask"], arr["int_pos"])
        b = loaded.encode_interest(arr["int_ids"], arr["int_mask"], arr["int_pos"])
    assert torch.allclose(a, b, atol=1e-5)
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))


def _bare_model(**loss) -> KarmaModel:
    m = KarmaModel.__new__(KarmaModel)
    torch.nn.Module.__init__(m)
    m.loss_cfg = LossConfig(**loss)
    m.log_inv_tau = torch.nn.Parameter(torch.tensor(0.0))  # scale 1: logits are plain cosines
    return m


def test_logq_correction_is_subtracted_from_every_candidate_logit():
    """pairwise, one row, one hard negative, no in-batch: loss = softplus((s⁻ − log q⁻) − (s⁺ − log q⁺))."""
    h = torch.tensor([[1.0, 0.0]])
    e_pos, e_neg = torch.tensor([[0.6, 0.8]]), torch.tensor([[[0.8, 0.6]]])
    pos_item, neg_item = torch.tensor([1]), torch.tensor([[2]])
    logq_pos, logq_neg = torch.tensor([-4.0]), torch.tensor([[-1.0]])  # the negative is the popular one
    m = _bare_model(in_batch_negatives=False)
    corrected, _ = m.action_loss(h, e_pos, e_neg, pos_item, neg_item, logq_pos, logq_neg)
    expected = torch.nn.functional.softplus(torch.tensor((0.8 + 1.0) - (0.6 + 4.0)))
    assert corrected.item() == pytest.approx(expected.item(), rel=1e-5)
    plain, _ = _bare_model(in_batch_negatives=False, logq_correction=False).action_loss(
        h, e_pos, e_neg, pos_item, neg_item, logq_pos, logq_neg)
    assert plain.item() == pytest.approx(torch.nn.functional.softplus(torch.tensor(0.8 - 0.6)).item(), rel=1e-5)


def test_training_batch_carries_log_click_shares_when_the_builder_has_them(model_and_builder):
    import numpy as np

    _, builder = model_and_builder
    builder.item_logq = np.log(np.full(len(builder.item_ids), 1.0 / len(builder.item_ids), np.float32))
    try:
        arrays = builder.training_batch(ROWS, False, False)
    finally:
        builder.item_logq = None
    assert arrays["pos_logq"].shape == (3,) and arrays["neg_logq"].shape == (3, CFG.data.max_negatives)
    assert np.allclose(arrays["pos_logq"], np.log(1 / 40))
