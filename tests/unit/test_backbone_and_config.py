"""The real packaged SmolLM2 through the backbone loader; config presets and overrides; job CLIs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from karma_ray.config import PRESETS, ModelConfig, get_preset
from karma_ray.models.backbone import SPECIAL_TOKENS, load_backbone, smollm2_dir

REPO = Path(__file__).resolve().parents[2]


def test_real_smollm2_loads_from_the_package_whole_with_special_tokens():
    path = smollm2_dir()  # converts the GGUF once, then reuses the safetensors cache
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    lm, tok = load_backbone(ModelConfig(backbone="smollm2-135m"))
    assert lm.config.hidden_size == 576 and len(lm.get_decoder().layers) == 30  # never cut
    ids = tok.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert len(set(ids)) == 3 and all(i >= 49152 for i in ids)
    assert lm.get_input_embeddings().num_embeddings >= len(tok)
    emb = lm.get_input_embeddings().weight
    assert torch.equal(emb[ids[0]], emb[ids[1]])  # new rows are the mean of the old ones: no seed in the cache key
    batch = tok(["Toy Story (1995) | Animation [ITEM]"], return_tensors="pt")
    with torch.no_grad():
        out = lm(**batch)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid_and_round_trips(name):
    cfg = get_preset(name)
    assert cfg.preset == name
    assert type(cfg).from_dict(cfg.to_dict()) == cfg


def test_gpu_preset_uses_bf16_nccl_and_full_fine_tuning():
    cfg = get_preset("gpu")
    assert cfg.train.use_gpu and cfg.train.precision == "bf16" and cfg.train.num_workers > 1
    assert cfg.model.trainable_layers == 0
    for name in ("demo", "ml100k"):  # CPU presets: every layer kept, the top few trained over a cached trunk
        assert get_preset(name).model.trainable_layers > 0


def test_overrides_parse_json_and_validate():
    cfg = get_preset("demo").with_overrides(["train.max_steps=7", "loss.act=infonce", "eval.protocol=standard"])
    assert cfg.train.max_steps == 7 and cfg.loss.act == "infonce" and cfg.data_dir.name == "standard"
    with pytest.raises(ValueError, match="unknown field"):
        get_preset("demo").with_overrides(["train.nope=1"])
    with pytest.raises(ValueError, match="section.field=value"):
        get_preset("demo").with_overrides(["max_steps=1"])
    with pytest.raises(ValueError, match="loss.act"):
        get_preset("demo").with_overrides(["loss.act=hinge"])
    with pytest.raises(ValueError, match="trunk_dtype"):
        get_preset("demo").with_overrides(["model.trunk_dtype=int8"])


def test_train_job_help_and_print_config():
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--preset" in out.stdout and "--set" in out.stdout
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--preset", "ml100k", "--max-steps", "3",
                          "--print-config"], capture_output=True, text=True)
    assert out.returncode == 0 and '"max_steps": 3' in out.stdout and '"dataset": "movielens"' in out.stdout
