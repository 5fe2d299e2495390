"""Hot refresh: new or cold items, embedded from their text by the item tower, added to the live index
without a restart.

  python jobs/refresh_items.py --items new_items.parquet     # item_id, title, category, attributes

1. `embed_new_items`: the running InterestEncoder embeds the items' text (`InterestEncoder.embed_items`,
   the same item tower and prompt as export) with the model version the app serves.
2. `write_refresh`: (item_id, emb) go to one Parquet file, tagged with that version.
3. `refresh_config`: the file is appended to the `refresh` list in the user_config of every deployment
   that holds the index (`Recall`, or each `RecallShard`); deploying that config makes Serve call
   `reconfigure` on the live replicas, which add the items (`apply_refreshes`; a shard keeps only its
   ids). An id already in the index is replaced (a cold item re-embedded). A replica started later
   applies the same list, so every replica ends with the same index.

An HNSW index (`index.kind=hnsw`) cannot replace: FAISS HNSW cannot remove a node, so the old vector would
stay next to the new one and the id would be found twice. Every id a refresh takes is already in the
index (see scope), so `refresh` refuses an HNSW artifact up front (`IndexCannotReplace`, before anything is
embedded or deployed), and `add_items` refuses such a batch whole if it gets one. Rebuilding the shard instead
was rejected: it is the whole HNSW build (50 s per 100k items on one core here, benchmarks/results/
recall_scale.md), on every replica of the shard, inside `reconfigure` of a live replica; an export and a
rollout (`jobs/rollout.py`) does the same work off the serving path and embeds every item anyway.

Only indexes of the file's version take it: after a rollout, a new version's export embeds every item.
Scope: ids of the served artifact's catalogue (new text for an item, or a cold item re-embedded). The
ingress and rankers hold that catalogue (titles, features), so a brand-new id is refused here: it needs
an export and a rollout (`jobs/rollout.py`) until they take refreshes too.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

VERSION_KEY = b"karma_version"


def write_refresh(path: str | Path, item_ids: np.ndarray, emb: np.ndarray, version: str) -> Path:
    """(item_id int64, emb list<float32>) with the model version in the schema metadata."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    col = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
    table = pa.table({"item_id": np.asarray(item_ids, dtype=np.int64), "emb": col})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata({VERSION_KEY: version.encode()}), path)
    return path


def read_refresh(path: str | Path) -> tuple[np.ndarray, np.ndarray, str]:
    table = pq.read_table(path)
    ids = table.column("item_id").to_numpy().astype(np.int64)
    emb = table.column("emb").combine_chunks().flatten().to_numpy().astype(np.float32).reshape(len(ids), -1)
    return ids, emb, (table.schema.metadata or {}).get(VERSION_KEY, b"").decode()


def apply_refreshes(state, paths: list[str], mine: Callable[[np.ndarray], np.ndarray]) -> int:
    """Add every refresh file not yet applied to `state` (a RecallState) whose version matches; `mine(ids)`
    selects the ids this replica's index holds. Returns how many items were added."""
    from karma_ray.artifact.faiss_index import add_items

    added = 0
    for p in paths:
        if p in state.refreshed:
            continue
        ids, emb, version = read_refresh(p)
        if version == state.version:
            keep = mine(ids)
            add_items(state.index, emb[keep], ids[keep])
            added += int(keep.sum())
        state.refreshed.add(p)
    return added


def index_deployments(cfg: dict[str, Any], app: str) -> list[str]:
    """The deployments that hold the index in this config: RecallShard0…S-1, or Recall."""
    from karma_ray.serve.app import recall_shards, shard_names

    app_cfg = next(a for a in cfg["applications"] if a["name"] == app)
    shards = recall_shards(app_cfg.get("args"))
    return shard_names(shards) if shards > 1 else ["Recall"]


def refresh_config(cfg: dict[str, Any], path: str, app: str) -> dict[str, Any]:
    """`cfg` with `path` appended to the `refresh` list of every index-holding deployment."""
    from karma_ray.serve.rollout import _deployment

    out = copy.deepcopy(cfg)
    for name in index_deployments(out, app):
        uc = _deployment(out, name, app)["user_config"]
        uc["refresh"] = list(dict.fromkeys([*(uc.get("refresh") or []), str(path)]))
    return out


def check_known(items: pa.Table, artifact: str) -> None:
    """Raise unless every id is in the artifact's catalogue (see the module docstring: scope)."""
    from karma_ray.artifact.layout import resolve
    from karma_ray.data.catalog import ItemCatalog

    ids = items.column("item_id").to_numpy().astype(np.int64)
    catalog = ItemCatalog.read(resolve(artifact, ("items.parquet",)) / "items.parquet", columns=["item_id", "title"])
    unknown = ids[~catalog.known(ids)]
    if len(unknown):
        raise ValueError(f"{len(unknown)} ids are not in the served catalogue (first: {unknown[:5].tolist()}); "
                         "new items need an export and a rollout: the ingress and rankers hold the catalogue")


def check_index_kind(items: pa.Table, artifact: str) -> None:
    """Raise IndexCannotReplace if the artifact's index kind cannot replace the (catalogue) ids in `items`."""
    from karma_ray.artifact.faiss_index import check_replaceable
    from karma_ray.artifact.layout import read_manifest, resolve

    kind = ((read_manifest(resolve(artifact, ("manifest.json",))).get("config") or {}).get("index") or {}).get("kind", "flat")
    check_replaceable(kind, items.column("item_id").to_numpy())


def embed_new_items(items: pa.Table, artifact: str, app: str) -> tuple[np.ndarray, str]:
    """(N, d) item embeddings of `items` from the live app's encoder, and its version."""
    from ray import serve

    handle = serve.get_deployment_handle("InterestEncoder", app)
    return handle.embed_items.remote(artifact, items.to_pylist()).result(timeout_s=600)


def refresh(items: pa.Table, out_dir: str | Path, *, cfg: dict[str, Any], deploy: Callable[[dict[str, Any]], Any],
            app: str) -> dict[str, Any]:
    """Embed `items` with the live encoder, write the refresh file under `out_dir`, deploy the config that
    adds it. `out_dir` must be readable by every index replica (a shared path on a cluster)."""
    from karma_ray.serve.rollout import pinned_artifact

    artifact = pinned_artifact(cfg, app)
    check_known(items, artifact)
    check_index_kind(items, artifact)
    emb, version = embed_new_items(items, artifact, app)
    path = write_refresh(Path(out_dir).resolve() / f"refresh-{time.time_ns()}.parquet",
                         items.column("item_id").to_numpy(), emb, version)
    deploy(refresh_config(cfg, str(path), app))
    return {"file": str(path), "items": len(emb), "version": version,
            "deployments": index_deployments(cfg, app)}
