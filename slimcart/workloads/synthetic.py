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
