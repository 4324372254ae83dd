"""Rows of a table in the fused row-wise layouts that real lookup kernels read.

Row-wise affine quantization with b bits: for row i with minimum m_i and maximum M_i
    scale_i = (M_i - m_i) / (2**b - 1),   bias_i = m_i,
    q_ij    = round((w_ij - bias_i) / scale_i)  in [0, 2**b - 1],
    w_ij   ~= q_ij * scale_i + bias_i          (error <= scale_i / 2 plus float16 rounding of scale/bias).
Fused layout (one uint8 row per table row, what FBGEMM, torch.ops.quantized and TorchRec's quantized
tables use), for d stored columns:
    b = 8:  [q_0 .. q_{d-1}] [scale fp32] [bias fp32]                        d + 8 bytes
    b = 4:  [q_0 | q_1 << 4] ... [scale fp16] [bias fp16]                    d/2 + 4 bytes
    b = 2:  [q_0 | q_1 << 2 | q_2 << 4 | q_3 << 6] ... [scale fp16] [bias fp16]   d/4 + 4 bytes
(the lower bits hold the earlier column). 4-bit needs an even d and 2-bit a multiple of 4: a narrower
row is padded with copies of its own minimum, which leaves its range, and so its codes, unchanged.
Bits 32 and 16 hold plain float rows, so mixed-precision tiers share one interface.

Quantization and lookups run in torch's quantized ops (FBGEMM kernels inside PyTorch): prepack
(`embedding_bag_{byte,4bit,2bit}_prepack`, optionally FBGEMM's greedy range search that minimises the
row's squared error) and the fused dequantize-and-pool `embedding_bag_*_rowwise_offsets`; a plain
lookup is a bag of one id per row. Only `unpack_codes` is hand-written: no op returns the codes, and
the int-matmul scoring copy (int_matmul.py) and the tests need them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import SlimcartError

ROWWISE_BITS = (8, 4, 2)
ALL_BITS = (32, 16, 8, 4, 2)
_PREPACK = {8: "embedding_bag_byte_prepack", 4: "embedding_bag_4bit_prepack", 2: "embedding_bag_2bit_prepack"}
_LOOKUP = {8: "embedding_bag_byte_rowwise_offsets", 4: "embedding_bag_4bit_rowwise_offsets",
           2: "embedding_bag_2bit_rowwise_offsets"}
PACK_CHUNK_ROWS = 1 << 18  # rows quantized at a time: bounds the transient float copy of a padded chunk


def stored_dim(dim: int, bits: int) -> int:
    """Columns actually stored: d rounded up to what the b-bit layout packs whole bytes of."""
    per_byte = 8 // bits if bits in ROWWISE_BITS and bits < 8 else 1
    return -(-dim // per_byte) * per_byte


def row_bytes(dim: int, bits: int) -> int:
    """Bytes one row takes in the layout (see the module docstring)."""
    if bits == 32:
        return 4 * dim
    if bits == 16:
        return 2 * dim
    if bits == 8:
        return dim + 8
    if bits in (4, 2):
        return stored_dim(dim, bits) * bits // 8 + 4
    raise SlimcartError(f"row bits must be one of {ALL_BITS}, got {bits!r}")


class PackedRows(nn.Module):
    """n rows of width `dim` at `bits` bits in the fused layout; lookups never dequantize more than
    the requested rows (scoring dequantizes one tile of rows at a time)."""

    def __init__(self, data: torch.Tensor, bits: int, dim: int, trainable: bool = False):
        super().__init__()
        if bits not in ALL_BITS:
            raise SlimcartError(f"row bits must be one of {ALL_BITS}, got {bits!r}")
        self.bits, self.dim, self.pdim = bits, int(dim), stored_dim(dim, bits)
        want = {32: torch.float32, 16: torch.float16}.get(bits, torch.uint8)
        width = dim if bits in (32, 16) else row_bytes(dim, bits)
        if data.dtype != want or data.dim() != 2 or data.shape[1] != width:
            raise SlimcartError(f"{bits}-bit rows of width {dim} must be {want} [n, {width}], got "
                                f"{data.dtype} {list(data.shape)}")
        if bits == 32:
            self.data = nn.Parameter(data.contiguous(), requires_grad=trainable)
        else:
            self.register_buffer("data", data.contiguous())
        # Scratch, not storage: 0..n-1 as one-id bag offsets (grown on demand; the last size's slice is
        # kept, since slicing costs a microsecond and serving repeats batch sizes), and the kernel handle.
        self._offsets, self._last = torch.arange(0), torch.arange(0)
        self._op = getattr(torch.ops.quantized, _LOOKUP[bits]).default if bits in ROWWISE_BITS else None

    @classmethod
    def pack(cls, weight: torch.Tensor, bits: int, optimized_range: bool = False,
             trainable: bool = False, copy: bool = True) -> PackedRows:
        """Quantize float rows [n, d] with torch's prepack ops, chunk by chunk. `copy=False` lets
        32-bit rows keep a tensor the caller just made (rows gathered by id) instead of cloning it."""
        w = weight.detach()
        n, d = w.shape
        if bits == 32:
            return cls(w.float().clone() if copy else w.float(), 32, d, trainable)
        if bits == 16:
            if bool((w.abs() > torch.finfo(torch.float16).max).any()):
                raise SlimcartError("16-bit rows: the table has values beyond float16's range")
            return cls(w.half(), 16, d)
        if bits not in ROWWISE_BITS:
            raise SlimcartError(f"row bits must be one of {ALL_BITS}, got {bits!r}")
        if optimized_range and bits == 8:
            raise SlimcartError("optimized_range is a 4- and 2-bit option (the 8-bit prepack has none)")
        pdim = stored_dim(d, bits)
        prepack = getattr(torch.ops.quantized, _PREPACK[bits])
        out = torch.empty(n, row_bytes(d, bits), dtype=torch.uint8)
        for s in range(0, n, PACK_CHUNK_ROWS):
            chunk = w[s: s + PACK_CHUNK_ROWS].float()
            if pdim > d:  # pad with each row's own minimum: same range, same codes
                chunk = torch.cat([chunk, chunk.min(1, keepdim=True).values.expand(-1, pdim - d)], 1)
            out[s: s + len(chunk)] = prepack(chunk.contiguous(), optimized_range) if bits < 8 else prepack(chunk.contiguous())
        return cls(out, bits, d)

    def __len__(self) -> int:
        return self.data.shape[0]

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def _bag_offsets(self, n: int) -> torch.Tensor:
        last = self._last  # read once: another thread may replace it (each attribute holds a whole tensor)
        if len(last) == n:
            return last
        full = self._offsets
        if len(full) < n:
            full = self._offsets = torch.arange(max(n, 2 * len(full)), dtype=torch.long)
        last = self._last = full[:n]
        return last

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows [n, dim] float32 for flat ids [n]."""
        if self.bits == 32:
            return F.embedding(ids, self.data)
        if self.bits == 16:
            return F.embedding(ids, self.data).float()
        # the fused kernels need contiguous ids; a column sliced out of a batch (DIN's `sparse[:, i]`) is strided
        out = self._op(self.data, ids.contiguous(), self._bag_offsets(ids.numel()), False, 0, False, None, None, False)
        return out if self.pdim == self.dim else out[:, : self.dim]

    def bag(self, ids: torch.Tensor, offsets: torch.Tensor, mode: str,
            per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled bags (sum or mean) in one fused dequantize-and-pool call."""
        if self.bits in (32, 16):
            return F.embedding_bag(ids, self.data.float() if self.bits == 16 else self.data, offsets, mode=mode,
                                   per_sample_weights=per_sample_weights)
        if per_sample_weights is not None and mode != "sum":
            raise SlimcartError("per_sample_weights only work with mode 'sum' (as in nn.EmbeddingBag)")
        psw = None if per_sample_weights is None else per_sample_weights.float()
        out = self._op(self.data, ids.contiguous(), offsets.contiguous(), False, 0, False, psw, None, False)
        if mode == "mean":  # these ops accept mode=1 but sum anyway (torch 2.13): divide by bag sizes here
            sizes = torch.diff(offsets, append=torch.tensor([ids.numel()], dtype=offsets.dtype))
            out = out / sizes.clamp_min(1).unsqueeze(1).to(out.dtype)
        return out if self.pdim == self.dim else out[:, : self.dim]

    def rows(self, start: int, end: int) -> torch.Tensor:
        """Rows start..end-1 in float32 (one tile)."""
        return self.lookup(torch.arange(start, end, dtype=torch.long))

    def scores_tiled(self, h: torch.Tensor, tile: int = 8192) -> torch.Tensor:
        """h [B, dim] @ rows^T [dim, n], dequantizing `tile` rows at a time (peak extra memory
        tile * dim * 4 bytes); float32 rows multiply directly."""
        if self.bits == 32:
            return h @ self.data.t()
        n = len(self)
        out = h.new_empty(h.shape[0], n)
        for s in range(0, n, tile):
            e = min(n, s + tile)
            out[:, s:e] = h @ self.rows(s, e).t()
        return out

    def scale_bias(self, start: int = 0, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale [n], bias [n]) float32 of rows start..end-1 (quantized layouts only)."""
        raw = self.data[start:end]
        if self.bits == 8:
            sb = raw[:, self.pdim:].contiguous().view(torch.float32)
        else:
            sb = raw[:, self.pdim * self.bits // 8:].contiguous().view(torch.float16).float()
        return sb[:, 0], sb[:, 1]

    def unpack_codes(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Codes [n, pdim] uint8 of rows start..end-1, the lower bits being the earlier column."""
        raw = self.data[start:end]
        if self.bits == 8:
            return raw[:, : self.pdim].clone()
        per = 8 // self.bits
        packed = raw[:, : self.pdim // per]
        mask = (1 << self.bits) - 1
        parts = [(packed >> (self.bits * t)) & mask for t in range(per)]  # column per*j + t
        return torch.stack(parts, -1).reshape(packed.shape[0], self.pdim)

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {prefix + "data": self.data.detach()}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], prefix: str, bits: int, dim: int,
                   trainable: bool = False) -> PackedRows:
        t = tensors.get(prefix + "data")
        if t is None:
            raise SlimcartError(f"saved embedding table lacks tensor '{prefix}data'")
        if bits in ROWWISE_BITS and t.is_contiguous():
            # Kept as loaded: safetensors memory-maps the file, so rows never looked up are never read
            # and loading costs no second copy. The lookup kernels read rows at any byte offset (a
            # 36-byte row stride aligns nothing anyway); the int-matmul copy is built in fresh memory.
            return cls(t, bits, dim, trainable)
        # Float rows may be trained (written): a private, aligned copy.
        return cls(t.clone(memory_format=torch.contiguous_format), bits, dim, trainable)
