"""Product-quantized tables: codes are each sub-vector's nearest centroid (brute force), lookups and
scores equal the reconstructed table, hot tiers hold the hottest rows, 4-bit codes pack two a byte,
bytes are exact, save/load and training of the codebooks."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_embeddings_frequency import hottest
from test_embeddings_rowwise import numpy_dequant

from slimcart.compress.embeddings import (
    PQConfig,
    ProductQuantizedEmbedding,
    compress_embeddings_,
    load_table,
)
from slimcart.compress.embeddings import pq_native
from slimcart.compress.embeddings.pq import pack_codes, unpack_codes
from slimcart.errors import SlimcartError

pytestmark = pytest.mark.usefixtures("one_thread")
N, D = 600, 16


@pytest.fixture
def source():
    torch.manual_seed(2)
    emb = torch.nn.Embedding(N, D)
    counts = np.random.default_rng(2).zipf(1.3, N).astype(np.float64)
    counts[:30] = 0
    return emb, counts


def reconstruct(m: ProductQuantizedEmbedding) -> np.ndarray:
    books, codes = m.codebooks.detach().numpy(), unpack_codes(m.codes, m.code_bits).numpy()
    return np.concatenate([books[j][codes[:, j]] for j in range(m.subvectors)], 1)


@pytest.mark.parametrize("bits, subvectors", [(8, 4), (4, 8)])
def test_codes_are_nearest_centroids_and_lookup_scores_follow(source, bits, subvectors):
    emb, counts = source
    m = ProductQuantizedEmbedding.from_embedding(emb, PQConfig(subvector_dim=D // subvectors, code_bits=bits, iters=5), counts)
    w, books = emb.weight.detach().numpy(), m.codebooks.detach().numpy()
    codes, s = unpack_codes(m.codes, bits).numpy(), D // subvectors
    for j in range(subvectors):  # brute force: every row's code is its sub-vector's nearest centroid
        dist = ((w[:, None, j * s:(j + 1) * s] - books[j][None]) ** 2).sum(-1)
        np.testing.assert_allclose(dist[np.arange(N), codes[:, j]], dist.min(1), rtol=1e-5, atol=1e-6)
    want = reconstruct(m)
    ids = torch.tensor([5, 0, 599, 5, 77])
    np.testing.assert_array_equal(m(ids).detach().numpy(), want[ids.numpy()])
    np.testing.assert_array_equal(m(ids.reshape(1, 5)[:, ::2]).detach().numpy()[0], want[[5, 599, 77]])  # strided ids
    for batch in (1, 3, 20):  # one query gathers centroid products, a batch sums them in embedding_bag
        h = torch.randn(batch, D)
        np.testing.assert_allclose(m.scores(h).detach().numpy(), h.numpy() @ want.T, rtol=1e-4, atol=1e-5)
    assert m.nbytes() == N * subvectors * bits // 8 + (1 << bits) * D * 4  # codes + float32 codebooks
    assert np.abs(want - w).mean() < np.abs(w - w.mean(0)).mean()  # much closer than the column means


def test_counts_weight_the_fit_towards_hot_rows(source):
    emb, counts = source
    err = {}
    for weighting in ("count", "none"):
        m = ProductQuantizedEmbedding.from_embedding(emb, PQConfig(subvector_dim=4, code_bits=4, weighting=weighting), counts)
        sq = ((reconstruct(m) - emb.weight.detach().numpy()) ** 2).sum(1)
        err[weighting] = (counts * sq).sum() / counts.sum()  # error as training lookups meet it
    assert err["count"] < err["none"]


def test_hot_tiers_hold_the_hottest_rows_and_take_no_part_in_the_fit(source, tmp_path):
    emb, counts = source
    cfg = PQConfig(subvector_dim=4, code_bits=4, hot=[{"bits": 32, "fraction": 0.02}, {"bits": 8, "fraction": 0.05}])
    m = ProductQuantizedEmbedding.from_embedding(emb, cfg, counts)
    fp32_ids, int8_ids = hottest(counts, 0, 12), hottest(counts, 12, 30)
    assert m.tier_ids[0].ids.tolist() == fp32_ids.tolist() and m.tier_ids[1].ids.tolist() == int8_ids.tolist()
    w = emb.weight.detach().numpy()
    want = reconstruct(m)
    want[int8_ids] = numpy_dequant(m.tier_rows[1].data.numpy(), 8, D)
    want[fp32_ids] = w[fp32_ids]
    np.testing.assert_allclose(m(torch.arange(N)).detach().numpy(), want, rtol=1e-6, atol=1e-6)
    many = torch.from_numpy(np.random.default_rng(5).integers(0, N, 3000))  # the large-batch path: tiers first
    np.testing.assert_allclose(m(many).detach().numpy(), want[many.numpy()], rtol=1e-6, atol=1e-6)
    for batch in (1, 2, 20):
        h = torch.randn(batch, D)
        np.testing.assert_allclose(m.scores(h).detach().numpy(), h.numpy() @ want.T, rtol=1e-4, atol=1e-5)
    assert m.nbytes() == N * 2 + 16 * D * 4 + len(fp32_ids) * (4 * D + 4) + len(int8_ids) * (D + 8 + 4)
    # the codebooks were fitted without the hot rows: refitting on the others alone gives the same
    from slimcart.compress.embeddings.pq import fit_codebooks, weights_of

    rest = np.setdiff1d(np.arange(N), np.r_[fp32_ids, int8_ids])
    books, _ = fit_codebooks(w, 4, 4, weights_of(counts, N, "count"), rest, cfg.iters, cfg.seed)
    np.testing.assert_allclose(books, m.codebooks.detach().numpy(), rtol=1e-6)
    tensors, meta = m.state_for_save()
    back = load_table(tensors, meta)
    ids = torch.arange(N)
    assert torch.equal(back(ids), m(ids)) and back.nbytes() == m.nbytes()


def test_packing_and_training_and_bad_input(source):
    codes = torch.randint(0, 16, (7, 6))
    packed = pack_codes(codes, 4)
    assert packed.shape == (7, 3) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, 4), codes) and int(packed[0, 0]) == int(codes[0, 0]) + 16 * int(codes[0, 1])
    emb, counts = source
    model = torch.nn.Sequential(emb)
    rep = compress_embeddings_(model, {"method": "pq", "subvector_dim": 4, "code_bits": 4}, {"0": counts})
    table = model[0]
    assert rep["tables"]["0"]["method"] == "pq" and rep["bytes_after"] == table.nbytes()
    before = table.codebooks.detach().clone()
    opt = torch.optim.SGD(table.parameters(), lr=1e-3)
    ids = torch.arange(0, N, 3)
    loss = table(ids).pow(2).mean()
    loss.backward()
    opt.step()
    assert not torch.equal(before, table.codebooks) and float(table(ids).pow(2).mean()) < float(loss)
    with pytest.raises(SlimcartError, match="must divide the table's width"):
        compress_embeddings_(torch.nn.Sequential(torch.nn.Embedding(N, D)), {"method": "pq", "subvector_dim": 6}, {"0": counts})
    with pytest.raises(SlimcartError, match="at least 256 rows"):
        compress_embeddings_(torch.nn.Sequential(torch.nn.Embedding(100, D)), {"method": "pq"}, {"0": np.ones(100)})
    with pytest.raises(SlimcartError, match="must be even"):
        compress_embeddings_(torch.nn.Sequential(torch.nn.Embedding(N, 12)), {"method": "pq", "subvector_dim": 4, "code_bits": 4},
                             {"0": counts})


def test_rotation_is_orthonormal_lowers_the_error_of_correlated_rows_and_round_trips(tmp_path):
    torch.manual_seed(3)
    # the variance sits in the first sub-space: plain PQ spends its other codebooks on noise, OPQ spreads it out
    base = torch.randn(N, D) * torch.tensor([3.0] * 4 + [0.1] * (D - 4))
    emb = torch.nn.Embedding.from_pretrained(base)
    counts = np.ones(N)
    err = {}
    for rotate in (False, True):
        m = ProductQuantizedEmbedding.from_embedding(emb, PQConfig(subvector_dim=4, code_bits=4, rotate=rotate), counts)
        got = m(torch.arange(N)).detach().numpy()
        err[rotate] = ((got - base.numpy()) ** 2).sum(1).mean()
    r = m.rotation.numpy()
    np.testing.assert_allclose(r @ r.T, np.eye(D), atol=1e-4)
    want = reconstruct(m) @ r  # codes decode in the rotated space, then turn back
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for batch in (1, 2, 20):
        h = torch.randn(batch, D)
        np.testing.assert_allclose(m.scores(h).detach().numpy(), h.numpy() @ want.T, rtol=1e-4, atol=1e-4)
    assert err[True] < err[False]
    assert m.nbytes() == N * 2 + 16 * D * 4 + D * D * 4  # codes, codebooks, R: the C kernel keeps no copy
    back = load_table(*m.state_for_save())
    assert torch.equal(back(torch.arange(N)), m(torch.arange(N)))


@pytest.mark.parametrize("hot", [[], [{"bits": 8, "fraction": 0.05}]])
def test_padding_row_is_exactly_zero_at_every_batch_size(source, hot):
    """nn.Embedding's padding row is zero; its PQ codes only approximate zero, so lookups write it."""
    emb, counts = source
    padded = torch.nn.Embedding(N, D, padding_idx=0)
    padded.weight.data[1:] = emb.weight.data[1:]
    counts = counts.copy()
    counts[0] = 0
    cfg = PQConfig(subvector_dim=4, code_bits=8, rotate=True, hot=hot)
    m = ProductQuantizedEmbedding.from_embedding(padded, cfg, counts)
    want = m(torch.arange(1, N)).detach().numpy()
    for ids in (torch.tensor([0, 3, 0, 7]), torch.from_numpy(np.random.default_rng(6).integers(0, N, 3000))):
        got = m(ids).detach().numpy()
        ids = ids.numpy()
        assert not got[ids == 0].any()
        np.testing.assert_allclose(got[ids != 0], want[ids[ids != 0] - 1], rtol=1e-5, atol=1e-6)


