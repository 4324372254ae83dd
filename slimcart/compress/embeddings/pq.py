"""Product quantization (Jégou, Douze & Schmid 2011) of an embedding table, frequency-aware.

Each row e in R^d is cut into M sub-vectors of width s = d / M; sub-space m has a codebook C_m of
K = 2^b centroids (b = 8 or 4 bits), and the row is stored as its M centroid indices:
    e ~= [C_1[c_1] | C_2[c_2] | ... | C_M[c_M]],      c_m = argmin_k ||e_m - C_m[k]||^2.
The codebooks are k-means centroids in each sub-space, every row weighted by its training-set count
(`weighting`: count + 1, its square root, or 1), so the rows the model meets most are reproduced
best; rows the `hot` tiers hold (the most frequent ones, at 32/16/8/4 bits as in mixed_precision.py:
sorted ids + their rows, found by binary search) take no part in the fit, since they are never read
from the codes.
With `rotate` (OPQ, Ge et al. 2013) the rows are first turned by an orthonormal R fitted in faiss, so
their variance spreads over the sub-spaces: e ~= [C_1[c_1] | ... | C_M[c_M]] R (R costs d^2 floats).
Bytes = N * M * b / 8 (codes) + M * K * s * 4 (float32 codebooks, trainable by a following `recover`)
+ sum_t K_t (row_bytes(b_t) + 4). At b = 8 and s = 4 a row costs 1 byte per 4 values: 2 bits per
value with no per-row scale and offset, which row-wise int2 pays 4 more bytes a row for (12 bytes
instead of 8 at d = 32: 10.7x at best there, where this reaches 16x less the codebooks).

Lookup: gather the requested rows' codes, then one F.embedding over the M codebooks stacked as
(M K) x s rows at index c_m + m K, reshaped to (n, d) (times R); tier rows replace theirs (for many
ids they are read first and only the other rows decoded); the padding row is exactly zero. At
inference the same lookup (and a single query's scoring) runs as one fused C call instead
(pq_native.py): the op chain's dispatch cost dominated at batch 1.
Scoring every row: asymmetric distance computation h E^T = sum_m ((h R^T)_m C_m^T)[:, c_m] (M small
products B x K, then per row M gathers summed; no row decoded; tier rows scored on their own: see `scores`).
k-means runs in faiss (a well-kept, fast implementation, seeded); only the layout and the lookup are
written here.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import SlimcartError
from .base import (
    CompressedEmbedding,
    RowOverrides,
    check_frequencies,
    register_table,
    table_shape,
    tensor,
)
from . import pq_native
from .packed_rows import PackedRows
from .rowwise import bag_mode, source_weight

CODE_BITS = (8, 4)
LARGE_LOOKUP = 1024  # ids per call from which only rows no tier (nor padding) holds are decoded
WEIGHTINGS = ("count", "sqrt_count", "none")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, M) codes in [0, 2^bits) -> uint8 (N, M * bits / 8); at 4 bits the even sub-space is the low nibble."""
    codes = codes.to(torch.uint8)
    return codes if bits == 8 else (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack_codes`, as int64 (N, M)."""
    if bits == 8:
        return packed.long()
    return torch.stack([packed & 15, packed >> 4], -1).reshape(packed.shape[0], -1).long()


def weights_of(frequencies, n: int, weighting: str) -> np.ndarray | None:
    if weighting == "none":
        return None
    f = check_frequencies(frequencies, n).numpy() + 1.0  # unseen rows still count (test ids may be unseen)
    return (f if weighting == "count" else np.sqrt(f)).astype(np.float32)


def fit_rotation(w: np.ndarray, subvectors: int, bits: int, fit_rows: np.ndarray, iters: int) -> np.ndarray:
    """OPQ's orthonormal R (d, d) (Ge et al. 2013, faiss.OPQMatrix alternating a Procrustes rotation and
    a PQ of `bits`-bit codes): rows rotated as w R^T spread their variance over the sub-spaces, so PQ of
    the rotated rows loses less; w ~= PQ(w R^T) R."""
    import faiss

    d = w.shape[1]
    opq = faiss.OPQMatrix(d, subvectors)
    pq = faiss.ProductQuantizer(d, subvectors, bits)  # kept referenced while opq uses it
    pq.cp.min_points_per_centroid = 1  # small tables: fit on every row, without faiss's warning
    opq.pq, opq.niter, opq.verbose = pq, iters, False
    opq.train(np.ascontiguousarray(w[fit_rows], dtype=np.float32))
    return faiss.vector_to_array(opq.A).reshape(d, d).astype(np.float32)


def fit_codebooks(w: np.ndarray, subvectors: int, bits: int, weights: np.ndarray | None, fit_rows: np.ndarray,
                  iters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(codebooks (M, K, s) float32, codes (N, M) int64): weighted k-means on `fit_rows` per sub-space,
    then every row's nearest centroid."""
    import faiss

    n, d = w.shape
    k, s = 1 << bits, d // subvectors
    if len(fit_rows) < k:
        raise SlimcartError(f"product quantization with {k} centroids needs at least {k} rows to fit, got {len(fit_rows)}")
    books, codes = np.empty((subvectors, k, s), np.float32), np.empty((n, subvectors), np.int64)
    for m in range(subvectors):
        x = np.ascontiguousarray(w[:, m * s:(m + 1) * s], dtype=np.float32)
        # every fitted row takes part (faiss would subsample beyond 256 points a centroid and warn below 39)
        km = faiss.Kmeans(s, k, niter=iters, seed=seed + m, verbose=False, min_points_per_centroid=1,
                          max_points_per_centroid=-(-len(fit_rows) // k) + 1)
        km.train(np.ascontiguousarray(x[fit_rows]), weights=None if weights is None else np.ascontiguousarray(weights[fit_rows]))
        books[m] = km.centroids
        codes[:, m] = km.index.search(x, 1)[1][:, 0]
    return books, codes


@register_table
class ProductQuantizedEmbedding(CompressedEmbedding):
    """M codes per row into M codebooks, plus optional hot-row tiers."""

    kind = "pq"
    lookup_zeroes_padding = True  # both paths write the padding row as zeros (its codes only approximate it)

    def __init__(self, codes: torch.Tensor, codebooks: torch.Tensor, code_bits: int,
                 tiers: list[tuple[RowOverrides, PackedRows]] = (), padding_idx=None, mode=None,
                 rotation: torch.Tensor | None = None):
        m, k, s = codebooks.shape
        super().__init__(codes.shape[0], m * s, padding_idx, mode)
        if code_bits not in CODE_BITS or k != 1 << code_bits:
            raise SlimcartError(f"product quantization takes {CODE_BITS}-bit codes with 2^bits centroids, got {code_bits} "
                                f"bits and {k} centroids")
        if codes.dtype != torch.uint8 or codes.dim() != 2 or codes.shape[1] * 8 != m * code_bits:
            raise SlimcartError(f"codes must be uint8 [n, {m * code_bits // 8}] for {m} sub-spaces at {code_bits} bits")
        self.code_bits, self.subvectors, self.centroids = code_bits, m, k
        self.register_buffer("codes", codes.contiguous())
        self.codebooks = nn.Parameter(codebooks.float().contiguous())
        self._shift32 = (torch.arange(m) * k).to(torch.int32)  # scratch (sub-space m's rows start at m K), not storage
        if code_bits == 4:  # scratch: byte value of byte column j -> its two shifted codes, one gather instead of
            byte = torch.arange(256)  # mask, shift, stack and add (each a separate op at batch 1)
            pair = torch.arange(m // 2)[:, None]
            self._lut32 = torch.stack([(byte & 15) + 2 * pair * k, (byte >> 4) + (2 * pair + 1) * k], -1) \
                .reshape(-1, 2).to(torch.int32)
            self._byte_base32 = (torch.arange(m // 2) * 256).to(torch.int32)
        if rotation is not None and tuple(rotation.shape) != (m * s, m * s):
            raise SlimcartError(f"a product-quantized table's rotation must be {m * s} x {m * s}")
        self.register_buffer("rotation", None if rotation is None else rotation.float().contiguous())
        self._native = None  # the fused C kernel's view of this table (pq_native.py), made on first use
        self.tier_ids = nn.ModuleList(t[0] for t in tiers)
        self.tier_rows = nn.ModuleList(t[1] for t in tiers)
        for ids, rows in tiers:
            if len(ids) != len(rows) or rows.dim != self.embedding_dim:
                raise SlimcartError("a product-quantized table's tier needs one row of the table's width per id")
            if len(ids) and int(ids.ids[-1]) >= self.num_embeddings:
                raise SlimcartError("a product-quantized table's tier holds an id beyond the table")

    @classmethod
    def from_embedding(cls, emb: nn.Module, config, frequencies=None) -> ProductQuantizedEmbedding:
        w = source_weight(emb).float()
        n, d = w.shape
        if d % config.subvector_dim:
            raise SlimcartError(f"sub-vector width {config.subvector_dim} must divide the table's width {d}")
        subvectors = d // config.subvector_dim
        if config.code_bits == 4 and subvectors % 2:
            raise SlimcartError(f"4-bit codes pack two a byte: {d} / {config.subvector_dim} = {subvectors} sub-vectors must be even")
        weights = weights_of(frequencies, n, config.weighting)
        hot = torch.zeros(n, dtype=torch.bool)
        tiers = []
        if config.hot:
            freq = check_frequencies(frequencies, n)
            order, start = torch.sort(freq, descending=True, stable=True).indices, 0
            for tier in config.hot:
                k = min(n - start, round(tier.fraction * n))
                ids = torch.sort(order[start: start + k]).values
                ids = ids[freq[ids] > 0]  # rows never seen in training gain nothing from precision
                start += k
                hot[ids] = True
                tiers.append((RowOverrides(ids), PackedRows.pack(w[ids], tier.bits, tier.bits in (4, 2),
                                                                 trainable=tier.bits == 32, copy=False)))
        fit_rows, x, rotation = np.flatnonzero(~hot.numpy()), w.numpy(), None
        if config.rotate:
            rotation = fit_rotation(x, subvectors, config.code_bits, fit_rows, config.iters)
            x = x @ rotation.T
        books, codes = fit_codebooks(x, subvectors, config.code_bits, weights, fit_rows, config.iters, config.seed)
        return cls(pack_codes(torch.from_numpy(codes), config.code_bits), torch.from_numpy(books), config.code_bits,
                   tiers, emb.padding_idx, bag_mode(emb), None if rotation is None else torch.from_numpy(rotation))

    def _centroid_index(self, codes: torch.Tensor) -> torch.Tensor:
        """Packed codes (n, bytes) -> rows of the stacked (M K) x s codebooks (n, M), int32: at 8 bits one
        add whose uint8 + int32 promotion replaces a separate widening pass (~1 ms per 50k ids)."""
        if self.code_bits == 8:
            return torch.add(codes, self._shift32)
        return self._lut32[torch.add(codes, self._byte_base32)]

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Rows from their packed codes, in the rotated frame (no R applied, no tiers): (n, d)."""
        return F.embedding(self._centroid_index(codes), self.codebooks.view(-1, self.codebooks.shape[-1])) \
            .view(codes.shape[0], self.embedding_dim)

    def _rotate(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.rotation is None else torch.mm(rows, self.rotation)

    def __getstate__(self):
        """Copies and pickles leave the kernel's view behind (raw pointers into this table's tensors):
        a copy makes its own on first use."""
        state = self.__dict__.copy()
        state["_native"] = None
        return state

    def _kernel(self) -> pq_native.NativePQ | None:
        """The fused C kernel, where this call may use it: float32 on the CPU, inference only. (At 12.8k
        and 51k ids, d = 32 and 64, it measured as fast as the torch path or faster, padding included.)"""
        k = self._native
        if k is None:
            ok = pq_native.NativePQ.supported(self) and pq_native.library() is not None
            k = self._native = pq_native.NativePQ(self) if ok else False
        if not k or not pq_native.inference_only():
            return None
        books = self._parameters["codebooks"]
        return k if books.dtype == torch.float32 and books.device.type == "cpu" else None

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of flat ids; the padding row is exactly zero, as nn.Embedding's (its codes only approximate it)."""
        k = self._kernel()
        return k.lookup(ids) if k is not None else self.lookup_torch(ids)

    def lookup_torch(self, ids: torch.Tensor) -> torch.Tensor:
        """`lookup` in torch ops (autograd, tracing, export; and the reference the kernel is tested against)."""
        tiers = [(held, rows) for held, rows in zip(self.tier_ids, self.tier_rows) if len(held)]
        pad = None if self.padding_idx is None else (ids == self.padding_idx).unsqueeze(1)
        if ids.numel() < LARGE_LOOKUP or (not tiers and pad is None):
            # As few torch calls as possible: at batch 1 each costs microseconds against an nn.Embedding's
            # one; index_select gathers the code rows ~3x faster than advanced indexing at 50k ids.
            out = self._rotate(self._decode(self.codes.index_select(0, ids)))
            for held, rows in tiers:
                hit, pos = held.locate(ids)
                out = torch.where(hit.unsqueeze(1), rows.lookup(pos), out)
            return out if pad is None else out.masked_fill(pad, 0.0)
        # Many ids (a batch of left-padded histories is mostly padding and hot items): tier rows first,
        # then decode and rotate only the rows that neither a tier nor padding covers.
        out, covered = None, None if pad is None else pad.squeeze(1)
        for held, rows in tiers:
            hit, pos = held.locate(ids)
            val = rows.lookup(pos)
            out = val if out is None else torch.where(hit.unsqueeze(1), val, out)
            covered = hit if covered is None else covered | hit
        if out is None:
            out = self.codebooks.new_zeros(ids.numel(), self.embedding_dim)
        miss = (~covered).nonzero().squeeze(1)
        out.index_copy_(0, miss, self._rotate(self._decode(self.codes.index_select(0, ids.index_select(0, miss)))))
        return out if pad is None else out.masked_fill_(pad, 0.0)

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """h E^T for every row by asymmetric distance computation: T = (h R^T)_m C_m^T, a (B, M K) table of
        h's sub-vector products with every centroid, then each row's score is the sum of its M entries of T.
        One query gathers from T directly; a batch sums through F.embedding_bag over T^T, whose rows are
        B wide, so one fused gather-and-add kernel yields out^T (N, B): N M B adds instead of the N d B
        multiply-adds of the float GEMM (4x fewer at 4 values a code). On a SASRec table the gather-and-add
        alone ran 1.6-1.9x faster than the fp32 GEMM at batch 64-256; with the product table, the index
        and the tier rows the whole call is about on par with it at 256 (tile decoding + GEMM: ~0.65x).
        Tier rows are scored on their own and enter the same sum."""
        kernel = self._kernel() if h.shape[0] == 1 and h.dtype == torch.float32 else None
        if kernel is not None:  # one pass over the codes, tier rows and padding in the same call
            return kernel.scores1(self._product_table(h).view(-1), h.view(-1))
        return self.scores_torch(h)

    def _product_table(self, h: torch.Tensor) -> torch.Tensor:
        """T = (h R^T)_m C_m^T: (B, M K), each query's sub-vector products with every centroid."""
        b, (m, k, s) = h.shape[0], self.codebooks.shape
        hr = h if self.rotation is None else h @ self.rotation.t()  # h (P R)^T = (h R^T) P^T
        return torch.einsum("bms,mks->bmk", hr.reshape(b, m, s), self.codebooks).reshape(b, m * k)

    def scores_torch(self, h: torch.Tensor) -> torch.Tensor:
        """`scores` in torch ops (autograd; and the reference the kernel is tested against)."""
        b, (m, k, s) = h.shape[0], self.codebooks.shape
        table = self._product_table(h)
        idx = self._centroid_index(self.codes).view(self.num_embeddings, m)
        if b == 1:  # embedding_bag over a one-column table is pathological (~30x slower than this gather)
            out = table.index_select(1, idx.view(-1)).view(1, self.num_embeddings, m).sum(-1)
            for held, rows in zip(self.tier_ids, self.tier_rows):
                if len(held):
                    out[:, held.ids.long()] = rows.scores_tiled(h)
            return self._zero_padding_column(out)
        # Tier rows join the same kernel: each one's M indices all point at an extra row of the summed
        # table holding 1/M of its score (scored on its own), so no strided or row scatter follows
        # (index_copy of 6.6k rows into out^T cost as much as the whole gather-and-add).
        n_tier = sum(len(held) for held in self.tier_ids)
        weight = h.new_empty(m * k + n_tier, b)  # filled in place: concatenating transposed parts costs ~5 ms
        weight[: m * k] = table.t()
        base, h_t = m * k, h.t() / m
        for held, rows in zip(self.tier_ids, self.tier_rows):
            if len(held):
                idx[held.ids.long()] = torch.arange(base, base + len(held), dtype=idx.dtype).unsqueeze(1)
                weight[base: base + len(held)] = rows.rows(0, len(rows)) @ h_t  # contiguous rows: a cheap copy
                base += len(held)
        out_t = F.embedding_bag(idx, weight, mode="sum")
        return self._zero_padding_column(out_t.t())

    def state_for_save(self):
        tensors = {"codes": self.codes, "codebooks": self.codebooks.detach()}
        if self.rotation is not None:
            tensors["rotation"] = self.rotation
        for t, (held, rows) in enumerate(zip(self.tier_ids, self.tier_rows)):
            tensors[f"tier{t}.ids"] = held.ids
            tensors.update(rows.state(f"tier{t}."))
        return tensors, self._meta(code_bits=self.code_bits, tier_bits=[r.bits for r in self.tier_rows])

    @classmethod
    def from_saved(cls, tensors, meta):
        n, d, pad, mode = table_shape(meta)
        bits = int(meta.get("code_bits", 0))
        books = tensor(tensors, "codebooks", torch.float32)
        if books.dim() != 3 or books.shape[0] * books.shape[2] != d:
            raise SlimcartError(f"saved codebooks have shape {tuple(books.shape)} for a table of width {d}")
        codes = tensor(tensors, "codes", torch.uint8)
        if codes.shape[0] != n:
            raise SlimcartError(f"saved codes have {codes.shape[0]} rows for a table of {n}")
        tiers = []
        for t, tb in enumerate(meta.get("tier_bits", [])):
            ids = tensor(tensors, f"tier{t}.ids")
            tiers.append((RowOverrides(ids.clone()), PackedRows.from_state(tensors, f"tier{t}.", int(tb), d,
                                                                         trainable=int(tb) == 32)))
        rotation = tensor(tensors, "rotation", torch.float32, (d, d)).clone() if "rotation" in tensors else None
        return cls(codes, books.clone(), bits, tiers, pad, mode, rotation)
