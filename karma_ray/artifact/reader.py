"""Load an artifact version back (no unpickling): the full bundle, or only the part a replica uses."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from karma_ray.artifact.layout import INDEX_FILES, MANIFEST, MODEL_FILES, read_manifest, resolve, version
from karma_ray.config import KarmaConfig
from karma_ray.data.catalog import ItemCatalog
from karma_ray.data.prompts import PromptBuilder


@dataclass
class Artifact:
    path: Path
    manifest: dict[str, Any]
    config: KarmaConfig
    model: Any  # KarmaModel
    tokenizer: Any
    catalog: ItemCatalog
    item_emb: np.ndarray  # (N, emb), row i <-> catalog row i
    index: faiss.Index
    builder: PromptBuilder

    @property
    def version(self) -> str:
        return version(self.manifest, self.path)

    @property
    def items(self):
        return self.catalog.table


@dataclass
class Encoder:
    """What an interest-encoder replica needs: the model and the prompt builder, nothing of the index."""

    path: Path
    manifest: dict[str, Any]
    config: KarmaConfig
    model: Any
    builder: PromptBuilder

    @property
    def version(self) -> str:
        return version(self.manifest, self.path)


def load_encoder(path: str | Path, attn_implementation: str = "sdpa") -> Encoder:
    from karma_ray.models.karma import KarmaModel  # torch: only replicas that encode import it

    p = resolve(path, (MANIFEST, *MODEL_FILES, "items.parquet"))
    manifest = read_manifest(p)
    cfg = KarmaConfig.from_dict(manifest["config"])
    model, tok = KarmaModel.load(p, attn_implementation)
    builder = PromptBuilder(tok, ItemCatalog.read(p / "items.parquet"), cfg.data, cfg.model.image_dim)
    return Encoder(p, manifest, cfg, model, builder)


def load_index(path: str | Path) -> faiss.Index:
    return faiss.read_index(str(resolve(path, (MANIFEST, *INDEX_FILES)) / "index.faiss"))


def load_artifact(path: str | Path, attn_implementation: str = "sdpa") -> Artifact:
    enc = load_encoder(path, attn_implementation)
    item_emb = np.load(resolve(enc.path) / "item_emb.npy", allow_pickle=False)
    return Artifact(enc.path, enc.manifest, enc.config, enc.model, enc.builder.tok, enc.builder.catalog, item_emb,
                    load_index(enc.path), enc.builder)
