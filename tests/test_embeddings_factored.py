"""Factored tables: quotient-remainder, hashing, mixed dimensions and tensor trains. Each is checked on
a table built to have exactly its structure (the fit must then be exact), on its collision/indexing
rule computed independently, and on scoring against the dequantized table."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from slimcart.compress.embeddings import (
    HashConfig,
    HashedEmbedding,
    MixedDimConfig,
    MixedDimEmbedding,
    QRConfig,
    QREmbedding,
    TTConfig,
    TTEmbedding,
    load_table,
)
from slimcart.compress.embeddings.tt import balanced_factors
from slimcart.errors import SlimcartError

pytestmark = pytest.mark.usefixtures("one_thread")


def embedding_of(w: torch.Tensor, padding_idx=None) -> torch.nn.Embedding:
    emb = torch.nn.Embedding(*w.shape, padding_idx=padding_idx)
    with torch.no_grad():
        emb.weight.copy_(w)
    return emb


def round_trip(table, tmp_path):
    tensors, meta = table.state_for_save()
    save_file(tensors, str(tmp_path / "t.safetensors"))
    return load_table(load_file(str(tmp_path / "t.safetensors")), meta)


# ---------------------------------------------------------------- quotient-remainder
@pytest.mark.parametrize("operation", ["mult", "sum", "concat"])
def test_qr_fit_is_exact_on_a_qr_structured_table(operation, tmp_path):
    g = torch.Generator().manual_seed(0)
    n, d, c = 103, 8, 4
    m = math.ceil(n / c)  # 26 remainder rows, ids i -> (i // 26, i % 26)
    Q, R = torch.rand(c, d, generator=g) + 0.5, torch.randn(m, d, generator=g)
    ids = torch.arange(n)
    if operation == "mult":
        w = Q[ids // m] * R[ids % m]
    elif operation == "sum":
        w = Q[ids // m] + R[ids % m]
    else:
        w = torch.cat([Q[ids // m, :3], R[ids % m, 3:]], 1)
    qr = QREmbedding.from_embedding(embedding_of(w), QRConfig(collisions=c, operation=operation, fit_iters=50,
                                                              q_dim=3 if operation == "concat" else None))
    assert qr.Q.shape[0] == c and qr.R.shape[0] == m
    np.testing.assert_allclose(qr(ids).detach().numpy(), w.numpy(), rtol=1e-4, atol=1e-4)
    h = torch.randn(3, d)
    np.testing.assert_allclose(qr.scores(h).detach().numpy(), (h @ qr.dequantize().T).detach().numpy(), rtol=1e-5, atol=1e-5)
    assert qr.nbytes() == 4 * (c * (3 if operation == "concat" else d) + m * (d - 3 if operation == "concat" else d))
    back = round_trip(qr, tmp_path)
    assert torch.equal(back(ids), qr(ids))


def test_qr_ids_share_exactly_one_factor():
    qr = QREmbedding.from_embedding(torch.nn.Embedding(100, 4), QRConfig(collisions=5, init="random"))
    m = 20
    e = qr(torch.arange(100)).detach()
    q, r = qr.split(torch.tensor([7, 27, 99]))
    assert q.tolist() == [0, 1, 4] and r.tolist() == [7, 7, 19]
    # 7 and 27 share the remainder row, not the quotient row: their vectors differ by the Q ratio
    assert torch.allclose(e[7] / qr.Q[0].detach(), e[27] / qr.Q[1].detach())
    assert len({tuple(r.tolist()) for r in e}) == 100  # no two ids collide completely
    assert m == qr.m


def test_qr_retrains_and_bags():
    torch.manual_seed(0)
    bag = torch.nn.EmbeddingBag(50, 4, mode="mean")
    qr = QREmbedding.from_embedding(bag, QRConfig(collisions=2))
    ids, offsets = torch.tensor([1, 2, 30, 4]), torch.tensor([0, 3])
    rows = qr.lookup(ids).detach()
    np.testing.assert_allclose(qr(ids, offsets).detach().numpy(), torch.stack([rows[:3].mean(0), rows[3]]).numpy(), atol=1e-6)
    qr(ids, offsets).sum().backward()
    assert qr.Q.grad is not None and qr.R.grad.abs().sum() > 0


# ---------------------------------------------------------------- hashing trick
def test_hash_buckets_follow_the_universal_formula_and_collide_completely():
    emb = torch.nn.Embedding(1000, 4)
    hsh = HashedEmbedding.from_embedding(emb, HashConfig(buckets=37, seed=3))
    p = 2**31 - 1
    want = [((hsh.a * i + hsh.b) % p) % 37 for i in range(1000)]  # Python integers: no overflow
    assert hsh.bucket(torch.arange(1000)).tolist() == want
    e = hsh(torch.arange(1000)).detach()
    same = [i for i in range(1000) if want[i] == want[0]]
    assert len(same) > 1 and all(torch.equal(e[i], e[0]) for i in same)
    mod = HashedEmbedding.from_embedding(emb, HashConfig(ratio=0.1, hash="modulo"))
    assert mod.buckets == 100 and torch.equal(mod(torch.tensor([5])), mod(torch.tensor([105])))


def test_hash_fit_is_the_weighted_mean_of_each_bucket(tmp_path):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(60, 3, padding_idx=0)
    counts = np.arange(60, dtype=np.float64)
    hsh = HashedEmbedding.from_embedding(emb, HashConfig(buckets=7, hash="modulo"), counts)
    w = emb.weight.detach().numpy()
    wt = counts + 1
    wt[0] = 0  # the padding row does not pull its bucket
    for b in range(7):
        members = np.arange(60) % 7 == b
        np.testing.assert_allclose(hsh.H[b].detach().numpy(), (w[members] * wt[members, None]).sum(0) / wt[members].sum(),
                                   rtol=1e-5, atol=1e-6)
    assert torch.equal(hsh(torch.tensor([0])), torch.zeros(1, 3))
    h = torch.randn(2, 3)
    np.testing.assert_allclose(hsh.scores(h).detach().numpy(), (h @ hsh.dequantize().T).detach().numpy(), atol=1e-6)
    assert hsh.nbytes() == 7 * 3 * 4
    back = round_trip(hsh, tmp_path)
    assert torch.equal(back(torch.arange(60)), hsh(torch.arange(60)))


# ---------------------------------------------------------------- mixed dimensions
def test_mixed_dim_is_exact_when_each_block_has_low_rank(tmp_path):
    g = torch.Generator().manual_seed(0)
    n, d = 200, 12
    counts = np.random.default_rng(0).permutation(n).astype(np.float64)  # id with count n-1 is the hottest
    order = np.argsort(-counts, kind="stable")
    hot, mid, cold = order[:20], order[20:80], order[80:]
    w = torch.zeros(n, d)
    w[hot] = torch.randn(20, d, generator=g)  # full width
    w[mid] = torch.randn(60, 4, generator=g) @ torch.randn(4, d, generator=g)  # rank 4
    w[cold] = torch.randn(120, 2, generator=g) @ torch.randn(2, d, generator=g)  # rank 2
    cfg = MixedDimConfig(blocks=[{"fraction": 0.1}, {"fraction": 0.3, "dim": 4}, {"fraction": 0.6, "dim": 2}])
    md = MixedDimEmbedding.from_embedding(embedding_of(w), cfg, counts)
    np.testing.assert_allclose(md(torch.arange(n)).detach().numpy(), w.numpy(), rtol=1e-4, atol=1e-4)
    assert md.held[0].ids.tolist() == sorted(hot.tolist()) and md.held[1].ids.tolist() == sorted(mid.tolist())
    for P in md.P:  # projections have orthonormal rows
        np.testing.assert_allclose((P @ P.T).detach().numpy(), np.eye(P.shape[0]), atol=1e-5)
    # bytes: hot 20 x 12, mid 60 x 4 + 4 x 12, base 200 x 2 + 2 x 12, and 4 bytes per held id
    assert md.nbytes() == 4 * (20 * 12 + 60 * 4 + 4 * 12 + 200 * 2 + 2 * 12) + 4 * (20 + 60)
    h = torch.randn(3, d)
    np.testing.assert_allclose(md.scores(h).detach().numpy(), h.numpy() @ w.numpy().T, rtol=1e-4, atol=1e-4)
    back = round_trip(md, tmp_path)
    assert torch.allclose(back(torch.arange(n)), md(torch.arange(n)))
    md(torch.arange(n)).sum().backward()
    assert all(p.grad is not None for p in md.parameters())


def test_mixed_dim_bad_configs():
    with pytest.raises(SlimcartError, match="add up to 1"):
        MixedDimConfig(blocks=[{"fraction": 0.5}, {"fraction": 0.2, "dim": 4}])
    with pytest.raises(SlimcartError, match="exceeds the table's width"):
        MixedDimEmbedding.from_embedding(torch.nn.Embedding(10, 4), MixedDimConfig(blocks=[{"fraction": 1, "dim": 8}]),
                                         np.ones(10))


# ---------------------------------------------------------------- tensor train
def test_tt_svd_reconstructs_a_rank_sufficient_table_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    nf, df, ranks = [5, 4, 6], [2, 3, 2], [3, 4]  # 120 rows, width 12
    cores = [torch.randn(r0, n, d, r1, generator=g) for r0, n, d, r1 in zip([1] + ranks, nf, df, ranks + [1])]
    # the table by the definition, with numpy, independently of the module
    full = np.einsum("aixb,bjyc,ckzd->ijkxyz", *[c.numpy() for c in cores]).reshape(120, 12)
    tt = TTEmbedding.from_embedding(embedding_of(torch.from_numpy(full.copy())),
                                    TTConfig(row_factors=nf, dim_factors=df, ranks=ranks))
    np.testing.assert_allclose(tt(torch.arange(120)).detach().numpy(), full, rtol=1e-4, atol=1e-4)
    assert tt.nbytes() == 4 * (1 * 5 * 2 * 3 + 3 * 4 * 3 * 4 + 4 * 6 * 2 * 1)
    h = torch.randn(4, 12)
    np.testing.assert_allclose(tt.scores(h).detach().numpy(), h.numpy() @ full.T, rtol=1e-3, atol=1e-3)
    back = round_trip(tt, tmp_path)
    assert torch.equal(back(torch.arange(120)), tt(torch.arange(120)))
    # fewer rows than the factors cover (zero padding): ranks as large as the unfoldings keep it exact
    some = torch.randn(113, 12, generator=g)
    tt = TTEmbedding.from_embedding(embedding_of(some), TTConfig(row_factors=nf, dim_factors=df, ranks=[10, 12]))
    np.testing.assert_allclose(tt(torch.arange(113)).detach().numpy(), some.numpy(), rtol=1e-4, atol=1e-4)
    # a lower rank is the truncated approximation: worse, but not garbage
    low = TTEmbedding.from_embedding(embedding_of(some), TTConfig(row_factors=nf, dim_factors=df, ranks=[6, 6]))
    err = float((low(torch.arange(113)).detach() - some).norm() / some.norm())
    assert 0.05 < err < 1.0


def test_tt_lookup_is_the_product_of_the_digit_slices():
    tt = TTEmbedding.from_embedding(torch.nn.Embedding(60, 8), TTConfig(rank=3, init="random", seed=1))
    assert math.prod(tt.row_factors) >= 60 and math.prod(tt.dim_factors) == 8
    i = 47
    digits = []
    for f in reversed(tt.row_factors):
        digits.append(i % f)
        i //= f
    digits = digits[::-1]
    G = [c.detach().numpy() for c in tt.cores]
    row = G[0][:, digits[0]]  # [1, d1, r1]
    for core, dig in zip(G[1:], digits[1:]):
        row = np.einsum("axr,rys->axys", row, core[:, dig]).reshape(1, -1, core.shape[-1])
    np.testing.assert_allclose(tt(torch.tensor([47]))[0].detach().numpy(), row.reshape(-1), rtol=1e-5, atol=1e-6)
    tt(torch.tensor([47, 3])).sum().backward()
    assert all(c.grad is not None for c in tt.cores)


def test_tt_factors_and_bad_configs():
    assert math.prod(balanced_factors(10_000_000, 3, True)) >= 10_000_000 and balanced_factors(64, 3, False) == [4, 4, 4]
    assert math.prod(balanced_factors(12, 2, False)) == 12
    with pytest.raises(SlimcartError, match="do not multiply to the table's width"):
        TTEmbedding.from_embedding(torch.nn.Embedding(10, 8), TTConfig(dim_factors=[2, 2, 3]))
    with pytest.raises(SlimcartError, match="multiply to less"):
        TTEmbedding.from_embedding(torch.nn.Embedding(100, 8), TTConfig(row_factors=[2, 2, 2]))
    with pytest.raises(SlimcartError, match="needs 2 entries"):
        TTConfig(cores=3, ranks=[4])
