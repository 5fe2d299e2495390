"""The ranker job end to end on a tiny artifact trained with real Ray Train (session Ray fixture)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from karma_ray.models.rankers import load_rankers

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def rankers_artifact(tiny_artifact, tmp_path_factory) -> Path:
    """A copy of the session's trained artifact in an artifacts dir of its own, so the session's `latest`
    link and versions are untouched (a copy, not a second training run: the rankers only read it)."""
    from karma_ray.artifact.layout import point_latest

    dst = tmp_path_factory.mktemp("rankers") / "artifacts" / tiny_artifact.name
    shutil.copytree(tiny_artifact, dst, symlinks=True)
    point_latest(dst.parent, dst)  # as its export did: `latest` moves on only from the version it names
    return dst


def test_train_rankers_reports_saves_into_a_new_version_and_reloads(rankers_artifact):
    from karma_ray.train.rankers import RankerTrainConfig, train_rankers

    before = json.loads((rankers_artifact / "manifest.json").read_text())
    files_before = {p.name: p.stat().st_mtime_ns for p in rankers_artifact.iterdir()}
    cfg = RankerTrainConfig(epochs=1, recall_n=50, prerank_k=10)  # 200 items: keep recall non-trivial
    out = train_rankers(rankers_artifact, show_progress=False, config=cfg)
    m = out["rankers"]
    new = Path(out["artifact"])

    for key in ("recall_hr@50", "recall_hr@10", "prerank_hr@10", "rank_auc", "rank_gauc"):
        assert 0.0 <= m[key] <= 1.0 and math.isfinite(m[key]), key
    assert m["prerank_hr@10"] <= m["recall_hr@50"]  # the pre-ranker only reorders recall's candidates
    assert m["n_test_events"] > 0 and m["n_test_impressions"] > 0 and m["n_train_impressions"] > 0

    # the source version is untouched: a replica may have it loaded
    assert json.loads((rankers_artifact / "manifest.json").read_text()) == before
    assert {p.name: p.stat().st_mtime_ns for p in rankers_artifact.iterdir()} == files_before
    assert load_rankers(rankers_artifact) is None
    after = json.loads((new / "manifest.json").read_text())
    assert new.parent == rankers_artifact.parent and new != rankers_artifact
    assert after["run_name"] == new.name and after["parent_version"] == before["run_name"]
    assert after["rankers"]["rank_auc"] == m["rank_auc"]
    changed = ("rankers", "run_name", "parent_version", "files")
    assert {k: v for k, v in after.items() if k not in changed} == {k: v for k, v in before.items() if k not in changed}
    assert set(after["files"]) == set(before["files"]) | {"rankers.json", "rankers.safetensors"}
    assert (rankers_artifact.parent / "latest").resolve() == new.resolve()

    bundle = load_rankers(new)
    assert bundle is not None and bundle.meta["metrics"]["rank_auc"] == m["rank_auc"]
    emb = np.load(new / "item_emb.npy")
    rows = np.arange(20)
    s = bundle.rank_scores(emb[0], emb[rows], rows, [1, 2, 3])
    assert s.shape == (20,) and np.isfinite(s).all()
