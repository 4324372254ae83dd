"""The search workload's guard task: same-product matching on PriceRunner offers no recipe ever sees.

Why: a compressed encoder can hold its CrowdFlower nDCG@10 (the evaluation domain, which recovery and
distillation text resembles) and still lose much more on other e-commerce text. The guard task measures
that on a second retrieval task with its own data, reported beside CrowdFlower.

Data: `categories-pricerunner/pricerunner_aggregate.csv` under SLIMCART_DATA (35,311 merchant offers of
13,233 product clusters; columns product_id, title, merchant_id, cluster_id, cluster_label, category_id,
category_label). Split BY CLUSTER, never by offer (offers of one product are near-duplicates):

    guard(cluster) = int(sha1("pricerunner-cluster:<cluster_id>")[:8], 16) mod 10 == 0     (~10% of clusters)

Task: the distinct titles of guard clusters form the corpus (clusters with a single title stay in as
distractors; a title found in two guard clusters is dropped as ambiguous). Every title whose cluster
has another distinct title is a query; it is left out of its own ranking; relevant = the other titles
of its cluster. With s_q = cosine scores of query q against the corpus and R_q its relevant set,

    rank_q = 1 + #{d not in R_q, d != q : s_q[d] > max_{r in R_q} s_q[r]}
    MRR = mean_q 1 / rank_q          Recall@1 = mean_q [rank_q == 1]

(ties count in the query's favour; with float scores of distinct titles they essentially never occur).

Training / calibration text from PriceRunner (`training_titles`) comes only from non-guard clusters and
never repeats a guard title, so nothing a recipe trains, distils or calibrates on is evaluated here.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import SlimcartError
from ..paths import data_root

PRICERUNNER = "categories-pricerunner/pricerunner_aggregate.csv"
COLUMNS = ["product_id", "title", "merchant_id", "cluster_id", "cluster_label", "category_id", "category_label"]
GUARD_BUCKETS, GUARD_BUCKET = 10, 0
SPLIT_RULE = "PriceRunner clusters with sha1('pricerunner-cluster:<id>') mod 10 == 0"


def is_guard_cluster(cluster_id) -> bool:
    h = int(hashlib.sha1(f"pricerunner-cluster:{cluster_id}".encode()).hexdigest()[:8], 16)
    return h % GUARD_BUCKETS == GUARD_BUCKET


@dataclass
class GuardSet:
    titles: list[str]  # the corpus: distinct titles of guard clusters
    cluster: np.ndarray  # cluster id of each title
    queries: np.ndarray  # indices into titles that have at least one other title in their cluster
    source: Path

    def describe(self) -> str:
        return (f"guard task: same-product matching, {len(self.queries)} offer-title queries against "
                f"{len(self.titles)} titles of {len(np.unique(self.cluster))} held-out {SPLIT_RULE}")


def pricerunner_path() -> Path | None:
    root = data_root()
    path = root / PRICERUNNER if root is not None else None
    return path if path is not None and path.is_file() else None


@lru_cache(maxsize=2)
def _offers(path: Path) -> pd.DataFrame:
    """(title, cluster_id, guard) per offer; the UCI copy's header line, if present, is skipped."""
    try:
        df = pd.read_csv(path, header=None, names=COLUMNS, usecols=[1, 3], dtype=str)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise SlimcartError(f"cannot read PriceRunner offers {path}: {type(e).__name__}") from None
    df = df[pd.to_numeric(df["cluster_id"], errors="coerce").notna()]
    df = df.assign(title=df["title"].fillna("").str.replace(r"\s+", " ", regex=True).str.strip())
    df = df[df["title"] != ""]
    df = df.assign(cluster_id=df["cluster_id"].astype(int))
    return df.assign(guard=df["cluster_id"].map(is_guard_cluster)).reset_index(drop=True)


def guard_set(path: Path | None = None) -> GuardSet | None:
    """The guard task from PriceRunner under SLIMCART_DATA (None when the file is not there)."""
    path = path or pricerunner_path()
    if path is None:
        return None
    g = _offers(path)
    g = g[g["guard"]].drop_duplicates(["cluster_id", "title"])
    ambiguous = g.groupby("title")["cluster_id"].transform("nunique") > 1
    g = g[~ambiguous].reset_index(drop=True)
    sizes = g.groupby("cluster_id")["title"].transform("size").to_numpy()
    queries = np.flatnonzero(sizes >= 2)
    if len(queries) == 0:
        return None
    return GuardSet(titles=list(g["title"]), cluster=g["cluster_id"].to_numpy(), queries=queries, source=path)


def training_titles(path: Path | None = None) -> list[str]:
    """Distinct PriceRunner titles usable for training/calibration: from non-guard clusters only, and
    never a title that also occurs in a guard cluster (file order; empty when the file is not there)."""
    path = path or pricerunner_path()
    if path is None:
        return []
    df = _offers(path)
    held = set(df.loc[df["guard"], "title"])
    return [t for t in dict.fromkeys(df.loc[~df["guard"], "title"]) if t not in held]


def match_metrics(emb: np.ndarray, cluster: np.ndarray, queries: np.ndarray) -> dict[str, float]:
    """MRR and Recall@1 of same-cluster retrieval (see the module docstring), vectorised over queries."""
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    ranks = []
    for a in range(0, len(queries), 512):  # 512 x corpus scores at a time: bounded memory
        q = queries[a : a + 512]
        sims = emb[q] @ emb.T
        sims[np.arange(len(q)), q] = -np.inf  # a query never retrieves itself
        rel = cluster[q][:, None] == cluster[None, :]
        rel[np.arange(len(q)), q] = False
        best = np.where(rel, sims, -np.inf).max(1)
        ranks.append(1 + ((sims > best[:, None]) & ~rel).sum(1))
    r = np.concatenate(ranks)
    return {"mrr": float(np.mean(1.0 / r)), "recall@1": float(np.mean(r == 1))}
