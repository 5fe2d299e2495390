"""Synthetic e-commerce catalogue + search sessions with learnable structure.

Why synthetic data: MovieLens has no queries, no rich item text and no images, so the
query-aware and multimodal parts of KARMA need a source where (a) the query says something
true about the clicked item, (b) a user's history predicts their next click, (c) image
embeddings carry signal, and (d) popularity is long-tailed so cold items occur naturally.

Generative story (all vectorised numpy; one `np.random.Generator` per stage from a
`SeedSequence`, so the same seed gives byte-identical tables):

* Items: category (mildly Zipf over categories), brand (Zipf over brands), colour, material
  (per department), style, product line; popularity is Zipf over a random item ranking.
  A latent vector = category + brand + style + colour factors (+ noise) drives `image_emb`.
* Users: 3 favourite-category slots whose category switches once at a random time (slow
  drift), 2 preferred brands, 1 preferred style.
* Each click: category = previous click's category (session continuation) or a favourite
  slot or a random popular category; item = popularity-weighted inside (category, preferred
  brand) or (category, preferred style) or the category.
* Query: words of the clicked item (noun/category, colour, brand, material, style, line)
  with noise: dropped words, shuffle, a typo, generic words, sometimes empty.
* Negatives ("shown but not clicked"): mostly same-category popular items (hard), plus a
  few uniform random ones; never the clicked item; deduplicated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from karma_ray.data.schema import CLICKS_SCHEMA, ITEMS_SCHEMA, items_schema

__all__ = ["SyntheticConfig", "CATEGORIES", "BRANDS", "generate_synthetic"]


# department -> (materials, [(subcategory label, singular noun phrase), ...])
_DEPARTMENTS: dict[str, tuple[list[str], list[tuple[str, str]]]] = {
    "Furniture": (
        ["wood", "metal", "rattan", "velvet", "linen", "glass"],
        [("Chairs", "dining chair"), ("Tables", "coffee table"), ("Sofas", "sofa"), ("Beds", "bed frame"),
         ("Desks", "desk"), ("Shelves", "bookshelf"), ("Stools", "bar stool"), ("Wardrobes", "wardrobe")],
    ),
    "Kitchen": (
        ["steel", "cast iron", "ceramic", "glass", "bamboo", "copper"],
        [("Knives", "chef knife"), ("Pans", "frying pan"), ("Mugs", "coffee mug"), ("Kettles", "kettle"),
         ("Blenders", "blender"), ("Pots", "stock pot"), ("Boards", "cutting board"), ("Toasters", "toaster")],
    ),
    "Footwear": (
        ["leather", "suede", "canvas", "mesh", "rubber", "wool"],
        [("Sneakers", "running sneaker"), ("Boots", "ankle boot"), ("Sandals", "sandal"), ("Loafers", "loafer"),
         ("Slippers", "slipper"), ("Heels", "heel"), ("Trainers", "trail shoe"), ("Clogs", "clog")],
    ),
    "Apparel": (
        ["cotton", "wool", "denim", "silk", "linen", "polyester"],
        [("Jackets", "rain jacket"), ("Shirts", "oxford shirt"), ("Jeans", "slim jeans"), ("Dresses", "midi dress"),
         ("Sweaters", "knit sweater"), ("Hoodies", "hoodie"), ("Coats", "wool coat"), ("Shorts", "chino shorts")],
    ),
    "Electronics": (
        ["aluminium", "plastic", "glass", "carbon", "steel", "fabric"],
        [("Headphones", "wireless headphones"), ("Speakers", "bluetooth speaker"), ("Laptops", "laptop"),
         ("Cameras", "mirrorless camera"), ("Monitors", "monitor"), ("Keyboards", "mechanical keyboard"),
         ("Phones", "smartphone"), ("Watches", "smartwatch")],
    ),
    "Sports": (
        ["nylon", "carbon", "aluminium", "foam", "rubber", "polyester"],
        [("Bikes", "road bike"), ("Tents", "camping tent"), ("Backpacks", "hiking backpack"), ("Mats", "yoga mat"),
         ("Rackets", "tennis racket"), ("Helmets", "bike helmet"), ("Balls", "football"), ("Weights", "dumbbell")],
    ),
    "Beauty": (
        ["glass", "bamboo", "plastic", "ceramic", "steel", "cotton"],
        [("Perfumes", "perfume"), ("Lipsticks", "lipstick"), ("Creams", "face cream"), ("Brushes", "makeup brush"),
         ("Shampoos", "shampoo"), ("Serums", "serum"), ("Dryers", "hair dryer"), ("Razors", "razor")],
    ),
    "Garden": (
        ["terracotta", "steel", "wood", "plastic", "stone", "wicker"],
        [("Planters", "planter"), ("Hoses", "garden hose"), ("Lamps", "solar lamp"), ("Grills", "charcoal grill"),
         ("Tools", "pruning shears"), ("Benches", "garden bench"), ("Mowers", "lawn mower"), ("Fountains", "fountain")],
    ),
}  # fmt: skip

_COLORS = ["black", "white", "oak", "walnut", "grey", "navy", "red", "green", "beige", "blue", "pink", "silver",
           "gold", "olive", "charcoal", "ivory", "teal", "mustard", "brown", "yellow"]  # fmt: skip
_STYLES = ["modern", "classic", "minimalist", "vintage", "industrial", "rustic", "scandinavian", "sporty",
           "casual", "premium", "compact", "retro"]  # fmt: skip
_LINES = ["Oslo", "Aspen", "Nova", "Metro", "Sierra", "Luna", "Atlas", "Echo", "Vista", "Orion", "Alto", "Terra",
          "Zen", "Pulse", "Haven", "Drift", "Summit", "Coast", "Ember", "Fjord", "Juno", "Kite", "Mesa", "Polar"]  # fmt: skip
_GENERIC = ["buy", "best", "cheap", "new", "sale", "gift", "online", "deal", "quality", "popular", "discount", "top"]
_BRAND_HEADS = ["Nord", "Lum", "Vel", "Kai", "Sol", "Bri", "Oak", "Mar", "Tor", "Ari", "Zen", "Hal", "Cor", "Fen",
                "Ver", "Pax", "Quin", "Rho", "Sel", "Ula"]  # fmt: skip
_BRAND_TAILS = ["ica", "o", "ex", "ora", "ly", "wood", "line", "ia", "ton", "mark", "ford", "ix", "aro", "en", "us"]


def _interleaved_categories() -> list[tuple[str, str, str]]:
    """(department, label, noun) ordered round-robin over departments, so the first N mix departments."""
    depts = list(_DEPARTMENTS.items())
    out = []
    for j in range(max(len(subs) for _, (_, subs) in depts)):
        for dept, (_, subs) in depts:
            if j < len(subs):
                out.append((dept, subs[j][0], subs[j][1]))
    return out


CATEGORIES: list[tuple[str, str, str]] = _interleaved_categories()
BRANDS: list[str] = [h + (t[1:] if h[-1] == t[0] else t) for t in _BRAND_TAILS for h in _BRAND_HEADS]
assert len(set(BRANDS)) == len(BRANDS), "brand names must be unique"

_LATENT_DIM = 16


@dataclass
class SyntheticConfig:
    """Size and noise knobs for `generate_synthetic`; validated eagerly so bad CLI input fails fast."""

    n_items: int = 2000
    n_users: int = 400
    n_categories: int = 20
    n_brands: int = 50
    mean_events_per_user: int = 25
    image_dim: int = 0
    max_negatives: int = 8
    query_noise: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        _check_range("n_items", self.n_items, 100, 1_000_000)
        _check_range("n_users", self.n_users, 1, 10_000_000)
        _check_range("n_categories", self.n_categories, 2, len(CATEGORIES))
        _check_range("n_brands", self.n_brands, 1, len(BRANDS))
        _check_range("mean_events_per_user", self.mean_events_per_user, 3, 10_000)
        _check_range("image_dim", self.image_dim, 0, 4096)
        _check_range("max_negatives", self.max_negatives, 0, 1000)
        if not isinstance(self.query_noise, (int, float)) or not 0.0 <= self.query_noise <= 1.0:
            raise ValueError(f"SyntheticConfig.query_noise must be in [0, 1], got {self.query_noise!r}")
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"SyntheticConfig.seed must be a non-negative int, got {self.seed!r}")


def _check_range(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ValueError(f"SyntheticConfig.{name} must be an int in [{lo}, {hi}], got {value!r}")


def generate_synthetic(cfg: SyntheticConfig | None = None) -> tuple[pa.Table, pa.Table]:
    """Return (items, sessions) for `cfg`; same config -> byte-identical tables."""
    cfg = cfg or SyntheticConfig()
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(5)]
    vocab = _Vocab(cfg)
    cat = _make_catalogue(cfg, rngs[0])
    items = _items_table(cfg, cat, vocab, rngs[1])
    clicks = _simulate_clicks(cfg, cat, rngs[2])
    query = _queries(cfg, cat, vocab, clicks["item"], rngs[3])
    negatives = _negatives(cfg, cat, clicks["item"], rngs[4])
    sessions = pa.Table.from_arrays(
        [pa.array(clicks["user"] + 1), pa.array(clicks["ts"]), pa.array(clicks["item"] + 1), query, negatives],
        schema=CLICKS_SCHEMA,
    )
    return items, sessions


# --------------------------------------------------------------------------------------------
# vocabulary: every word an item or a query can use, as one string array (ids index into it)
# --------------------------------------------------------------------------------------------


class _Vocab:
    """Token id space: [brands | lines | colours | materials | styles | nouns | labels | generic].

    Query and title strings are assembled by Arrow from token ids, so no Python loop over rows.
    A parallel array holds a one-edit typo of every token (id + size).
    """

    def __init__(self, cfg: SyntheticConfig) -> None:
        cats = CATEGORIES[: cfg.n_categories]
        self.materials = sorted({m for d in {c[0] for c in cats} for m in _DEPARTMENTS[d][0]})
        groups = {
            "brand": BRANDS[: cfg.n_brands],
            "line": _LINES,
            "color": _COLORS,
            "material": self.materials,
            "style": _STYLES,
            "noun": [c[2] for c in cats],
            "label": [c[1].lower() for c in cats],
            "generic": _GENERIC,
        }
        self.offset: dict[str, int] = {}
        words: list[str] = []
        for name, ws in groups.items():
            self.offset[name] = len(words)
            words.extend(ws)
        self.words = words
        self.size = len(words)
        self.lower = pa.array([w.lower() for w in words] + [_typo(w.lower()) for w in words], pa.string())
        self.display = pa.array(words, pa.string())
        self.category = pa.array([f"{c[0]} > {c[1]}" for c in cats], pa.string())
        self.dept_materials = {
            i: np.array([self.materials.index(m) for m in _DEPARTMENTS[c[0]][0]]) for i, c in enumerate(cats)
        }


def _typo(word: str) -> str:
    """Deterministic one-edit typo: swap two inner letters (or double the last for short words)."""
    letters = [i for i, ch in enumerate(word) if ch.isalpha()]
    if len(letters) < 4:
        return word + word[-1]
    i = letters[len(letters) // 2]
    if i + 1 < len(word) and word[i + 1].isalpha() and word[i + 1] != word[i]:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    return word[:i] + word[i + 1 :]


# --------------------------------------------------------------------------------------------
# catalogue
# --------------------------------------------------------------------------------------------


def _zipf_weights(n: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf(alpha) weights over a random ranking of n things (normalised)."""
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** alpha
    w = w[rng.permutation(n)]
    return w / w.sum()


