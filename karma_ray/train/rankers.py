"""Train the pre-ranker and the ranker on top of a KARMA artifact, evaluate them, save them into it.

Why a separate, single-process job: the rankers are small (≤ 1M parameters) and consume the frozen
encoder's h and e_i, so the expensive part is embedding the impression prompts once; that is
cached per unique (query, last-n history) prompt, because every impression of one request shares it.

  pre-ranker  trained on recall candidates of training clicks: softmax over the FAISS top-N
              (clicked target vs the other candidates), the situation it faces in serving.
  ranker      trained on impressions (shown items, clicked or not) with BCE on the label.
Reported on test data: recall HR@N, recall HR@K (recall order cut to K), pre-ranker HR@K (target in
recall top-N *and* kept in the pre-ranker's top K), ranker AUC/GAUC, and the AUC/GAUC of the raw
cosine h·e for reference.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from karma_ray.data.schema import EVENTS_SCHEMA, IMPRESSIONS_SCHEMA, read_table
from karma_ray.eval.ctr import auc, gauc
from karma_ray.eval.retrieval import exclude_and_cut
from karma_ray.artifact import storage
from karma_ray.artifact.layout import LATEST, locate, point_latest, staged_dir
from karma_ray.artifact.reader import Artifact, load_artifact
from karma_ray.models.inference import embed_interests
from karma_ray.models.rankers import (META_FILE, WEIGHTS_FILE, FeatureSpace, PreRanker, PreRankerConfig, Ranker,
                                      RankerConfig, save_rankers)

log = logging.getLogger(__name__)


@dataclass
class RankerTrainConfig:
    """Knobs of the ranker job; the defaults fit the `demo` preset in a few minutes on 2 CPU cores."""

    epochs: int = 5
    seed: int = 0
    recall_n: int = 200  # recall candidates handed to the pre-ranker
    prerank_k: int = 50  # candidates the pre-ranker keeps for the ranker
    prerank_batch: int = 64  # events per pre-ranker step (each with recall_n candidates)
    rank_batch: int = 256  # impressions per ranker step
    lr: float = 1e-3
    weight_decay: float = 1e-5
    max_train_prompts: int = 20_000  # cap on unique training prompts embedded (the slow part)
    embed_batch: int = 32
    torch_threads: int = 1  # intra-op threads while training the (small) rankers


# ---------------------------------------------------------------------------------------------
# interest embeddings, cached per unique prompt
# ---------------------------------------------------------------------------------------------


class InterestCache:
    """h per unique (query, last-n history) prompt: requests in one impression list share it."""

    def __init__(self, art: Artifact, batch_size: int = 32, show_progress: bool = True):
        self.art, self.batch_size, self.show_progress = art, batch_size, show_progress
        self.n_hist = art.config.data.history_items
        self._index: dict[tuple[str, tuple[int, ...]], int] = {}
        self._h = np.zeros((0, art.item_emb.shape[1]), np.float32)

    def _key(self, query: str | None, history: list[int]) -> tuple[str, tuple[int, ...]]:
        return (query or "", tuple(history[-self.n_hist:]) if self.n_hist else ())

    def lookup(self, queries: list[str], histories: list[list[int]], desc: str) -> np.ndarray:
        """(R,) index into `self.h` for each row, embedding prompts not seen before."""
        keys = [self._key(q, h) for q, h in zip(queries, histories)]
        new = list(dict.fromkeys(k for k in keys if k not in self._index))
        # Similar lengths in one batch: embed_interests cuts each batch to its longest prompt.
        new.sort(key=lambda k: (len(k[1]), len(k[0])))
        if new:
            if self.show_progress:
                log.info("%s: embedding %d unique prompts", desc, len(new))
            h = embed_interests(self.art.model, self.art.builder, [k[0] for k in new], [list(k[1]) for k in new],
                                self.batch_size, self.show_progress)
            base = len(self._h)
            self._index.update({k: base + i for i, k in enumerate(new)})
            self._h = np.concatenate([self._h, h])
        return np.fromiter((self._index[k] for k in keys), np.int64, len(keys))

    @property
    def h(self) -> np.ndarray:
        return self._h


# ---------------------------------------------------------------------------------------------
# data preparation
# ---------------------------------------------------------------------------------------------


def _sample_prompts(table: pa.Table, max_prompts: int, rng: np.random.Generator) -> pa.Table:
    """Keep every impression of a random subset of requests (user, ts) so embedding stays bounded."""
    users, ts = table.column("user_id").to_numpy(), table.column("ts").to_numpy()
    req = np.unique(np.stack([users, ts], 1), axis=0, return_inverse=True)[1].ravel()
    n_req = int(req.max()) + 1 if len(req) else 0
    if n_req <= max_prompts:
        return table
    keep = np.zeros(n_req, bool)
    keep[rng.choice(n_req, max_prompts, replace=False)] = True
    return table.filter(pa.array(keep[req]))


def _known_rows(table: pa.Table, features: FeatureSpace, col: str, name: str) -> tuple[pa.Table, np.ndarray]:
    rows = features.rows_of(table.column(col).to_numpy())
    if (rows < 0).any():
        log.warning("%s: dropping %d rows whose %s is not in the artifact's catalogue", name, int((rows < 0).sum()), col)
        table = table.filter(pa.array(rows >= 0))
        rows = rows[rows >= 0]
    return table, rows


def recall_candidates(art: Artifact, features: FeatureSpace, h: np.ndarray, histories: list[list[int]],
                      n: int) -> np.ndarray:
    """(E, n) item rows of the FAISS top-n after removing each user's history (-1 pads)."""
    depth = min(n + max((len(x) for x in histories), default=0), art.index.ntotal)
    scores, ids = art.index.search(np.ascontiguousarray(h, np.float32), depth)
    top, _ = exclude_and_cut(ids, scores, histories, n)
    return np.where(top >= 0, features.rows_of(top), -1)


