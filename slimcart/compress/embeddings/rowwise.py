"""Row-wise int8 / int4 / int2 tables (per-row scale and offset) on fused lookup kernels.

Every row i is stored as codes q_i in [0, 2**b - 1]^d with its own scale s_i and offset m_i, so
E[i] ~= q_i * s_i + m_i (packed_rows.py has the layout and error bound). Bytes per row for d = 64:
int8 72 (28.1% of float32's 256), int4 36 (14.1%), int2 20 (7.8%); Guan et al. (2019, Facebook)
found 4-bit row-wise tables quality-neutral on their recommenders.

Lookups and bags run in one fused dequantize(-and-pool) kernel call that reads only the requested
rows. Scoring every row (h E^T) has three kernels, chosen by `score_kernel`:
  "tiled"     the lookup kernel dequantizes 8192 rows at a time into a float32 tile for a GEMM:
              no extra storage, float32 arithmetic on exactly the looked-up values.
  "int_mm"    a second copy of the codes in torch's int8 / int4 weight-only matmul layout
              (int_matmul.py): faster for small batches, bfloat16 activations, and its bytes count.
  "int8_gemm" a derived symmetric int8 copy of the rows in FBGEMM's packed layout (int8_gemm.py),
              int8 x int8 GEMM with activations quantized per call: fastest at small batches; its
              bytes count in memory, it is not saved (rebuilt on load).
"""
from __future__ import annotations

import torch
from torch import nn

from ...errors import SlimcartError
from .base import CompressedEmbedding, register_table, table_shape
from .int8_gemm import Int8GemmScores
from .int_matmul import IntMatmulScores
from .packed_rows import ROWWISE_BITS, PackedRows

SCORE_KERNELS = ("tiled", "int_mm", "int8_gemm")


def source_weight(emb: nn.Module) -> torch.Tensor:
    """The float table of an nn.Embedding / nn.EmbeddingBag, refusing options a compressed table
    cannot keep (max_norm renormalises rows on lookup, which would rewrite a quantized table)."""
    if not isinstance(emb, (nn.Embedding, nn.EmbeddingBag)):
        raise SlimcartError(f"expected nn.Embedding or nn.EmbeddingBag, got {type(emb).__name__}")
    if emb.max_norm is not None:
        raise SlimcartError("tables with max_norm cannot be compressed (lookups would renormalise rows)")
    if isinstance(emb, nn.EmbeddingBag) and emb.mode not in ("sum", "mean"):
        raise SlimcartError(f"EmbeddingBag mode '{emb.mode}' is not supported (sum or mean)")
    if isinstance(emb, nn.EmbeddingBag) and getattr(emb, "include_last_offset", False):
        raise SlimcartError("EmbeddingBag with include_last_offset is not supported")
    return emb.weight.detach()


def bag_mode(emb: nn.Module) -> str | None:
    return emb.mode if isinstance(emb, nn.EmbeddingBag) else None


@register_table
class RowwiseQuantEmbedding(CompressedEmbedding):
    """The whole table at one bit width in the fused row-wise layout."""

    kind = "rowwise"

    def __init__(self, rows: PackedRows, num_embeddings: int, padding_idx: int | None = None,
                 mode: str | None = None, score_kernel: str = "tiled"):
        super().__init__(num_embeddings, rows.dim, padding_idx, mode)
        if rows.bits not in ROWWISE_BITS:
            raise SlimcartError(f"row-wise quantization takes bits {ROWWISE_BITS}, got {rows.bits}")
        if len(rows) != num_embeddings:
            raise SlimcartError(f"{len(rows)} packed rows for a table of {num_embeddings}")
        if score_kernel not in SCORE_KERNELS:
            raise SlimcartError(f"score_kernel must be one of {SCORE_KERNELS}, got {score_kernel!r}")
        self.rows, self.bits, self.score_kernel = rows, rows.bits, score_kernel
        self.score_copy = IntMatmulScores(rows) if score_kernel == "int_mm" else \
            Int8GemmScores(self.rows.lookup, num_embeddings, rows.dim) if score_kernel == "int8_gemm" else None
        self._offsets = torch.arange(0)
        self._refresh_fast_path()

    def _refresh_fast_path(self) -> None:
        """Keep (kernel, packed rows) as a plain attribute: at batch 1 a lookup is ~10 us, and each
        nn.Module attribute lookup of a buffer or submodule adds ~1 us to it."""
        plain = self.mode is None and self.rows.pdim == self.rows.dim
        object.__setattr__(self, "_fast", (self.rows._op, self.rows.data) if plain else None)

    def _apply(self, fn, *args, **kwargs):  # .to() / .float() etc. may replace the buffer
        out = super()._apply(fn, *args, **kwargs)
        self._refresh_fast_path()
        return out

    @classmethod
    def from_embedding(cls, emb: nn.Module, config, frequencies=None) -> RowwiseQuantEmbedding:
        w = source_weight(emb)
        rows = PackedRows.pack(w, config.bits, config.optimized_range)
        return cls(rows, w.shape[0], emb.padding_idx, bag_mode(emb), config.score_kernel)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows.lookup(ids)

    def forward(self, ids, offsets=None, per_sample_weights=None):
        # Plain lookups return the stored row of every id, padding included, as nn.Embedding does (a
        # zero padding row quantizes to exactly zero: min = max = 0); bags without a padding id pool
        # inside the fused kernel.
        fast = self._fast
        if offsets is None and per_sample_weights is None and fast is not None:
            # one-id bags 0..n-1, rebuilt only when the batch size changes (one attribute, so concurrent
            # callers never mix sizes). Every call here costs at batch 1, where nn.Embedding takes ~4.7 us:
            # shape[0] and is_contiguous() instead of len() and .contiguous() save ~1 us of it.
            off = self._offsets
            if ids.dim() == 1 and ids.is_contiguous():  # the kernel reads ids as one contiguous run
                if off.shape[0] != ids.shape[0]:
                    off = self._offsets = torch.arange(ids.shape[0])
                return fast[0](fast[1], ids, off, False, 0, False, None, None, False)
        if self.mode is None and offsets is None and per_sample_weights is None:
            return self.rows.lookup(ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)
        if self.mode is not None and self.padding_idx is None and ids.dim() == 1 and offsets is not None:
            return self.rows.bag(ids, offsets, self.mode, per_sample_weights)
        return super().forward(ids, offsets, per_sample_weights)

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        if self.score_copy is not None:
            return self.score_copy(h)
        return self.rows.scores_tiled(h)

    def state_for_save(self):
        return self.rows.state("rows."), self._meta(bits=self.bits, score_kernel=self.score_kernel)

    @classmethod
    def from_saved(cls, tensors, meta):
        n, d, pad, mode = table_shape(meta)
        rows = PackedRows.from_state(tensors, "rows.", int(meta.get("bits", 0)), d)
        return cls(rows, n, pad, mode, meta.get("score_kernel", "tiled"))
