"""The shared trunk cache: reused while its key matches, rebuilt when it does not, and a rebuild gives
the very bytes a hit returns (so every arm and seed trains on the same states, whichever built them)."""
from __future__ import annotations

import pyarrow.parquet as pq
import torch


def _by_kind(root) -> dict[str, dict[int, tuple]]:
    """{kind: {key: (length, states bytes, rec_states bytes)}} of a cache directory."""
    out: dict[str, dict[int, tuple]] = {}
    for part in sorted(root.glob("kind=*")):
        t = pq.read_table(part, columns=["key", "length", "states", "rec_states"])
        out[part.name.removeprefix("kind=")] = {k: (n, s, r) for k, n, s, r in zip(
            t["key"].to_pylist(), t["length"].to_pylist(), t["states"].to_pylist(), t["rec_states"].to_pylist())}
    return out


def test_a_hit_is_bit_identical_to_a_rebuild_and_a_new_key_builds_anew(ray_cluster, tiny_cfg, tmp_path, monkeypatch):
    from karma_ray.cache import build

    first = build.ensure_cache(tiny_cfg, progress=False)  # the session's cache: built here or by an earlier test
    built = _by_kind(first.root)
    assert {"items", "train"} <= set(built) and any(k.startswith("eval_") for k in built)

    def no_build(*_a, **_k):
        raise AssertionError("a matching key must reuse the cache, not build it")

    with monkeypatch.context() as m:  # the same key: a hit, nothing computed
        m.setattr(build, "_build", no_build)
        hit = build.ensure_cache(tiny_cfg, progress=False)
    assert hit.root == first.root

    rebuilt = build.ensure_cache(tiny_cfg.with_overrides([f"data.cache_dir={tmp_path}"]), progress=False)
    assert rebuilt.root.name == first.root.name and _by_kind(rebuilt.root) == built  # a recompute: the same bytes

    other = build.ensure_cache(tiny_cfg.with_overrides(["data.history_items=2"]), progress=False)  # a prompt setting
    assert other.root != first.root and other.key["prompt"]["history_items"] == 2
    assert _by_kind(other.root)["train"] != built["train"]


def test_cached_states_are_the_trunk_of_each_row(ray_cluster, tiny_cfg):
    """Each cached row is what the frozen trunk computes for that row alone (to float rounding: the build
    runs rows in padded, length-sorted chunks)."""
    from karma_ray.cache.build import ensure_cache
    from karma_ray.cache.store import from_bytes
    from karma_ray.data.catalog import ItemCatalog
    from karma_ray.data.prompts import PromptBuilder
    from karma_ray.data.events import load_items
    from karma_ray.models.karma import build_model

    cache = ensure_cache(tiny_cfg, progress=False)
    model, tok = build_model(tiny_cfg.model, tiny_cfg.loss)
    builder = PromptBuilder(tok, ItemCatalog(load_items(tiny_cfg.data_dir, tiny_cfg.model.image_dim)), tiny_cfg.data,
                            tiny_cfg.model.image_dim)
    items = _by_kind(cache.root)["items"]
    keys = sorted(items)[:6]
    arr = builder.items_batch(keys)
    for i, key in enumerate(keys):
        n, blob, _ = items[key]
        assert n == int(arr["mask"][i].sum())
        alone = model.trunk(torch.from_numpy(arr["ids"][i:i + 1, :n]), torch.from_numpy(arr["mask"][i:i + 1, :n]))[0]
        stored = from_bytes(blob, n, cache.dtype)
        torch.testing.assert_close(stored, alone, rtol=1e-4, atol=1e-5)


def test_train_rows_are_the_first_rows_by_key(ray_cluster, tiny_cfg):
    """train_rows(n) reads only the row groups it needs and gives the n lowest keys, in key order."""
    from karma_ray.cache.build import ensure_cache

    cache = ensure_cache(tiny_cfg, progress=False)
    everything = pq.read_table(cache.root / "kind=train").sort_by("key")
    first = cache.train_rows(5)
    assert first["key"].to_pylist() == list(range(5))
    assert first.equals(everything.slice(0, 5).select(first.column_names))



def test_a_cache_of_some_evaluation_splits_holds_only_those_and_names_what_is_missing(ray_cluster, tiny_cfg, tmp_path):
    """data.cache_eval_splits leaves prompts out of the cache (the demo caches only what export scores); the
    key names the splits only when some are left out, so a cache of all four keeps its key."""
    import json

    import pytest

    from karma_ray.cache.build import _inputs, cache_location, ensure_cache
    from karma_ray.cache.store import TrunkCache

    full = ensure_cache(tiny_cfg, progress=False)
    assert "splits" not in full.key["eval"] and set(full.eval_splits) == {"valid", "test", "valid_cold", "test_cold"}
    cfg = tiny_cfg.with_overrides(["data.cache_eval_splits=test,test_cold"])
    key, root = cache_location(cfg)
    assert root.name != full.root.name and key["eval"]["splits"] == ["test", "test_cold"]
    kinds = set(_inputs(cfg, cfg.data_dir)["kind"].to_pylist())  # the rows a build would run through the trunk
    assert kinds == {"items", "train", "eval_test", "eval_test_cold"}
    (tmp_path / "key.json").write_text(json.dumps(key))
    with pytest.raises(ValueError, match="holds no 'valid' prompts.*data.cache_eval_splits"):
        TrunkCache(tmp_path).eval_split("valid")
    with pytest.raises(ValueError, match="add valid to data.cache_eval_splits"):
        cfg.with_overrides(["train.valid_every=2"])


def test_cached_interests_of_some_events_are_those_events_rows(ray_cluster, tiny_cfg):
    """CachedInputs.interests(events=…) (export's sample for the manifest) yields exactly those events' cached
    prompts, in the order given, as the full split would for the same positions."""
    import numpy as np
    import torch

    from karma_ray.cache.build import ensure_cache
    from karma_ray.models.inference import CachedInputs

    cache = ensure_cache(tiny_cfg, progress=False)
    every = list(CachedInputs(cache, 1000).interests("test"))[0]
    n = len(every["pos"])
    events = np.array([n - 1, 0, n // 2])
    (some,) = list(CachedInputs(cache, 1000).interests("test", events=events))
    width = int(some["mask"].sum(1).max())
    torch.testing.assert_close(some["states"], every["states"][events, :width], rtol=0, atol=0)
    assert torch.equal(some["mask"], every["mask"][events, :width]) and torch.equal(some["pos"], every["pos"][events])
