"""The collapse alarm's pieces: the probe batch, the reading on a real (tiny) model, the decision."""
from __future__ import annotations

import math

import torch

from karma_ray.config import get_preset
from karma_ray.models.karma import build_model
from karma_ray.train.loop import collapse_alarm, probe_batch, probe_collapse


def test_probe_batch_cuts_each_prompt_at_its_interest_token():
    ids = torch.arange(24).view(3, 8)
    mask = torch.ones(3, 8, dtype=torch.long)
    batch = {"int_ids": ids, "int_mask": mask, "int_pos": torch.tensor([5, 3, 2])}
    probe = probe_batch(batch, 2)
    assert probe["ids"].shape == (2, 6)  # width = max pos + 1 over the kept rows
    assert probe["mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]  # the L_gen target is not prompt


def test_probe_reading_on_a_tiny_model_is_a_rate_and_an_entropy():
    cfg = get_preset("tiny")
    model, _ = build_model(cfg.model, cfg.loss)
    model.train()
    probe = {"ids": torch.randint(0, 100, (4, 10)), "mask": torch.ones(4, 10, dtype=torch.long),
             "pos": torch.full((4,), 9)}
    reading = probe_collapse(model, probe)
    assert 0.0 <= reading["sink_rate"] <= 100.0 and 0.0 < reading["int_attn_entropy"] <= 1.0 + 1e-6
    assert model.training  # the probe restores the mode it found
    assert model.lm.config._attn_implementation == "sdpa"  # eager only for the probe call
    assert not math.isnan(reading["int_attn_entropy"])


def test_alarm_fires_past_the_ratio_of_the_frozen_rate_with_a_one_percent_floor():
    assert not collapse_alarm(sink_rate=60.0, frozen_rate=50.0, ratio=1.5)
    assert collapse_alarm(sink_rate=80.0, frozen_rate=50.0, ratio=1.5)
    assert not collapse_alarm(sink_rate=1.2, frozen_rate=0.0, ratio=1.5)  # floor: 1.5 × 1%
    assert collapse_alarm(sink_rate=2.0, frozen_rate=0.0, ratio=1.5)
