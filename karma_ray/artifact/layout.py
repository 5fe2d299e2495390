"""The artifact directory: its file list, how to find one, how to write one safely (torch-free).

artifacts/<run>/
  manifest.json        config, data hash, metrics, versions, created_at, file list (written last)
  encoder/             tokenizer, plus the LM weights that training changed (see karma_ray.models.karma)
  heads.safetensors    W_e, W_h, P(·), image heads, temperature
  karma_model.json     model/loss config + special-token ids (what `KarmaModel.load` needs)
  items.parquet        the item catalogue, sorted by item_id
  item_emb.npy         (N, emb) float32; row i <-> items.parquet row i
  index.faiss          inner-product index whose ids are item ids
artifacts/latest -> <run>

Everything is safetensors / numpy (allow_pickle=False) / parquet / FAISS / JSON: loading never
unpickles. A version directory is written under a hidden temporary name and renamed into place, so
a reader never sees a half-written artifact and a live version is never overwritten.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

MANIFEST = "manifest.json"
MODEL_FILES = ("encoder/config.json", "encoder/lm.safetensors", "heads.safetensors", "karma_model.json")
CATALOG_FILES = ("items.parquet", "item_emb.npy")
INDEX_FILES = ("index.faiss",)
REQUIRED_FILES = (MANIFEST, *MODEL_FILES, *CATALOG_FILES, *INDEX_FILES)
LATEST = "latest"


def resolve(path: str | Path, files: tuple[str, ...] = REQUIRED_FILES) -> Path:
    """Follow `latest` to one version directory and check that `files` are there, naming what is missing.

    Serving stages pass only the files they read, so a lean replica checks only what it loads.
    """
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise FileNotFoundError(f"artifact {path} does not exist; run `python jobs/train.py` first "
                                "or point KARMA_ARTIFACT / the serve YAML's args.artifact at one")
    missing = [f for f in files if not (p / f).exists()]
    if missing:
        raise FileNotFoundError(f"artifact {p} is incomplete, missing: {', '.join(missing)}")
    return p


def read_manifest(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / MANIFEST).read_text())


def version(manifest: dict[str, Any], path: str | Path) -> str:
    """The model version every response and metric carries: the run name, else the directory name."""
    return str(manifest.get("run_name") or Path(path).name)


def json_default(obj: Any) -> Any:
    """json.dumps fallback for numpy scalars/arrays and paths (everything else becomes its str)."""
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def write_json_atomic(path: str | Path, doc: Any) -> Path:
    """Write JSON to a temporary file beside `path`, then rename: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2, default=json_default)
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary directory beside `final`; rename it to `final` when the block succeeds.

    `final` must not exist yet: a version that a replica may have mapped is never overwritten.
    """
    final = Path(final)
    if final.exists():
        raise FileExistsError(f"{final} already exists; artifact versions are immutable, write a new one")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def point_latest(artifacts_dir: str | Path, run_dir: str | Path) -> Path:
    """Atomically repoint artifacts/latest at run_dir (a relative symlink, so the tree can move)."""
    artifacts_dir, run_dir = Path(artifacts_dir), Path(run_dir)
    link = artifacts_dir / LATEST
    tmp = artifacts_dir / f".{LATEST}-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)
    return link
