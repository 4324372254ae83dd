"""Small deterministic e-commerce datasets, generated when no real data is available.

Everything built on these is labelled "synthetic data" in outputs and reports: they exist so that
slimcart runs end to end on a fresh machine, not to make quality claims.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

CATEGORIES = {
    "running shoes": ["trail", "road", "waterproof", "lightweight", "cushioned"],
    "coffee maker": ["espresso", "drip", "12-cup", "programmable", "single-serve"],
    "laptop backpack": ["15 inch", "waterproof", "anti-theft", "usb charging", "leather"],
    "wireless headphones": ["noise cancelling", "over-ear", "bluetooth", "sport", "foldable"],
    "led desk lamp": ["dimmable", "usb", "clamp", "touch control", "eye-care"],
    "kitchen knife set": ["stainless steel", "chef", "8-piece", "ceramic", "block"],
    "yoga mat": ["non-slip", "extra thick", "eco-friendly", "travel", "cork"],
    "smart watch": ["fitness tracker", "gps", "waterproof", "heart rate", "amoled"],
    "office chair": ["ergonomic", "mesh", "lumbar support", "reclining", "gaming"],
    "water bottle": ["insulated", "stainless steel", "32 oz", "bpa-free", "straw lid"],
    "phone case": ["shockproof", "clear", "wallet", "magnetic", "slim"],
    "baby stroller": ["lightweight", "jogging", "travel system", "compact", "double"],
}
BRANDS = ["Acme", "Nordvik", "Zentro", "Bluefin", "Orla", "Kestrel", "Mavi", "Tecro", "Hallam", "Quill"]
COLORS = ["black", "white", "red", "blue", "grey", "green"]


def search_pairs(seed: int = 0, products_per_query: int = 20) -> pd.DataFrame:
    """Queries with graded relevance 1-4 over a generated catalog (same columns as CrowdFlower)."""
    rng = np.random.default_rng(seed)
    cats = list(CATEGORIES)
    rows = []
    for ci, cat in enumerate(cats):
        for attr in CATEGORIES[cat][:3]:
            query = f"{attr} {cat}"
            for _ in range(products_per_query):
                r = rng.random()
                if r < 0.45:  # same category and attribute: highly relevant
                    pc, pa, label = cat, attr, 4
                elif r < 0.7:  # same category, other attribute
                    pc, pa, label = cat, str(rng.choice(CATEGORIES[cat][3:])), 3
                elif r < 0.85:  # shares the attribute only
                    pc = cats[(ci + 1 + int(rng.integers(len(cats) - 1))) % len(cats)]
                    pa, label = attr, 2
                else:
                    pc = cats[(ci + 1 + int(rng.integers(len(cats) - 1))) % len(cats)]
                    pa, label = str(rng.choice(CATEGORIES[pc])), 1
                brand, color = rng.choice(BRANDS), rng.choice(COLORS)
                title = f"{brand} {pa} {pc} - {color}"
                desc = f"The {brand} {pc} is {pa} and comes in {color}. Free shipping on orders over $25."
                rows.append((query, title, desc, label))
    df = pd.DataFrame(rows, columns=["query", "product_title", "product_description", "median_relevance"])
    return df.drop_duplicates(subset=["query", "product_title"]).reset_index(drop=True)


def interactions(seed: int = 0, n_users: int = 600, n_items: int = 120, series_len: int = 6) -> pd.DataFrame:
    """Time-ordered user-item interactions with learnable structure (user_id, item_id, timestamp).

    Items form "series" of `series_len` consecutive ids (think game sequels). Each user prefers a
    few series and mostly buys the next item of the series they are in, sometimes jumping to the
    start of another preferred series, rarely to a random item: a sequential model can learn
    "next = current + 1" and the user's taste, a popularity model cannot.
    """
    rng = np.random.default_rng(seed)
    n_series = n_items // series_len
    rows = []
    for user in range(1, n_users + 1):
        liked = rng.choice(n_series, size=3, replace=False)
        series, step = int(liked[0]), 0
        for t in range(int(rng.integers(5, 16))):
            r = rng.random()
            if r < 0.08:
                item = int(rng.integers(1, n_items + 1))
            else:
                if step >= series_len or r > 0.8:  # finished (or tired of) a series: start a liked one
                    series, step = int(rng.choice(liked)), 0
                item = series * series_len + step + 1
                step += 1
            rows.append((user, item, t))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])


def review_texts(seed: int = 0, n: int = 400) -> list[str]:
    """Product reviews ("title\\nbody") built from templates over the generated catalog.

    Only a stand-in so the LLM workload runs without data: perplexity on it says nothing about
    real text quality.
    """
    rng = np.random.default_rng(seed)
    openers = ["I bought this {cat} for my {who}.", "Ordered the {brand} {cat} last month.", "We have used this {cat} every day since it arrived."]
    goods = ["The {attr} design works well.", "It feels solid and the {color} finish looks great.", "Setup took five minutes.", "Battery and build are better than expected for the price."]
    bads = ["It stopped working after two weeks.", "The {attr} part feels cheap.", "Customer service never answered my emails.", "The {color} color faded quickly."]
    whos = ["wife", "son", "office", "kitchen", "daughter", "husband"]
    cats = list(CATEGORIES)
    texts = []
    for _ in range(n):
        cat = cats[int(rng.integers(len(cats)))]
        fill = {"cat": cat, "attr": str(rng.choice(CATEGORIES[cat])), "brand": str(rng.choice(BRANDS)),
                "color": str(rng.choice(COLORS)), "who": str(rng.choice(whos))}
        positive = rng.random() < 0.6
        pool = goods if positive else bads
        body = [str(rng.choice(openers))] + [str(s) for s in rng.choice(pool, size=int(rng.integers(2, 4)), replace=False)]
        body.append("Would buy again." if positive else "I returned it.")
        title = ("Great " if positive else "Disappointing ") + cat
        texts.append(title + "\n" + " ".join(body).format(**fill))
    return texts