needs_kernel = pytest.mark.skipif(pq_native.library() is None, reason="no C compiler: the torch path is the only one")


@needs_kernel
@pytest.mark.parametrize("bits, rotate, hot, padding", [
    (8, True, [{"bits": 4, "fraction": 0.2}], None),
    (8, False, [{"bits": 8, "fraction": 0.07}], 0),
    (4, True, [], 5),
    (4, False, [{"bits": 32, "fraction": 0.05}, {"bits": 8, "fraction": 0.1}, {"bits": 4, "fraction": 0.1}], 3),
])
def test_fused_kernel_equals_the_torch_ops(source, bits, rotate, hot, padding):
    """The C kernel (inference) against the torch path (the one autograd sees) on the same table:
    every tier width it reads, both code widths, with and without the rotation folded into its rows."""
    emb, counts = source
    if padding is not None:
        emb = torch.nn.Embedding.from_pretrained(emb.weight.detach(), freeze=False, padding_idx=padding)
    cfg = PQConfig(subvector_dim=2 if bits == 4 else 4, code_bits=bits, rotate=rotate, hot=hot, iters=5)
    m = ProductQuantizedEmbedding.from_embedding(emb, cfg, counts)
    ids = torch.from_numpy(np.random.default_rng(7).integers(0, N, (3, 700)))
    ids[0, :5] = torch.tensor([0, 599, padding or 1, 2, 3])
    ids[2, 10:40] = ids[2, 10]  # runs of one id (the kernel copies the row it just wrote), as padded histories have
    ids[2, 40:60] = padding or 0
    hot_id = int(m.tier_ids[0].ids[0]) if hot else 1
    ids[2, 60:70] = hot_id
    with torch.no_grad():
        assert m._kernel() is not None
        want = m.lookup_torch(ids.reshape(-1))
        got = m(ids)
        np.testing.assert_allclose(got.reshape(-1, D).numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
        if padding is not None:
            assert not got[ids == padding].any()
        for one in (ids[0, :1], ids[0, 2:3], ids[1, ::7]):  # batch 1, the padding id alone, strided ids
            np.testing.assert_allclose(m(one).numpy(), m.lookup_torch(one.reshape(-1)).reshape(*one.shape, D).numpy(),
                                       rtol=1e-5, atol=1e-6)
        h = torch.randn(1, D)
        np.testing.assert_allclose(m.scores(h).numpy(), m.scores_torch(h).numpy(), rtol=1e-4, atol=1e-5)
        with pytest.raises(IndexError, match="out of range"):
            m(torch.tensor([1, N]))
    grad_path = m(ids[0])  # with autograd on, the torch path runs and the codebooks get gradients
    grad_path.sum().backward()
    assert m.codebooks.grad is not None and m.codebooks.grad.abs().sum() > 0


@needs_kernel
def test_fused_kernel_follows_codebook_updates_and_moves(source):
    """The kernel caches the rotated centroid rows: training the codebooks or loading new tensors must
    rebuild them, never serve stale rows."""
    emb, counts = source
    m = ProductQuantizedEmbedding.from_embedding(emb, PQConfig(subvector_dim=4, code_bits=8, rotate=True, iters=5), counts)
    ids = torch.arange(0, N, 7)
    with torch.no_grad():
        before = m(ids).clone()
        m.codebooks.mul_(2.0)  # in place: same storage, new version
        np.testing.assert_allclose(m(ids).numpy(), m.lookup_torch(ids).numpy(), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(m(ids), before)
        m16 = ProductQuantizedEmbedding.from_embedding(emb, PQConfig(subvector_dim=4, hot=[{"bits": 16, "fraction": 0.1}],
                                                                     iters=5), counts)
        assert m16._kernel() is None  # 16-bit tier rows: the kernel does not read them, torch runs
        back = load_table(*m.state_for_save())  # fresh tensors, a fresh kernel view
        np.testing.assert_allclose(back(ids).numpy(), m(ids).numpy(), rtol=1e-5, atol=1e-6)
        twin = copy.deepcopy(m)  # a copy (the planner's prefix cache makes them) reads its own tensors
        twin.codebooks.mul_(0.5)
        np.testing.assert_allclose(twin(ids).numpy(), twin.lookup_torch(ids).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m(ids).numpy(), m.lookup_torch(ids).numpy(), rtol=1e-5, atol=1e-6)


def test_rank_bitmap_gives_each_member_its_position_in_the_sorted_ids():
    """The kernel's O(1) tier lookup: rank of id = its index in the sorted tier ids (np.searchsorted),
    non-members not found; ids that are not strictly increasing get no bitmap (binary search instead)."""
    rng = np.random.default_rng(3)
    for n_rows in (1, 63, 64, 65, 1000, 4099):
        ids = np.unique(rng.integers(0, n_rows, max(1, n_rows // 5)))
        member, before = pq_native.rank_bitmap(torch.from_numpy(ids), n_rows)
        members = set(ids.tolist())
        for i in range(n_rows):
            w, b = i >> 6, i & 63
            inside = bool((int(member[w]) >> b) & 1)
            assert inside == (i in members)
            if inside:
                assert int(before[w]) + bin(int(member[w]) & ((1 << b) - 1)).count("1") == int(np.searchsorted(ids, i))
    assert pq_native.rank_bitmap(torch.tensor([3, 3, 5]), 10) is None
    assert pq_native.rank_bitmap(torch.tensor([5, 3]), 10) is None
    assert pq_native.rank_bitmap(torch.tensor([3, 10]), 10) is None
