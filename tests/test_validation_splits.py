"""The validation splits the planner tunes on: disjoint from test (and from calibration text), test split
unchanged, subsets for screening; recsys scores the second-last item with the last one hidden."""
from __future__ import annotations

import numpy as np
import pytest

from slimcart.workloads import get_workload
from slimcart.workloads.llm import split_of as llm_split
from slimcart.workloads.search import _split_of as search_split

pytestmark = pytest.mark.usefixtures("one_thread")


def test_search_split_keeps_test_and_separates_validation_from_calibration(synthetic_data):
    import hashlib

    wl = get_workload("search")
    data = wl.load_data(None)
    queries = set(data.pairs["query"]) | set(data.validation["query"])
    # the test split is what it was before validation existed: 70% of queries by the first hash
    for q in queries:
        old_test = int(hashlib.sha1(q.encode()).hexdigest()[:8], 16) % 10 >= 3
        assert (search_split(q) == "test") == old_test
    val = wl.validation_data(data)
    assert set(val.pairs["query"]).isdisjoint(data.pairs["query"])
    assert not (set(val.pairs["query"]) | set(val.pairs["product"])) & set(data.calibration_texts)
    assert val.info.split.startswith("validation") and val.info.n == len(val.pairs)
    part = wl.validation_data(data, 0.3)
    assert set(part.pairs["query"]) < set(val.pairs["query"])
    assert part.pairs["query"].nunique() == max(1, round(0.3 * val.pairs["query"].nunique()))


def test_search_validation_share_on_many_queries():
    names = [f"query {i}" for i in range(20000)]
    shares = {k: np.mean([search_split(q) == k for q in names]) for k in ("test", "calibration", "validation")}
    assert shares["test"] == pytest.approx(0.70, abs=0.01)
    assert shares["validation"] == pytest.approx(0.15, abs=0.01) and shares["calibration"] == pytest.approx(0.15, abs=0.01)


def test_llm_validation_is_the_tail_of_the_old_train_stream(synthetic_data):
    wl = get_workload("llm")
    data = wl.load_data(None)
    assert data.validation_texts and set(data.validation_texts).isdisjoint(data.test_texts)
    assert set(data.validation_texts).isdisjoint(data.train_texts)
    # before the validation split, train = every non-test document in hash order; calibration reads that
    # stream from its start, so the new train list must be a prefix of the old one
    from slimcart.workloads import synthetic
    from slimcart.workloads.llm import _hash

    docs = sorted(((t, t) for t in synthetic.review_texts(0)), key=lambda d: _hash(d[0]))
    old_train = [t for k, t in docs if _hash(k) % 10 != 0]
    assert old_train[: len(data.train_texts)] == data.train_texts
    assert old_train[len(data.train_texts):] == data.validation_texts
    shares = {k: np.mean([llm_split(str(i)) == k for i in range(20000)]) for k in ("test", "validation")}
    assert shares["test"] == pytest.approx(0.10, abs=0.01) and shares["validation"] == pytest.approx(0.045, abs=0.01)
    val = wl.validation_data(data, 0.25)
    assert val.test_texts == data.validation_texts and val.eval_windows == 16 and val.info.split.startswith("validation")


class _ScoreByItemId:
    """Scores item i as -i: the best items are the smallest ids (independent ranking by hand)."""

    runtime = "test"

    def __init__(self, n_items):
        self.n = n_items

    def __call__(self, batch):
        seq = np.asarray(batch["seq"])
        return np.tile(-np.arange(self.n + 1, dtype=np.float32), (len(seq), 1))


def test_recsys_validation_scores_second_last_item_with_last_hidden(synthetic_data):
    from test_recsys_workload import tiny_bundle

    wl = get_workload("recsys")
    data = wl.load_data(None)
    val = wl.validation_data(data)
    runner = _ScoreByItemId(data.n_items)
    bundle = tiny_bundle(data.n_items)
    res = wl.evaluate(runner, bundle, val)
    expected = []
    for u in data.eval_users:
        h = data.histories[u]
        target, seen = h[-2], set(h[:-2].tolist()) - {h[-2]}
        rank = sum(1 for i in range(1, target) if i not in seen)  # smaller ids score higher
        expected.append(1 / np.log2(rank + 2) if rank < 10 else 0.0)
    assert res.quality["ndcg@10"] == pytest.approx(np.mean(expected))
    assert val.target == "validation" and data.target == "test"
    half = wl.validation_data(data, 0.5)
    assert len(half.eval_users) == round(0.5 * len(data.eval_users)) and half.auc_negatives.shape[0] == len(half.eval_users)
