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

On S3 (`s3://bucket/prefix`, see `karma_ray.artifact.storage`) the version is staged locally, then
uploaded under `<prefix>/<run>/` with manifest.json last, and `<prefix>/latest` is then a small object
holding the run name. A version whose manifest is missing is incomplete. A reader follows `latest`
(`locate`), and `resolve` gives it a local copy of the version, downloaded once per node.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from karma_ray.artifact import storage

MANIFEST = "manifest.json"
MODEL_FILES = ("encoder/config.json", "encoder/lm.safetensors", "heads.safetensors", "karma_model.json")
CATALOG_FILES = ("items.parquet", "item_emb.npy")
INDEX_FILES = ("index.faiss",)
REQUIRED_FILES = (MANIFEST, *MODEL_FILES, *CATALOG_FILES, *INDEX_FILES)
LATEST = "latest"


def locate(path: str | Path, files: tuple[str, ...] = (MANIFEST,)) -> str:
    """The one spelling of the version `path` names, `latest` followed, after checking that `files` are there:
    an absolute local path, or an s3:// URI. Downloads nothing (the Serve app is built with this, and every
    replica then fetches the version on its own node)."""
    if not storage.is_remote(path):
        return str(_resolve_local(path, files))
    uri = str(path).rstrip("/")
    kind = storage.file_type(uri)
    if kind == "file":  # a pointer object such as <prefix>/latest
        uri = storage.join(storage.parent(uri), storage.read_text(uri).strip())
        kind = storage.file_type(uri)
    if kind == "missing":
        raise FileNotFoundError(f"artifact {path} does not exist; run `python jobs/train.py --artifacts-dir "
                                f"{storage.parent(uri)}` first or point KARMA_ARTIFACT / the serve YAML's args.artifact at one")
    listed = set(_remote_manifest(uri)[1].get("files", ())) | {MANIFEST}
    missing = [f for f in files if f not in listed and not storage.exists(storage.join(uri, f))]
    if missing:
        raise FileNotFoundError(f"artifact {uri} is incomplete, missing: {', '.join(missing)}")
    return uri


def resolve(path: str | Path, files: tuple[str, ...] = REQUIRED_FILES) -> Path:
    """Follow `latest` to one version directory and check that `files` are there, naming what is missing.

    Serving stages pass only the files they read, so a lean replica checks only what it loads. An s3://
    version is copied whole to this node's cache first (once per node and version), then read locally.
    """
    if not storage.is_remote(path):
        return _resolve_local(path, files)
    uri = locate(path, files)
    raw, manifest = _remote_manifest(uri)
    local = storage.local_copy(uri, [MANIFEST, *manifest.get("files", ())], hashlib.sha256(raw).hexdigest()[:12])
    return _resolve_local(local, files)


def _remote_manifest(uri: str) -> tuple[bytes, dict[str, Any]]:
    try:
        raw = storage.read_bytes(storage.join(uri, MANIFEST))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"artifact {uri} is incomplete, missing: {MANIFEST} (an upload that did not finish)") from e
    return raw, json.loads(raw)


def _resolve_local(path: str | Path, files: tuple[str, ...]) -> Path:
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise FileNotFoundError(f"artifact {path} does not exist; run `python jobs/train.py` first "
                                "or point KARMA_ARTIFACT / the serve YAML's args.artifact at one")
    missing = [f for f in files if not (p / f).exists()]
    if missing:
        raise FileNotFoundError(f"artifact {p} is incomplete, missing: {', '.join(missing)}")
    return p


def canonical(path: str | Path) -> str:
    """How an artifact is keyed without touching storage: a local path absolute with symlinks followed,
    a URI as given (without a trailing slash)."""
    return str(path).rstrip("/") if storage.is_remote(path) else str(Path(path).expanduser().resolve())


def read_manifest(path: str | Path) -> dict[str, Any]:
    return json.loads(storage.read_text(storage.join(path, MANIFEST)))


def version(manifest: dict[str, Any], path: str | Path) -> str:
    """The model version every response and metric carries: the run name, else the directory name."""
    return str(manifest.get("run_name") or storage.name(path))


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
    """Yield a hidden temporary directory; publish it as `final` when the block succeeds.

    Local: the directory sits beside `final` and is renamed to it. S3: it is a local temporary directory,
    uploaded under the prefix `final` with manifest.json last. `final` must not exist yet: a version that
    a replica may have mapped is never overwritten.
    """
    if storage.is_remote(final):
        storage.filesystem(str(final))  # scheme, credentials and bucket are checked before any work
        if storage.exists(final):
            raise FileExistsError(f"{final} already exists; artifact versions are immutable, write a new one")
        with tempfile.TemporaryDirectory(prefix=f".{storage.name(final)}.") as tmp:
            yield Path(tmp)
            storage.upload_dir(Path(tmp), str(final), last=(MANIFEST,))
        return
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


def point_latest(artifacts_dir: str | Path, run_dir: str | Path) -> str | Path:
    """Repoint `latest` at run_dir atomically: a relative symlink locally (so the tree can move), an object
    holding the run name on S3 (one PUT, written after the version's manifest)."""
    if storage.is_remote(artifacts_dir):
        link = storage.join(artifacts_dir, LATEST)
        storage.write_text(link, storage.name(run_dir) + "\n")
        return link
    artifacts_dir, run_dir = Path(artifacts_dir), Path(run_dir)
    link = artifacts_dir / LATEST
    tmp = artifacts_dir / f".{LATEST}-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)
    return link