def _chunked_item_features(features: FeatureSpace, rows: np.ndarray, H: np.ndarray, chunk: int = 512) -> np.ndarray:
    """item_features in chunks: the in-history test is (B, C, L), so bound B."""
    if not len(rows):
        return np.zeros((*rows.shape, features.n_item_features), np.float32)
    return np.concatenate([features.item_features(rows[s:s + chunk], H[s:s + chunk])
                           for s in range(0, len(rows), chunk)])


@dataclass
class CandidateSet:
    """Recall candidates of click events, with features precomputed once for all epochs."""

    h_idx: np.ndarray  # (E,) into the interest cache
    cand: np.ndarray  # (E, N) item rows, -1 pads
    item_f: np.ndarray  # (E, N, Fi)
    user_f: np.ndarray  # (E, Fu)
    target_pos: np.ndarray  # (E,) position of the target in cand, -1 when recall missed it


def build_candidates(art: Artifact, features: FeatureSpace, cache: InterestCache, queries: list[str],
                     histories: list[list[int]], targets: np.ndarray, n: int, desc: str) -> CandidateSet:
    h_idx = cache.lookup(queries, histories, desc)
    cand = recall_candidates(art, features, cache.h[h_idx], histories, n)
    H = features.history_matrix(features.history_rows_of(histories))
    hit = (cand == features.rows_of(targets)[:, None]) & (cand >= 0)  # -1 pads never match
    target_pos = np.where(hit.any(1), hit.argmax(1), -1)
    return CandidateSet(h_idx, cand, _chunked_item_features(features, cand, H), features.user_features(H), target_pos)


