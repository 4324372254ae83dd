"""Frequency-aware tables: mixed precision (hot tiers over a low-bit base) and row pruning (rare rows
share a fallback), against numpy references built from the source table and the counts."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_embeddings_rowwise import numpy_dequant

from slimcart.compress.embeddings import (
    MixedPrecisionConfig,
    MixedPrecisionEmbedding,
    PrunedRowsEmbedding,
    PruneRowsConfig,
    load_table,
)
from slimcart.errors import SlimcartError

pytestmark = pytest.mark.usefixtures("one_thread")
N, D = 400, 16


@pytest.fixture
def source():
    torch.manual_seed(1)
    emb = torch.nn.Embedding(N, D)
    rng = np.random.default_rng(1)
    counts = rng.zipf(1.3, N).astype(np.float64)
    counts[rng.choice(N, 60, replace=False)] = 0  # never seen in training
    return emb, counts


def hottest(counts: np.ndarray, start: int, k: int) -> np.ndarray:
    """Ids ranked start..start+k by count (ties: smaller id first), that were seen at all."""
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))[start: start + k]
    return np.array(sorted(i for i in order if counts[i] > 0), dtype=np.int64)


def test_mixed_precision_tiers_hold_the_hottest_rows(source):
    emb, counts = source
    cfg = MixedPrecisionConfig(tiers=[{"bits": 32, "fraction": 0.02}, {"bits": 8, "fraction": 0.1}], tail_bits=2)
    m = MixedPrecisionEmbedding.from_embedding(emb, cfg, counts)
    fp32_ids, int8_ids = hottest(counts, 0, 8), hottest(counts, 8, 40)
    assert m.tier_ids[0].ids.tolist() == fp32_ids.tolist() and m.tier_ids[1].ids.tolist() == int8_ids.tolist()
    w = emb.weight.detach().numpy()
    want = numpy_dequant(m.base.data.numpy(), 2, D)  # the 2-bit base for every row ...
    want[int8_ids] = numpy_dequant(m.tier_rows[1].data.numpy(), 8, D)  # ... the int8 tier over it ...
    want[fp32_ids] = w[fp32_ids]  # ... and the hottest rows exactly
    ids = torch.arange(N)
    got = m(ids).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.array_equal(got[fp32_ids], w[fp32_ids])
    # the 2-bit base itself quantized the source rows (not something else)
    assert np.abs(numpy_dequant(m.base.data.numpy(), 2, D) - w).max() < 0.6 * np.ptp(w, 1).max() / 3 + 1e-3
    h = torch.randn(3, D)
    np.testing.assert_allclose(m.scores(h).numpy(), h.numpy() @ want.T, rtol=1e-4, atol=1e-4)
    assert m.nbytes() == N * (D // 4 + 4) + len(fp32_ids) * (4 * D + 4) + len(int8_ids) * (D + 8 + 4)


def test_mixed_precision_int_matmul_base_and_save_load(source, tmp_path):
    emb, counts = source
    m = MixedPrecisionEmbedding.from_embedding(emb, MixedPrecisionConfig(score_kernel="int_mm"), counts)
    h = torch.randn(2, D)
    ref = h.numpy() @ m.dequantize().numpy().T
    hot = m.tier_ids[0].ids.long()
    np.testing.assert_allclose(m.scores(h).numpy()[:, hot], ref[:, hot], rtol=1e-5, atol=1e-5)  # fp32 cache: exact
    assert np.abs(m.scores(h).numpy() - ref).max() < 0.05 * np.abs(ref).max()  # int4 base on the bf16 kernel
    tensors, meta = m.state_for_save()
    save_file(tensors, str(tmp_path / "m.safetensors"))
    back = load_table(load_file(str(tmp_path / "m.safetensors")), meta)
    ids = torch.randint(0, N, (50,))
    assert torch.equal(back(ids), m(ids)) and torch.equal(back.scores(h), m.scores(h))
    assert back.nbytes() == m.nbytes()


def test_mixed_precision_bad_configs():
    with pytest.raises(SlimcartError, match="more bits than the tail"):
        MixedPrecisionConfig(tiers=[{"bits": 4, "fraction": 0.1}], tail_bits=4)
    with pytest.raises(SlimcartError, match="more than 1"):
        MixedPrecisionConfig(tiers=[{"bits": 32, "fraction": 0.6}, {"bits": 8, "fraction": 0.6}])
    with pytest.raises(SlimcartError, match="frequencies have 3 entries"):
        MixedPrecisionEmbedding.from_embedding(torch.nn.Embedding(5, 4), MixedPrecisionConfig(), np.ones(3))
    with pytest.raises(SlimcartError, match="non-negative"):
        MixedPrecisionEmbedding.from_embedding(torch.nn.Embedding(5, 4), MixedPrecisionConfig(), -np.ones(5))
    with pytest.raises(SlimcartError, match="pass frequencies"):
        MixedPrecisionEmbedding.from_embedding(torch.nn.Embedding(5, 4), MixedPrecisionConfig(), None)


def test_pruned_rows_share_the_count_weighted_fallback(source):
    emb, counts = source
    p = PrunedRowsEmbedding.from_embedding(emb, PruneRowsConfig(min_count=2), counts)
    w = emb.weight.detach().numpy()
    kept = np.nonzero(counts >= 2)[0]
    dropped = np.nonzero(counts < 2)[0]
    wt = counts[dropped]
    fallback = (w[dropped] * wt[:, None]).sum(0) / wt.sum()
    want = np.tile(fallback, (N, 1))
    want[kept] = w[kept]
    got = p(torch.arange(N)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert p.kept.ids.tolist() == kept.tolist()
    assert p.nbytes() == len(kept) * (4 * D + 4) + 4 * D
    h = torch.randn(3, D)
    np.testing.assert_allclose(p.scores(h).detach().numpy(), h.numpy() @ want.T, rtol=1e-5, atol=1e-5)


def test_pruned_by_fraction_with_int4_rows_and_padding(tmp_path):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(100, 8, padding_idx=0)
    counts = np.arange(100, dtype=np.float64)[::-1].copy()  # id 0 most frequent, but it is the padding
    p = PrunedRowsEmbedding.from_embedding(emb, PruneRowsConfig(keep_fraction=0.1, bits=4, fallback="zero"), counts)
    assert p.kept.ids.tolist() == list(range(1, 10))  # top 10% = ids 0..9, less the padding id
    assert torch.equal(p(torch.tensor([0, 50])), torch.zeros(2, 8))  # padding and a pruned id (zero fallback)
    np.testing.assert_allclose(p(torch.arange(1, 10)).detach().numpy(), numpy_dequant(p.rows.data.numpy(), 4, 8),
                               rtol=1e-6, atol=1e-6)
    tensors, meta = p.state_for_save()
    save_file(tensors, str(tmp_path / "p.safetensors"))
    back = load_table(load_file(str(tmp_path / "p.safetensors")), meta)
    ids = torch.randint(0, 100, (30,))
    assert torch.equal(back(ids), p(ids))


def test_pruned_fp32_rows_and_fallback_train():
    emb = torch.nn.Embedding(20, 4)
    p = PrunedRowsEmbedding.from_embedding(emb, PruneRowsConfig(min_count=1), np.r_[np.ones(10), np.zeros(10)])
    p(torch.tensor([1, 15])).sum().backward()
    assert p.rows.data.grad[1].abs().sum() > 0 and p.fallback.grad.abs().sum() > 0
