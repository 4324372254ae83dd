"""Row-wise quantized tables: the fused layout against hand-packed bytes, the kernels' lookups, bags and
scores against a numpy dequantization of those bytes, exact bytes, and save/load."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from slimcart.compress.embeddings import (
    RowwiseConfig,
    RowwiseQuantEmbedding,
    load_table,
)
from slimcart.compress.embeddings.int_matmul import IntMatmulScores
from slimcart.compress.embeddings.packed_rows import PackedRows
from slimcart.errors import SlimcartError

pytestmark = pytest.mark.usefixtures("one_thread")


def numpy_dequant(data: np.ndarray, bits: int, dim: int) -> np.ndarray:
    """Independent reading of the fused layout: codes (lower bits first), then scale and bias."""
    n = data.shape[0]
    if bits == 8:
        codes = data[:, :dim].astype(np.float32)
        scale = data[:, dim: dim + 4].copy().view(np.float32)[:, 0]
        bias = data[:, dim + 4: dim + 8].copy().view(np.float32)[:, 0]
    else:
        per = 8 // bits
        pdim = -(-dim // per) * per
        nb = pdim // per
        packed = data[:, :nb].astype(np.int64)
        codes = np.zeros((n, pdim), np.float32)
        for t in range(per):
            codes[:, t::per] = (packed >> (bits * t)) & ((1 << bits) - 1)
        codes = codes[:, :dim]
        sb = data[:, nb: nb + 4].copy().view(np.float16).astype(np.float32)
        scale, bias = sb[:, 0], sb[:, 1]
    return codes * scale[:, None] + bias[:, None]


def table(n=300, d=16, seed=0, padding_idx=None, bag=None):
    torch.manual_seed(seed)
    if bag:
        emb = torch.nn.EmbeddingBag(n, d, mode=bag)
    else:
        emb = torch.nn.Embedding(n, d, padding_idx=padding_idx)
    with torch.no_grad():
        emb.weight.mul_(torch.linspace(0.1, 3.0, n)[:, None])  # rows of very different ranges
        if padding_idx is not None:
            emb.weight[padding_idx].zero_()
    return emb


def test_hand_packed_rows_equal_the_prepacked_layout():
    f16 = lambda x: list(np.array([x], np.float16).view(np.uint8))
    w4 = torch.arange(16.0)[None]  # min 0, max 15: scale 1, codes = values
    want4 = [c0 | (c1 << 4) for c0, c1 in zip(range(0, 16, 2), range(1, 16, 2))] + f16(1.0) + f16(0.0)
    assert PackedRows.pack(w4, 4).data[0].tolist() == want4
    w2 = torch.tensor([[-1.5, -0.5, 0.5, 1.5, 1.5, 0.5, -0.5, -1.5]])  # scale 1, bias -1.5, codes 0 1 2 3 3 2 1 0
    want2 = [0 | 1 << 2 | 2 << 4 | 3 << 6, 3 | 2 << 2 | 1 << 4 | 0 << 6] + f16(1.0) + f16(-1.5)
    assert PackedRows.pack(w2, 2).data[0].tolist() == want2
    w8 = torch.arange(256.0)[None] * 0.5 - 10  # scale 0.5, bias -10, codes 0..255
    want8 = list(range(256)) + list(np.array([0.5, -10.0], np.float32).view(np.uint8))
    assert PackedRows.pack(w8, 8).data[0].tolist() == want8


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_unpacked_codes_match_the_reference_reading(bits):
    emb = table()
    rows = PackedRows.pack(emb.weight, bits)
    data = rows.data.numpy()
    deq = numpy_dequant(data, bits, 16)
    codes = rows.unpack_codes().numpy().astype(np.float32)
    scale, bias = (t.numpy() for t in rows.scale_bias())
    np.testing.assert_allclose(codes * scale[:, None] + bias[:, None], deq, rtol=0, atol=0)


@pytest.mark.parametrize("bits,dim", [(8, 16), (4, 16), (2, 16), (4, 6), (2, 10), (8, 7)])
def test_kernel_lookups_equal_numpy_dequantization_and_stay_within_the_error_bound(bits, dim):
    emb = table(d=dim)
    q = RowwiseQuantEmbedding.from_embedding(emb, RowwiseConfig(bits=bits))
    ids = torch.randint(0, 300, (5, 7))
    got = q(ids)
    assert got.shape == (5, 7, dim) and got.dtype == torch.float32
    ref = numpy_dequant(q.rows.data.numpy(), bits, dim)
    np.testing.assert_allclose(got.numpy(), ref[ids.numpy()], rtol=1e-6, atol=1e-6)
    # Quantization error: half a step, plus float16 rounding of scale (times the code) and bias.
    w = emb.weight.detach().numpy()
    step = (w.max(1) - w.min(1)) / (2**bits - 1)
    slack = 2.0**-10 * (2**bits) * step + 2.0**-10 * np.abs(w).max(1) if bits < 8 else 1e-6 * np.abs(w).max(1)
    assert (np.abs(ref - w) <= (0.5 * step + slack)[:, None] + 1e-7).all()


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_bags_pool_in_the_fused_kernel_as_a_numpy_reference(bits, mode):
    emb = table(bag=mode)
    q = RowwiseQuantEmbedding.from_embedding(emb, RowwiseConfig(bits=bits))
    ids = torch.tensor([3, 7, 7, 100, 299, 0, 5])
    offsets = torch.tensor([0, 3, 3, 6])  # bags of 3, 0, 3, 1 ids (an empty bag pools to zeros)
    ref = numpy_dequant(q.rows.data.numpy(), bits, 16)[ids.numpy()]
    bags = [ref[0:3], ref[3:3], ref[3:6], ref[6:7]]
    pool = (lambda b: b.sum(0)) if mode == "sum" else (lambda b: b.mean(0) if len(b) else np.zeros(16, np.float32))
    want = np.stack([pool(b) if len(b) else np.zeros(16, np.float32) for b in bags])
    np.testing.assert_allclose(q(ids, offsets).numpy(), want, rtol=1e-5, atol=1e-5)
    fixed = torch.tensor([[1, 2], [3, 4]])  # 2-D ids: fixed-length bags
    np.testing.assert_allclose(q(fixed).numpy(), np.stack([pool(numpy_dequant(q.rows.data.numpy(), bits, 16)[r])
                                                          for r in fixed.numpy()]), rtol=1e-5, atol=1e-5)
    if mode == "sum":
        w = torch.tensor([0.5, 2.0, -1.0, 1.0, 1.0, 3.0, 0.25])
        want_w = np.stack([(ref[s:e] * w.numpy()[s:e, None]).sum(0) for s, e in [(0, 3), (3, 3), (3, 6), (6, 7)]])
        np.testing.assert_allclose(q(ids, offsets, w).numpy(), want_w, rtol=1e-5, atol=1e-5)


def test_padding_row_is_zero_and_bags_skip_it():
    emb = table(padding_idx=0)
    q = RowwiseQuantEmbedding.from_embedding(emb, RowwiseConfig(bits=4))
    assert torch.equal(q(torch.tensor([0, 0])), torch.zeros(2, 16))
    bag = torch.nn.EmbeddingBag(50, 8, mode="mean", padding_idx=0)
    qb = RowwiseQuantEmbedding.from_embedding(bag, RowwiseConfig(bits=8))
    ids, offsets = torch.tensor([0, 4, 6, 0]), torch.tensor([0, 2])
    ref = numpy_dequant(qb.rows.data.numpy(), 8, 8)
    want = np.stack([ref[4], ref[6]])  # mean over non-padding ids only, as nn.EmbeddingBag
    np.testing.assert_allclose(qb(ids, offsets).numpy(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits,dim", [(8, 16), (4, 16), (2, 16), (4, 10), (8, 40)])
def test_scores_tiled_exact_and_int_matmul_within_the_bfloat16_bound(bits, dim):
    emb = table(n=77, d=dim)  # 77 rows: not a multiple of the int4 kernel's 16-row blocks
    h = torch.randn(5, dim)
    tiled = RowwiseQuantEmbedding.from_embedding(emb, RowwiseConfig(bits=bits))
    ref = h.double().numpy() @ numpy_dequant(tiled.rows.data.numpy(), bits, dim).astype(np.float64).T
    np.testing.assert_allclose(tiled.scores(h).numpy(), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tiled.rows.scores_tiled(h, tile=10).numpy(), ref, rtol=1e-5, atol=1e-5)  # ragged tiles
    fast = RowwiseQuantEmbedding.from_embedding(emb, RowwiseConfig(bits=bits, score_kernel="int_mm"))
    codes = fast.rows.unpack_codes()[:, :dim].double().numpy()
    scale = fast.rows.scale_bias()[0].double().numpy()
    zero = {8: 128, 4: 8, 2: 2}[bits]
    # bfloat16 activations (2**-9 relative each) and output (2**-9 of |h . (q - z)|), times the scale
    bound = 2.0**-7 * (np.abs(h.double().numpy()) @ np.abs(codes - zero).T) * scale + 1e-5
    assert (np.abs(fast.scores(h).double().numpy() - ref) <= bound).all()


def test_int4_conversion_in_chunks_equals_one_conversion():
    rows = PackedRows.pack(torch.randn(3000, 64), 4)
    assert torch.equal(IntMatmulScores(rows, chunk=1024).packed, IntMatmulScores(rows, chunk=4096).packed)


@pytest.mark.parametrize("bits,dim,per_row", [(8, 64, 72), (4, 64, 36), (2, 64, 20), (4, 10, 9), (2, 10, 7)])
def test_exact_bytes(bits, dim, per_row):
    q = RowwiseQuantEmbedding.from_embedding(torch.nn.Embedding(123, dim), RowwiseConfig(bits=bits))
    assert q.nbytes() == 123 * per_row == q.saved_nbytes()
    if bits == 4 and dim == 64:  # the int-matmul scoring copy: codes, unit (scale, zero) bf16, fp32 scale + offset
        fast = RowwiseQuantEmbedding.from_embedding(torch.nn.Embedding(123, dim), RowwiseConfig(bits=4, score_kernel="int_mm"))
        npad = 128
        assert fast.nbytes() == 123 * 36 + npad * 32 + npad * 2 * 2 + 123 * 8


@pytest.mark.parametrize("kernel", ["tiled", "int_mm"])
def test_save_load_round_trip(tmp_path, kernel):
    q = RowwiseQuantEmbedding.from_embedding(table(bag="sum"), RowwiseConfig(bits=4, score_kernel=kernel))
    tensors, meta = q.state_for_save()
    save_file(tensors, str(tmp_path / "t.safetensors"))
    back = load_table(load_file(str(tmp_path / "t.safetensors")), meta)
    ids, offsets, h = torch.tensor([1, 2, 3, 9]), torch.tensor([0, 1]), torch.randn(2, 16)
    assert type(back) is RowwiseQuantEmbedding and back.mode == "sum"
    assert torch.equal(back(ids, offsets), q(ids, offsets)) and torch.equal(back.scores(h), q.scores(h))


def test_bad_inputs_are_one_clear_error():
    with pytest.raises(SlimcartError, match="optimized_range"):
        RowwiseConfig(bits=8, optimized_range=True)
    with pytest.raises(SlimcartError, match="max_norm"):
        RowwiseQuantEmbedding.from_embedding(torch.nn.Embedding(5, 4, max_norm=1.0), RowwiseConfig())
    with pytest.raises(SlimcartError, match="mode 'max'"):
        RowwiseQuantEmbedding.from_embedding(torch.nn.EmbeddingBag(5, 4, mode="max"), RowwiseConfig())
    with pytest.raises(SlimcartError, match="lacks tensor"):
        load_table({}, {"kind": "rowwise", "num_embeddings": 3, "embedding_dim": 4, "bits": 4})
    with pytest.raises(SlimcartError, match="unknown compressed embedding kind"):
        load_table({}, {"kind": "nope"})
    with pytest.raises(SlimcartError, match="must be torch.uint8"):
        PackedRows(torch.zeros(3, 6), 4, 4)


def test_fast_path_follows_changing_batch_sizes_and_moves():
    emb = table()
    q = RowwiseQuantEmbedding.from_embedding(emb, RowwiseConfig(bits=4))
    ref = numpy_dequant(q.rows.data.numpy(), 4, 16)
    for n in (5, 3, 3, 1, 8):
        ids = torch.randint(0, 300, (n,))
        np.testing.assert_allclose(q(ids).numpy(), ref[ids.numpy()], rtol=1e-6, atol=1e-6)
    q.to(torch.device("cpu"))  # _apply refreshes the kernel's view of the rows
    assert q._fast[1] is q.rows.data