def _make_catalogue(cfg: SyntheticConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Item attributes (0-based indices) and popularity; every category gets at least one item."""
    n, c = cfg.n_items, cfg.n_categories
    cat_w = _zipf_weights(c, 0.6, rng)
    category = np.concatenate([np.arange(c), rng.choice(c, size=n - c, p=cat_w)])
    category = category[rng.permutation(n)]
    brand = rng.choice(cfg.n_brands, size=n, p=_zipf_weights(cfg.n_brands, 0.8, rng))
    color = rng.integers(0, len(_COLORS), size=n)
    style = rng.integers(0, len(_STYLES), size=n)
    line = rng.integers(0, len(_LINES), size=n)
    material_slot = rng.integers(0, 6, size=n)
    popularity = _zipf_weights(n, 1.1, rng)
    return {
        "category": category, "brand": brand, "color": color, "style": style, "line": line,
        "material_slot": material_slot, "popularity": popularity, "category_weight": cat_w,
    }  # fmt: skip


def _material_ids(cat: dict[str, np.ndarray], vocab: _Vocab) -> np.ndarray:
    """Index into vocab.materials of each item's material (materials depend on the department)."""
    table = np.stack([vocab.dept_materials[i] for i in range(len(vocab.dept_materials))])
    return table[cat["category"], cat["material_slot"]]


def _items_table(cfg: SyntheticConfig, cat: dict[str, np.ndarray], vocab: _Vocab, rng: np.random.Generator) -> pa.Table:
    o = vocab.offset
    brand = vocab.display.take(pa.array(o["brand"] + cat["brand"]))
    line = vocab.display.take(pa.array(o["line"] + cat["line"]))
    color = vocab.display.take(pa.array(o["color"] + cat["color"]))
    material = vocab.display.take(pa.array(o["material"] + _material_ids(cat, vocab)))
    style = vocab.display.take(pa.array(o["style"] + cat["style"]))
    noun = vocab.display.take(pa.array(o["noun"] + cat["category"]))
    title = pc.binary_join_element_wise(brand, line, color, noun, " ")
    attributes = pc.binary_join_element_wise(
        pc.binary_join_element_wise("brand=", brand, ""),
        pc.binary_join_element_wise("color=", color, ""),
        pc.binary_join_element_wise("material=", material, ""),
        pc.binary_join_element_wise("style=", style, ""),
        pc.binary_join_element_wise("line=", line, ""),
        "; ",
    )
    columns = [pa.array(np.arange(1, cfg.n_items + 1, dtype=np.int64)), title,
               vocab.category.take(pa.array(cat["category"])), attributes]  # fmt: skip
    if cfg.image_dim > 0:
        columns.append(_image_embeddings(cfg, cat, rng))
    return pa.Table.from_arrays(columns, schema=items_schema(cfg.image_dim) if cfg.image_dim else ITEMS_SCHEMA)


def _image_embeddings(cfg: SyntheticConfig, cat: dict[str, np.ndarray], rng: np.random.Generator) -> pa.Array:
    """L2-normalised projection of each item's latent factors + noise: similar items look similar."""
    d = _LATENT_DIM
    factors = {"category": 1.0, "brand": 0.6, "style": 0.5, "color": 0.5}
    latent = np.zeros((cfg.n_items, d))
    for name, scale in factors.items():
        table = rng.standard_normal((int(cat[name].max()) + 1, d))
        latent += scale * table[cat[name]]
    latent += 0.3 * rng.standard_normal(latent.shape)
    proj = rng.standard_normal((d, cfg.image_dim)) / np.sqrt(d)
    emb = latent @ proj + 0.1 * rng.standard_normal((cfg.n_items, cfg.image_dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True) + 1e-12
    flat = pa.array(emb.astype(np.float32).ravel(), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, cfg.image_dim)


# --------------------------------------------------------------------------------------------
# user behaviour
# --------------------------------------------------------------------------------------------


class _GroupSampler:
    """Popularity-weighted sampling of an item inside a group (vectorised via one cumsum).

    Items are sorted by group key (small non-negative ints); the cumulative popularity lets a
    uniform draw in [mass before group, mass through group) land on an item of that group via
    one searchsorted, done on sorted draws because that is several times faster at 10M+ draws.
    """

    def __init__(self, keys: np.ndarray, popularity: np.ndarray, n_groups: int) -> None:
        self.order = np.argsort(keys, kind="stable")
        self.cum = np.cumsum(popularity[self.order])
        self.start = np.concatenate([[0], np.cumsum(np.bincount(keys, minlength=n_groups))])

    def sample(self, want: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Item index per request, or -1 where the requested group is empty."""
        lo, hi = self.start[want], self.start[want + 1]
        empty = lo == hi
        base = np.where(lo > 0, self.cum[np.maximum(lo - 1, 0)], 0.0)
        top = self.cum[np.maximum(hi - 1, 0)]
        x = base + u * (top - base)
        by_x = np.argsort(x)
        pos = np.empty(len(x), dtype=np.int64)
        pos[by_x] = np.searchsorted(self.cum, x[by_x], side="right")
        pos = np.clip(pos, lo, np.maximum(hi - 1, lo))
        return np.where(empty, -1, self.order[np.minimum(pos, len(self.order) - 1)])


def _events_per_user(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Skewed activity (lognormal around the mean), at least 2 clicks per user."""
    raw = cfg.mean_events_per_user * rng.lognormal(-0.18, 0.6, size=cfg.n_users)
    return np.maximum(2, np.rint(raw)).astype(np.int64)


def _simulate_clicks(cfg: SyntheticConfig, cat: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    n_cat, n_u = cfg.n_categories, cfg.n_users
    counts = _events_per_user(cfg, rng)
    user = np.repeat(np.arange(n_u), counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(len(user)) - starts[user]
    e = len(user)

    # user tastes: 3 favourite slots x 2 phases (drift), 2 brands, 1 style
    fav = rng.choice(n_cat, size=(n_u, 3, 2), p=cat["category_weight"])
    switch_at = rng.integers(1, 2 * cfg.mean_events_per_user + 2, size=(n_u, 3))
    brands = rng.choice(cfg.n_brands, size=(n_u, 2))
    style = rng.integers(0, len(_STYLES), size=n_u)

    slot = rng.choice(3, size=e, p=[0.55, 0.3, 0.15])
    phase = (pos >= switch_at[user, slot]).astype(np.int64)
    fav_cat = fav[user, slot, phase]
    rand_cat = rng.choice(n_cat, size=e, p=cat["category_weight"])
    chosen_cat = np.where(rng.random(e) < 0.85, fav_cat, rand_cat)
    # session continuation: reuse the category of the last "anchor" click of the same user
    cont = (rng.random(e) < 0.35) & (pos > 0)
    anchor = np.maximum.accumulate(np.where(cont, 0, np.arange(e)))
    category = chosen_cat[anchor]

    item = _pick_items(cfg, cat, category, brands[user, rng.integers(0, 2, size=e)], style[user], rng)
    gaps = 1 + np.floor(rng.exponential(8 * 3600.0, size=e)).astype(np.int64)
    begin = 1_600_000_000 + rng.integers(0, 180 * 86400, size=n_u)
    cum = np.cumsum(gaps)
    ts = begin[user] + cum - (cum[starts] - gaps[starts])[user]
    return {"user": user.astype(np.int64), "ts": ts.astype(np.int64), "item": item.astype(np.int64)}


def _pick_items(
    cfg: SyntheticConfig, cat: dict[str, np.ndarray], category: np.ndarray, brand: np.ndarray,
    style: np.ndarray, rng: np.random.Generator,
) -> np.ndarray:  # fmt: skip
    """Item per click: preferred brand (35%) or preferred style (25%) within the category, else any."""
    e = len(category)
    n_c, n_b, n_s = cfg.n_categories, cfg.n_brands, len(_STYLES)
    by_cat = _GroupSampler(cat["category"], cat["popularity"], n_c).sample(category, rng.random(e))
    b_key = cat["category"] * n_b + cat["brand"]
    by_brand = _GroupSampler(b_key, cat["popularity"], n_c * n_b).sample(category * n_b + brand, rng.random(e))
    s_key = cat["category"] * n_s + cat["style"]
    by_style = _GroupSampler(s_key, cat["popularity"], n_c * n_s).sample(category * n_s + style, rng.random(e))
    mode = rng.random(e)
    item = by_cat
    item = np.where((mode < 0.60) & (by_style >= 0), by_style, item)
    item = np.where((mode < 0.35) & (by_brand >= 0), by_brand, item)
    return item


# --------------------------------------------------------------------------------------------
# queries and negatives
# --------------------------------------------------------------------------------------------


def _queries(
    cfg: SyntheticConfig, cat: dict[str, np.ndarray], vocab: _Vocab, item: np.ndarray, rng: np.random.Generator
) -> pa.Array:
    """Noisy keyword query per click, assembled from token ids by Arrow (no per-row Python)."""
    q, e, o = cfg.query_noise, len(item), vocab.offset
    c = cat["category"][item]
    noun_or_label = np.where(rng.random(e) < 0.5, o["noun"] + c, o["label"] + c)
    slots = [  # (token id per row, inclusion probability), in canonical order
        (o["brand"] + cat["brand"][item], 0.35),
        (o["style"] + cat["style"][item], 0.3),
        (o["color"] + cat["color"][item], 0.45),
        (o["material"] + _material_ids(cat, vocab)[item], 0.3),
        (o["line"] + cat["line"][item], 0.1),
        (o["noun"] + c, 1.0 - 0.5 * q),
        (noun_or_label, 0.5 * q),  # dropped noun may come back as the plural category label
        (o["generic"] + rng.integers(0, len(_GENERIC), size=e), q),
    ]
    tokens = np.stack([ids for ids, _ in slots], axis=1)
    keep = rng.random(tokens.shape) < np.array([p for _, p in slots])[None, :]
    keep[:, 6] &= ~keep[:, 5]  # the label/noun fallback only when the noun was dropped
    keep &= (rng.random(e) >= 0.25 * q)[:, None]  # sometimes no query at all
    shuffle = rng.random(e) < q
    order = np.where(shuffle[:, None], np.argsort(rng.random(tokens.shape), axis=1), np.arange(tokens.shape[1]))
    tokens = np.take_along_axis(tokens, order, axis=1)
    keep = np.take_along_axis(keep, order, axis=1)
    typo_col = rng.integers(0, tokens.shape[1], size=e)
    typo = (rng.random(e) < 0.5 * q)[:, None] & (np.arange(tokens.shape[1])[None, :] == typo_col[:, None])
    tokens = tokens + np.where(typo, vocab.size, 0)
    offsets = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int32)
    words = vocab.lower.take(pa.array(tokens[keep]))
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), words), " ")


def _negatives(cfg: SyntheticConfig, cat: dict[str, np.ndarray], item: np.ndarray, rng: np.random.Generator) -> pa.Array:
    """Shown-but-not-clicked ids (1-based): ~75% same-category popular, rest uniform; deduped."""
    e, k = len(item), cfg.max_negatives
    if k == 0:
        return pa.ListArray.from_arrays(pa.array(np.zeros(e + 1, np.int32)), pa.array([], pa.int64()))
    n_hard = int(np.ceil(0.75 * k))
    sampler = _GroupSampler(cat["category"], cat["popularity"], cfg.n_categories)
    c = np.repeat(cat["category"][item], n_hard)
    hard = sampler.sample(c, rng.random(e * n_hard)).reshape(e, n_hard)
    rand = rng.integers(0, cfg.n_items, size=(e, k - n_hard))
    neg = np.concatenate([hard, rand], axis=1)
    # never the clicked item: replace collisions by a uniform item guaranteed != target
    alt = rng.integers(0, cfg.n_items - 1, size=neg.shape)
    alt += alt >= item[:, None]
    neg = np.where(neg == item[:, None], alt, neg)
    neg = np.take_along_axis(neg, np.argsort(rng.random(neg.shape), axis=1), axis=1)  # display order
    shown = rng.integers(max(1, k // 2), k + 1, size=e)  # how many were actually shown
    keep = ~_duplicate_mask(neg) & (np.arange(k)[None, :] < shown[:, None])
    offsets = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(neg[keep] + 1, pa.int64()))


def _duplicate_mask(rows: np.ndarray) -> np.ndarray:
    """True for every repeat of a value already seen earlier in the same row (first one kept)."""
    order = np.argsort(rows, axis=1, kind="stable")
    srt = np.take_along_axis(rows, order, axis=1)
    dup_sorted = np.concatenate([np.zeros((rows.shape[0], 1), bool), srt[:, 1:] == srt[:, :-1]], axis=1)
    dup = np.empty_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    return dup
