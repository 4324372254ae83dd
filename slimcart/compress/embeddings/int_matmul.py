"""Scoring against every row, s = h W^T, on torch's weight-only integer matmul kernels.

The fused lookup layout (packed_rows.py) suits gathering rows but no matmul kernel reads it, so a
table that is also scored (SASRec's item table is its output layer) may keep a second copy of its
codes in a matmul kernel's own layout; `nbytes` counts it. With row-wise codes q, scale s, bias m,
the kernel only sums signed codes and float32 arithmetic applies each row's scale and offset:
    h W_i^T = (h . (q_i - z)) * s_i + (sum_k h_k) * (m_i + z s_i)
  8 bits  z = 128: aten._weight_int8pack_mm(x, q - 128, 1) gives h . (q - 128)
  4 bits  z = 8: aten._weight_int4pack_mm_for_cpu(x, P, g, (1, 0)) gives h . (q - 8) (its per-group
          w = (q - 8) * scale + zero with scale 1, zero 0).
  2 bits  z = 2: codes stored as q + 6 on the same int4 kernel give h . (q - 2): there is no 2-bit
          kernel, so 2-bit rows run, and are stored here, at 4 bits.
These CPU kernels are fast only with bfloat16 activations (float32 inputs take a reference path 30x
slower here), so h and the kernel's output are rounded to bfloat16: a score carries an error of
about 2**-8 * |h . (q - z)| * s on top of the quantization error. Keeping the scales out of the kernel
(unit scales, exact in bfloat16) avoids bfloat16-rounded scales, which would cost int8 about half a
quantization step. Rows are padded to a multiple of 16 and columns to a multiple of 32 as the int4
packing requires; padding columns meet zero activations.
"""
from __future__ import annotations

import torch
from torch import nn

from ...errors import SlimcartError
from .packed_rows import PackedRows

CONVERT_CHUNK_ROWS = 1 << 16  # rows converted at a time (a multiple of the kernel's row blocks)


def _group(kp: int) -> int:
    return next(g for g in (256, 128, 64, 32) if kp % g == 0)


class IntMatmulScores(nn.Module):
    """A scoring copy of quantized rows in the int8 / int4 matmul layout."""

    def __init__(self, rows: PackedRows, chunk: int = CONVERT_CHUNK_ROWS):
        super().__init__()
        if rows.bits not in (8, 4, 2):
            raise SlimcartError(f"the int matmul scoring kernel needs 8-, 4- or 2-bit rows, not {rows.bits}")
        if chunk % 1024:
            raise SlimcartError("conversion chunks must be a multiple of 1024 rows")
        self.bits, self.n, self.dim = rows.bits, len(rows), rows.dim
        scale, bias = rows.scale_bias()
        # The zero point sits mid-range so h . (q - z) stays small and bfloat16 rounds it finely:
        # 2-bit codes are stored as q + 6, which the kernel's fixed 8 turns into q - 2.
        zero = {8: 128, 4: 8, 2: 2}[self.bits]
        shift = 8 - zero if self.bits == 2 else 0
        self.register_buffer("row_scale", scale.contiguous())
        self.register_buffer("row_offset", (bias + zero * scale).contiguous())
        if self.bits == 8:
            # Columns padded to a multiple of 32 with q - 128 = 0: the kernel's vector loads read whole blocks.
            self.kp = -(-self.dim // 32) * 32
            codes = torch.zeros(self.n, self.kp, dtype=torch.int8)
            codes[:, : self.dim] = (rows.unpack_codes()[:, : self.dim].to(torch.int16) - 128).to(torch.int8)
            self.register_buffer("w", codes)
            self.register_buffer("unit", torch.ones(self.n, dtype=torch.bfloat16))
            return
        self.npad, self.kp = -(-self.n // 16) * 16, -(-rows.pdim // 32) * 32
        self.g = _group(self.kp)
        parts = []
        for s in range(0, self.npad, chunk):
            e = min(self.npad, s + chunk)
            codes = torch.full((e - s, self.kp), 8, dtype=torch.int32)
            real = max(0, min(self.n, e) - s)
            codes[:real, : rows.pdim] = rows.unpack_codes(s, s + real).to(torch.int32) + shift
            parts.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2))
        self.register_buffer("packed", torch.cat(parts))
        unit = torch.zeros(self.kp // self.g, self.npad, 2, dtype=torch.bfloat16)
        unit[..., 0] = 1.0
        self.register_buffer("unit", unit)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, dim] float32 -> scores [B, n] float32."""
        x = torch.nn.functional.pad(h, (0, self.kp - h.shape[1])).to(torch.bfloat16)
        if self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(x, self.w, self.unit)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.g, self.unit)[:, : self.n]
        # In place on the one float32 copy: at batch 256 x 50k rows these passes cost more than the matmul.
        return y.float().mul_(self.row_scale).addr_(h.sum(1), self.row_offset)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())
