"""Search metrics against hand-computed values."""
import math

import numpy as np
import pandas as pd
import pytest

from slimcart.workloads.search import cosine_rows, ndcg_rerank, recall_corpus


def _setup():
    # one query "q" with 3 judged products; embeddings chosen so the ranking is p2 > p1 > p3
    pairs = pd.DataFrame({"query": ["q", "q", "q"], "product": ["p1", "p2", "p3"], "label": [4, 1, 3]})
    queries, products = ["q"], ["p1", "p2", "p3", "p4"]
    q = np.array([[1.0, 0.0]])
    p = np.array([[0.8, 0.6], [1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    return pairs, queries, products, q, p


def test_ndcg_hand_computed():
    pairs, queries, products, q, p = _setup()
    # ranking by cosine: p2 (label 1, gain 0), p1 (label 4, gain 7), p3 (label 3, gain 3)
    dcg = 0 / math.log2(2) + 7 / math.log2(3) + 3 / math.log2(4)
    ideal = 7 / math.log2(2) + 3 / math.log2(3) + 0
    assert ndcg_rerank(pairs, queries, products, q, p) == pytest.approx(dcg / ideal)


def test_ndcg_perfect_ranking_is_one():
    pairs, queries, products, q, _ = _setup()
    p = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [0, 0]])
    assert ndcg_rerank(pairs, queries, products, q, p) == pytest.approx(1.0)


def test_recall_capped_over_corpus():
    pairs, queries, products, q, p = _setup()
    # relevant (label >= 3): p1, p3. top-2 over corpus of 4: p2 (1.0), p4 (0.9) -> 0 hits at k=2
    assert recall_corpus(pairs, queries, products, q, p, k=2) == 0.0
    # top-3: p2, p4, p1 -> 1 hit of min(2, 3) = 2 relevant
    assert recall_corpus(pairs, queries, products, q, p, k=3) == pytest.approx(0.5)
    # k=1 caps the denominator at 1
    p2 = p.copy()
    p2[0] = [2.0, 0.0]
    assert recall_corpus(pairs, queries, products, q, p2, k=1) == pytest.approx(1.0)


def test_cosine_rows():
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0]])
    np.testing.assert_allclose(cosine_rows(a, b), [1.0, -1.0])


def test_ndcg_per_query_skips_queries_without_gain_and_averages_to_the_metric():
    from slimcart.workloads.search import ndcg_rerank_per_query

    pairs, queries, products, q, p = _setup()
    two = pd.concat([pairs, pd.DataFrame({"query": ["r", "r"], "product": ["p1", "p4"], "label": [1, 1]}),
                     pd.DataFrame({"query": ["s", "s"], "product": ["p3", "p1"], "label": [2, 1]})])
    qs = np.vstack([q, [[0.0, 1.0]], [[0.0, 1.0]]])
    per = ndcg_rerank_per_query(two, ["q", "r", "s"], products, qs, p)
    assert len(per) == 2  # "r" has no gain above 0: no nDCG
    assert per[0] == pytest.approx(ndcg_rerank(pairs, queries, products, q, p)) and per[1] == pytest.approx(1.0)
    assert ndcg_rerank(two, ["q", "r", "s"], products, qs, p) == pytest.approx(per.mean())