# ---------------------------------------------------------------------------------------------
# training loops
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(n: int):
    """Small models: extra intra-op threads only add sync cost (7x slower measured on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def _epochs(model: torch.nn.Module, n: int, batch: int, cfg: RankerTrainConfig, step: Callable[[np.ndarray], torch.Tensor],
            desc: str, show_progress: bool) -> list[float]:
    """Shuffled mini-batch Adam over n examples; returns the mean loss of each epoch."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    history: list[float] = []
    model.train()
    bar = tqdm(range(cfg.epochs), desc=desc, unit="epoch", disable=not show_progress)
    for _ in bar:
        perm, losses = rng.permutation(n), []
        for s in range(0, n, batch):
            loss = step(perm[s:s + batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        history.append(float(np.mean(losses)) if losses else float("nan"))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    model.eval()
    return history


def train_prerank(model: PreRanker, data: CandidateSet, h: np.ndarray, item_emb: np.ndarray, cfg: RankerTrainConfig,
                  show_progress: bool = True) -> list[float]:
    """Softmax over each click's recall candidates; events whose target recall missed are skipped."""
    keep = np.flatnonzero(data.target_pos >= 0)

    def step(idx: np.ndarray) -> torch.Tensor:
        ev = keep[idx]
        cand = data.cand[ev]
        logits = model(_t(h[data.h_idx[ev]]), _t(item_emb[np.maximum(cand, 0)]), _t(data.item_f[ev]),
                       _t(data.user_f[ev]))
        logits = logits.masked_fill(_t(cand < 0), float("-inf"))
        return F.cross_entropy(logits, _t(data.target_pos[ev]))

    return _epochs(model, len(keep), cfg.prerank_batch, cfg, step, "pre-ranker", show_progress)


@dataclass
class ImpressionSet:
    h_idx: np.ndarray  # (R,)
    rows: np.ndarray  # (R,) item rows
    item_f: np.ndarray  # (R, 1, Fi)
    user_f: np.ndarray  # (R, Fu)
    labels: np.ndarray  # (R,) float32
    user_ids: np.ndarray  # (R,)


def build_impressions(table: pa.Table, features: FeatureSpace, cache: InterestCache, desc: str) -> ImpressionSet:
    table, rows = _known_rows(table, features, "item_id", desc)
    histories = table.column("history").to_pylist()
    h_idx = cache.lookup(table.column("query").to_pylist(), histories, desc)
    H = features.history_matrix(features.history_rows_of(histories))
    return ImpressionSet(h_idx, rows, _chunked_item_features(features, rows[:, None], H), features.user_features(H),
                         table.column("label").to_numpy().astype(np.float32), table.column("user_id").to_numpy())


def train_rank(model: Ranker, data: ImpressionSet, h: np.ndarray, item_emb: np.ndarray, cfg: RankerTrainConfig,
               show_progress: bool = True) -> list[float]:
    def step(idx: np.ndarray) -> torch.Tensor:
        logits = model(_t(h[data.h_idx[idx]]), _t(item_emb[data.rows[idx]][:, None, :]), _t(data.item_f[idx]),
                       _t(data.user_f[idx]))[:, 0]
        return F.binary_cross_entropy_with_logits(logits, _t(data.labels[idx]))

    return _epochs(model, len(data.rows), cfg.rank_batch, cfg, step, "ranker", show_progress)


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _score(model: torch.nn.Module, h: np.ndarray, e: np.ndarray, item_f: np.ndarray, user_f: np.ndarray,
           chunk: int = 256) -> np.ndarray:
    model.eval()
    return np.concatenate([model(_t(h[s:s + chunk]), _t(e[s:s + chunk]), _t(item_f[s:s + chunk]),
                                 _t(user_f[s:s + chunk])).numpy() for s in range(0, len(h), chunk)])


def evaluate_prerank(model: PreRanker, data: CandidateSet, h: np.ndarray, item_emb: np.ndarray, k: int) -> dict[str, float]:
    """Recall HR@N, recall HR@k (recall order) and pre-ranker HR@k, all over the same test events."""
    n = data.cand.shape[1]
    hit = data.target_pos >= 0
    scores = _score(model, h[data.h_idx], item_emb[np.maximum(data.cand, 0)], data.item_f, data.user_f)
    scores = np.where(data.cand >= 0, scores, -np.inf)
    target_score = scores[np.arange(len(scores)), np.maximum(data.target_pos, 0)]
    # Rank of the target among the candidates; ties resolved against the target (conservative).
    rank = (scores >= target_score[:, None]).sum(1)
    return {f"recall_hr@{n}": float(hit.mean()), f"recall_hr@{k}": float((hit & (data.target_pos < k)).mean()),
            f"prerank_hr@{k}": float((hit & (rank <= k)).mean()), "n_test_events": int(len(hit))}


def evaluate_rank(model: Ranker, data: ImpressionSet, h: np.ndarray, item_emb: np.ndarray) -> dict[str, float]:
    hq = h[data.h_idx]
    e = item_emb[data.rows][:, None, :]
    scores = _score(model, hq, e, data.item_f, data.user_f)[:, 0]
    cosine = (hq * e[:, 0]).sum(1)
    return {"rank_auc": auc(data.labels, scores), "rank_gauc": gauc(data.user_ids, data.labels, scores),
            "cosine_auc": auc(data.labels, cosine), "cosine_gauc": gauc(data.user_ids, data.labels, cosine),
            "n_test_impressions": int(len(data.labels))}


# ---------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------


def _data_dir(art: Artifact, data_dir: str | Path | None) -> Path:
    path = Path(data_dir) if data_dir else Path(art.manifest.get("data", {}).get("path") or art.config.data.path)
    if not (path / "impressions" / "train.parquet").exists():
        raise FileNotFoundError(f"no impressions under {path}/impressions/; pass --data DIR (a prepared data dir)")
    return path


def _click_events(table: pa.Table) -> tuple[list[str], list[list[int]], np.ndarray]:
    clicks = table.filter(pc.equal(table.column("label"), 1))
    return clicks.column("query").to_pylist(), clicks.column("history").to_pylist(), clicks.column("item_id").to_numpy()


def train_rankers(artifact_dir: str | Path, *, data_dir: str | Path | None = None, epochs: int = 5, seed: int = 0,
                  show_progress: bool = True, config: RankerTrainConfig | None = None) -> dict[str, Any]:
    """Train and evaluate both rankers on `artifact_dir` and save them into a NEW artifact version
    beside it (`<run>-rankers-<time>`): a version a replica may have loaded is never changed.
    Returns {"artifact": the new version's dir, "source": artifact_dir, "rankers": metrics}."""
    cfg = config or RankerTrainConfig(epochs=epochs, seed=seed)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    art = load_artifact(artifact_dir)
    data = _data_dir(art, data_dir)
    train_imp = read_table(data / "impressions" / "train.parquet", IMPRESSIONS_SCHEMA, "train impressions")
    test_imp = read_table(data / "impressions" / "test.parquet", IMPRESSIONS_SCHEMA, "test impressions")
    test_events = read_table(data / "test.parquet", EVENTS_SCHEMA, "test events")
    features = FeatureSpace.from_tables(art.items, train_imp)  # popularity from all training clicks
    train_imp = _sample_prompts(train_imp, cfg.max_train_prompts, np.random.default_rng(cfg.seed))
    cache = InterestCache(art, cfg.embed_batch, show_progress)
    emb = np.ascontiguousarray(art.item_emb, np.float32)

    # Embed every prompt first, so the training loops below are pure small-model work.
    q, hist, tgt = _click_events(train_imp)
    train_cand = build_candidates(art, features, cache, q, hist, tgt, cfg.recall_n, "train clicks")
    train_set = build_impressions(train_imp, features, cache, "train impressions")
    test_cand = build_candidates(art, features, cache, test_events.column("query").to_pylist(),
                                 test_events.column("history").to_pylist(), test_events.column("target").to_numpy(),
                                 cfg.recall_n, "test events")
    test_set = build_impressions(test_imp, features, cache, "test impressions")
    embed_s = time.perf_counter() - start

    dim = emb.shape[1]
    prerank = PreRanker(PreRankerConfig(emb_dim=dim))
    rank = Ranker(RankerConfig(emb_dim=dim, n_categories=features.n_categories))
    with _torch_threads(cfg.torch_threads):
        pre_loss = train_prerank(prerank, train_cand, cache.h, emb, cfg, show_progress)
        rank_loss = train_rank(rank, train_set, cache.h, emb, cfg, show_progress)
        metrics: dict[str, Any] = {**evaluate_prerank(prerank, test_cand, cache.h, emb, cfg.prerank_k),
                                   **evaluate_rank(rank, test_set, cache.h, emb)}
    metrics.update({
        "prerank_train_loss": pre_loss, "rank_train_loss": rank_loss,
        "n_train_clicks": int(len(train_cand.h_idx)), "n_train_clicks_in_recall": int((train_cand.target_pos >= 0).sum()),
        "n_train_impressions": int(len(train_set.rows)), "n_prompts_embedded": int(len(cache.h)),
        "embed_seconds": round(embed_s, 1), "seconds": round(time.perf_counter() - start, 1),
        "epochs": cfg.epochs, "seed": cfg.seed, "recall_n": cfg.recall_n, "prerank_k": cfg.prerank_k,
        "data": str(data.resolve()),
    })
    source = locate(artifact_dir)  # the version's own location (an S3 version is read from a local copy)
    name = f"{storage.name(source)}-rankers-{time.strftime('%Y%m%d-%H%M%S')}"
    meta = {"artifact_version": name, "trained_on": art.version, "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "train_config": asdict(cfg), "metrics": metrics}

    def write(new_dir: Path) -> None:
        save_rankers(new_dir, prerank, rank, features, meta)
        _set_manifest(new_dir, name, art.version, metrics)

    out = new_version(art.path, name, write, skip=(META_FILE, WEIGHTS_FILE, "manifest.json"),
                      parent=storage.parent(source))
    latest = storage.join(storage.parent(source), LATEST)
    if storage.exists(latest) and locate(latest) == source:
        point_latest(storage.parent(source), out)  # `latest` keeps meaning the newest version
    return {"artifact": str(out), "source": source, "rankers": metrics}


def new_version(src: Path, name: str, write: Callable[[Path], None], skip: tuple[str, ...] = (),
                parent: str | Path | None = None) -> str | Path:
    """A new artifact version `<parent>/name` (default: beside `src`; or an s3:// prefix): every file of the
    local version `src` hard-linked (versions are never modified, so sharing their bytes is safe; copied
    where links are impossible), except `skip`, plus what `write(dir)` adds; staged and published by
    `artifact.layout.staged_dir` (renamed into place, or uploaded with the manifest last)."""
    out = storage.join(parent, name) if parent is not None and storage.is_remote(parent) else Path(parent or src.parent) / name
    with staged_dir(out) as tmp:
        for f in sorted(src.rglob("*")):
            rel = f.relative_to(src)
            if f.is_dir() or str(rel) in skip:
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, tmp / rel)
            except OSError:
                shutil.copy2(f, tmp / rel)
        shutil.copy2(src / "manifest.json", tmp / "manifest.json")  # a copy: it is rewritten below
        write(tmp)
    return out


def _set_manifest(art_dir: Path, name: str, parent: str, metrics: dict[str, Any]) -> None:
    """The new version's manifest: its own run_name, the version it derives from, the ranker metrics."""
    path = art_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(run_name=name, parent_version=parent,
                    rankers={k: v for k, v in metrics.items() if not k.endswith("_train_loss")})
    if "files" in manifest:
        manifest["files"] = sorted(str(p.relative_to(art_dir)) for p in art_dir.rglob("*")
                                   if p.is_file() and p.name != "manifest.json")
    path.write_text(json.dumps(manifest, indent=2))


def summary_line(metrics: dict[str, Any]) -> str:
    n, k = metrics["recall_n"], metrics["prerank_k"]
    return (f"prerank HR@{k}={metrics[f'prerank_hr@{k}']:.4f} (recall HR@{n}={metrics[f'recall_hr@{n}']:.4f}, "
            f"recall-order HR@{k}={metrics[f'recall_hr@{k}']:.4f}) | rank AUC={metrics['rank_auc']:.4f} "
            f"GAUC={metrics['rank_gauc']:.4f} (cosine h·e AUC={metrics['cosine_auc']:.4f} "
            f"GAUC={metrics['cosine_gauc']:.4f})")
