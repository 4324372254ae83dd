"""The search guard task: held-out PriceRunner clusters, metrics, and disjointness from every text a
recipe trains, distils or calibrates on."""
import hashlib

import numpy as np
import pandas as pd
import pytest

from slimcart.workloads import get_workload
from slimcart.workloads.guard import guard_set, match_metrics, training_titles
from slimcart.workloads.search_distill import transfer_texts

pytestmark = pytest.mark.usefixtures("one_thread")


def _guard_by_rule(cluster_id: int) -> bool:
    """The documented split rule, recomputed here independently of slimcart."""
    return int(hashlib.sha1(f"pricerunner-cluster:{cluster_id}".encode()).hexdigest()[:8], 16) % 10 == 0


def _brute_force(emb, cluster, queries):
    """Rank every query's corpus by a full sort; rank of the first relevant title."""
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    rr, hit = [], []
    for q in queries:
        others = [d for d in range(len(emb)) if d != q]
        order = sorted(others, key=lambda d: -float(emb[q] @ emb[d]))
        first = next(i for i, d in enumerate(order, 1) if cluster[d] == cluster[q])
        rr.append(1 / first)
        hit.append(first == 1)
    return {"mrr": float(np.mean(rr)), "recall@1": float(np.mean(hit))}


def test_match_metrics_hand_computed():
    # 4 titles, clusters A A B B; 2-D embeddings at angles 0, 90, 10, 100 degrees
    ang = np.deg2rad([0, 90, 10, 100])
    emb = np.stack([np.cos(ang), np.sin(ang)], 1)
    cluster = np.array([1, 1, 2, 2])
    # q0: others by cosine 10deg(B) 90deg(A) 100deg(B) -> rank 2; q1: 100(B) 90(A)... cos: d3 .985, d0 0, d2 .17 -> d3, d2, d0 -> rank 3
    # q2: d0 .985, d1 .17, d3 0 -> its partner d3 is 3rd; q3: d1 .985, d2 0, d0 -.17 -> d1 then d2 -> rank 2
    got = match_metrics(emb, cluster, np.arange(4))
    assert got["mrr"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 3 + 1 / 2) / 4)
    assert got["recall@1"] == 0.0


def test_match_metrics_matches_brute_force():
    rng = np.random.default_rng(0)
    cluster = rng.integers(0, 40, size=300)
    emb = rng.normal(size=(300, 8)) + 2.0 * rng.normal(size=(40, 8))[cluster]
    sizes = np.bincount(cluster, minlength=40)[cluster]
    queries = np.flatnonzero(sizes >= 2)
    got, want = match_metrics(emb, cluster, queries), _brute_force(emb, cluster, queries)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0 < got["recall@1"] < 1  # the data is neither trivial nor hopeless: the check means something


@pytest.fixture
def fake_pricerunner(tmp_path, monkeypatch):
    """A small offers file (UCI header line included) whose guard/non-guard clusters share one title."""
    guard_ids = [c for c in range(1, 400) if _guard_by_rule(c)][:6]
    other_ids = [c for c in range(1, 400) if not _guard_by_rule(c)][:20]
    rows = []
    for c in guard_ids + other_ids:
        for m in range(3):
            rows.append((len(rows) + 1, f"product {c} offer {m} {'g' if c in guard_ids else 'n'}", m, c))
    rows.append((len(rows) + 1, "shared title in both splits", 9, guard_ids[0]))
    rows.append((len(rows) + 1, "shared title in both splits", 9, other_ids[0]))
    rows.append((len(rows) + 1, f"product {guard_ids[1]} offer 0 g", 7, guard_ids[1]))  # duplicate title in a cluster
    df = pd.DataFrame(rows, columns=["product_id", "title", "merchant_id", "cluster_id"])
    df = df.assign(cluster_label="x", category_id=1, category_label="Phones")
    folder = tmp_path / "root" / "categories-pricerunner"
    folder.mkdir(parents=True)
    path = folder / "pricerunner_aggregate.csv"
    path.write_text("Product ID,Product Title,Merchant ID,Cluster ID,Cluster Label,Category ID,Category Label\n"
                    + df.to_csv(header=False, index=False))
    monkeypatch.setenv("SLIMCART_DATA", str(tmp_path / "root"))
    return df, set(guard_ids)


def test_guard_split_by_cluster_and_disjoint_from_training_text(fake_pricerunner):
    df, guard_ids = fake_pricerunner
    g = guard_set()
    assert set(g.cluster) == guard_ids  # exactly the clusters the rule picks, whole clusters only
    assert len(g.titles) == len(set(g.titles))  # distinct titles: a duplicate offer is not its own match
    all_guard_titles = set(df.loc[df.cluster_id.isin(guard_ids), "title"])
    train = training_titles()
    assert train and not set(train) & all_guard_titles  # the shared title is held out of training
    assert set(train) == set(df.loc[~df.cluster_id.isin(guard_ids), "title"]) - all_guard_titles
    # what the workload calibrates / distils on never contains a guard title
    wl = get_workload("search")
    data = wl.load_data(None)  # no CrowdFlower under this root: synthetic pairs, real guard split
    assert data.guard is not None and data.info.synthetic
    assert not set(data.calibration_texts) & all_guard_titles
    assert any(t in set(train) for t in data.calibration_texts)  # PriceRunner titles are mixed in
    assert not set(transfer_texts(data.calibration_texts, 10_000)) & all_guard_titles


def test_guard_metrics_in_evaluate(fake_pricerunner, tiny_encoder_dir):
    wl = get_workload("search")
    bundle, data = wl.load_model(str(tiny_encoder_dir)), wl.load_data(None)
    runner = wl.torch_runner(bundle)
    q = wl.evaluate(runner, bundle, data).quality
    emb = wl.embed(runner, bundle.tokenizer, data.guard.titles)
    want = _brute_force(emb, data.guard.cluster, data.guard.queries)
    assert q["guard_mrr"] == pytest.approx(want["mrr"], abs=1e-9)
    assert q["guard_recall@1"] == pytest.approx(want["recall@1"], abs=1e-9)


def test_real_guard_split(real_data):
    """On the real offers: ~10% of clusters held out, none of their titles in the transfer text."""
    g = guard_set()
    offers = pd.read_csv(real_data / "categories-pricerunner" / "pricerunner_aggregate.csv", header=None)
    clusters = offers[3].unique()
    held = {c for c in clusters if _guard_by_rule(c)}
    assert 0.08 < len(held) / len(clusters) < 0.12
    assert set(g.cluster) <= held and len(g.queries) > 1000
    held_titles = set(offers.loc[offers[3].isin(held), 1].str.replace(r"\s+", " ", regex=True).str.strip())
    assert not set(transfer_texts([], 40_000)) & held_titles
