"""MovieLens loader and the synthetic generator: real files, real generation, no mocks."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from karma_ray.data import movielens
from karma_ray.data.movielens import load_movielens, ratings_to_clicks
from karma_ray.data.schema import ITEMS_SCHEMA, items_schema, validate_items
from karma_ray.data.schema import CLICKS_SCHEMA
from karma_ray.data.synthetic import SyntheticConfig, generate_synthetic


@pytest.fixture(scope="module")
def ml():
    return load_movielens()


@pytest.fixture(scope="module")
def syn():
    return generate_synthetic(SyntheticConfig(image_dim=16, seed=0))


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


# ---------------------------------------------------------------- MovieLens


def test_movielens_sizes_and_first_title(ml):
    items, ratings = ml
    assert items.schema.equals(ITEMS_SCHEMA)
    assert items.num_rows == 1682
    assert ratings.num_rows == 100_000
    assert pc.count_distinct(ratings["user_id"]).as_py() == 943
    first = items.filter(pc.equal(items["item_id"], 1)).to_pylist()[0]
    assert first == {"item_id": 1, "title": "Toy Story (1995)", "category": "Animation, Children's, Comedy",
                     "attributes": ""}  # fmt: skip  (the year once, in the title)
    kolya = items.filter(pc.equal(items["item_id"], 242)).to_pylist()[0]["title"]
    assert kolya == "Kolya (1996)"  # its own year, though released in 1997
    assert validate_items(items)[1].ok


def test_movielens_ratings_keep_the_log_order(ml):
    _, ratings = ml
    assert ratings.column_names == ["user_id", "item_id", "ts", "rating"]
    assert ratings.slice(0, 2).to_pylist() == [  # the first lines of u.data
        {"user_id": 196, "item_id": 242, "ts": 881250949, "rating": 3},
        {"user_id": 186, "item_id": 302, "ts": 891717742, "rating": 3},
    ]


def test_movielens_clicks_negatives_are_same_user_low_ratings_from_before_the_click(ml):
    _, ratings = ml
    clicks = ratings_to_clicks(ratings)
    assert clicks.num_rows == int((ratings["rating"].to_numpy() >= 4).sum())
    assert set(clicks["query"].to_pylist()) == {""}
    r = ratings.to_pandas()
    r["log_pos"] = np.arange(len(r))
    r = r.sort_values(["user_id", "ts", "log_pos"], kind="stable")
    for row in clicks.slice(0, 300).to_pylist():  # spot-check against a brute-force reference
        mine = r[r.user_id == row["user_id"]]
        at = mine.index[(mine.item_id == row["item_id"]) & (mine.ts == row["ts"]) & (mine.rating >= 4)][0]
        before = mine.loc[: at].iloc[:-1]  # everything the user rated earlier in (time, log) order
        expected = before[before.rating < 4].item_id.tolist()[::-1][:8]  # the most recent first
        assert row["negatives"] == expected


def test_ratings_to_clicks_never_takes_a_negative_from_after_the_click():
    ratings = pa.table({"user_id": [1, 1, 1, 1, 1], "item_id": [10, 11, 12, 13, 14], "ts": [5, 1, 5, 9, 5],
                        "rating": [5, 2, 1, 1, 2]})
    clicks = ratings_to_clicks(ratings, max_negatives=8)
    # log order within ts=5: item 10 (the click), then 12 and 14 come after it; 11 (ts 1) is before
    assert clicks.to_pylist()[0]["negatives"] == [11]


def test_recbole_atomic_fallback_parser(tmp_path):
    item = tmp_path / "ml-100k.item"
    item.write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tToy Story\t1995\tAnimation Children's Comedy\n"
        '2\tSay "Hi"\t\tDrama\n'
    )
    inter = tmp_path / "ml-100k.inter"
    inter.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n")
    items = movielens._items_from_recbole(item)
    assert items.to_pylist() == [
        {"item_id": 1, "title": "Toy Story (1995)", "category": "Animation, Children's, Comedy", "attributes": ""},
        {"item_id": 2, "title": 'Say "Hi"', "category": "Drama", "attributes": ""},
    ]
    ratings = movielens._ratings_from_recbole(inter)
    assert ratings.to_pylist() == [{"user_id": 196, "item_id": 242, "ts": 881250949, "rating": 3}]


# ---------------------------------------------------------------- synthetic


def test_synthetic_schemas(syn):
    items, sessions = syn
    assert items.schema.equals(items_schema(16))
    assert sessions.schema.equals(CLICKS_SCHEMA)
    assert items.num_rows == 2000 and validate_items(items)[1].ok
    row = items.to_pylist()[0]
    assert " > " in row["category"]
    assert re.fullmatch(r"brand=\w+; color=\w+; material=[\w ]+; style=\w+; line=\w+", row["attributes"])
    assert row["title"].split()[0] == row["attributes"].split(";")[0].split("=")[1]  # title starts with the brand


def test_synthetic_deterministic_per_seed_and_differs_across_seeds():
    cfg = dict(n_items=300, n_users=50, image_dim=4)
    a_items, a_sess = generate_synthetic(SyntheticConfig(seed=7, **cfg))
    b_items, b_sess = generate_synthetic(SyntheticConfig(seed=7, **cfg))
    c_items, c_sess = generate_synthetic(SyntheticConfig(seed=8, **cfg))
    assert _ipc_bytes(a_items) == _ipc_bytes(b_items) and _ipc_bytes(a_sess) == _ipc_bytes(b_sess)
    assert not a_items.equals(c_items) and not a_sess.equals(c_sess)


def test_synthetic_popularity_is_long_tailed(syn):
    items, sessions = syn
    counts = np.bincount(sessions["item_id"].to_numpy(), minlength=items.num_rows + 1)[1:]
    top = np.sort(counts)[::-1]
    assert top[: len(top) // 10].sum() / top.sum() > 0.35  # top 10% of items get > 35% of clicks
    assert (counts == 0).mean() > 0.05  # cold items occur naturally


def test_synthetic_queries_mostly_describe_the_clicked_item(syn):
    items, sessions = syn
    text = {r["item_id"]: set(re.findall(r"\w+", f"{r['title']} {r['category']} {r['attributes']}".lower()))
            for r in items.to_pylist()}  # fmt: skip
    queries = sessions["query"].to_pylist()
    clicked = sessions["item_id"].to_pylist()
    nonempty = [(q, i) for q, i in zip(queries, clicked) if q]
    share = np.mean([bool(set(q.split()) & text[i]) for q, i in nonempty])
    assert share > 0.8
    assert 0.01 < 1 - len(nonempty) / len(queries) < 0.2  # sometimes empty
    assert len(set(queries)) > len(queries) // 10  # not a handful of templates


def test_synthetic_negatives_exclude_click_and_are_mostly_same_category(syn):
    items, sessions = syn
    cat = np.array([""] + items["category"].to_pylist(), dtype=object)
    negs = sessions["negatives"]
    parents = pc.list_parent_indices(negs).to_numpy()
    flat = pc.list_flatten(negs).to_numpy()
    clicked = sessions["item_id"].to_numpy()
    assert not np.any(flat == clicked[parents])
    assert np.mean(cat[flat] == cat[clicked[parents]]) > 0.5
    assert pc.max(pc.list_value_length(negs)).as_py() <= 8
    assert flat.min() >= 1 and flat.max() <= items.num_rows


def test_synthetic_history_predicts_next_category(syn):
    items, sessions = syn
    cat = np.array([""] + items["category"].to_pylist(), dtype=object)[sessions["item_id"].to_numpy()]
    user = sessions["user_id"].to_numpy()
    same_user = user[1:] == user[:-1]
    # the previous click's category predicts the next one far above chance (1/20)
    assert np.mean(cat[1:][same_user] == cat[:-1][same_user]) > 0.3
    ts = sessions["ts"].to_numpy()
    assert np.all(ts[1:][same_user] > ts[:-1][same_user])


def test_synthetic_image_emb_carries_category_signal(syn):
    items, _ = syn
    emb = items["image_emb"].combine_chunks().flatten().to_numpy().reshape(items.num_rows, 16)
    assert emb.dtype == np.float32
    cats = np.array(items["category"].to_pylist())
    sim = emb @ emb.T
    same = cats[:, None] == cats[None, :]
    np.fill_diagonal(same, False)
    off = ~same
    np.fill_diagonal(off, False)
    assert sim[same].mean() > sim[off].mean() + 0.2


def test_synthetic_large_catalogue_generates():
    items, sessions = generate_synthetic(SyntheticConfig(n_items=100_000, n_users=200, seed=1))
    assert items.num_rows == 100_000
    assert sessions.num_rows > 200 * 2


@pytest.mark.parametrize(
    "kwargs, field",
    [({"n_items": 50}, "n_items"), ({"n_items": 2_000_000}, "n_items"), ({"query_noise": 1.5}, "query_noise"),
     ({"n_categories": 1}, "n_categories"), ({"image_dim": -1}, "image_dim"), ({"n_users": 0}, "n_users")],
)  # fmt: skip
def test_synthetic_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**kwargs)
