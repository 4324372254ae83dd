"""Scoring against every row, s = h W^T, on FBGEMM's int8 x int8 GEMM (PyTorch's dynamic quantized Linear).

The table's rows, whatever their stored form, are looked up once (chunk by chunk) and requantized to
symmetric int8 per row, then prepacked for FBGEMM:
    W_i ~= t_i * c_i,   c_i in [-127, 127],   t_i = max_j |W_ij| / 127          (error <= t_i / 2 per entry)
At call time the batch h is quantized from its own range (uint8 affine, 7 bits: `reduce_range` keeps
the int16 pair sums of AVX2 kernels from saturating; VNNI kernels accumulate in int32 either way):
    h ~= s_h * (q_h - z_h),   s_i ~= t_i * s_h * (c_i . (q_h - z_h))            (an int8 GEMM, int32 accumulators)
This copy is derived, never saved: it is rebuilt when the table is built or loaded, and its bytes
count in the table's `nbytes` (N x d int8 codes plus per-row float scale and int32 column offset).
Why: the tiled kernel dequantizes every row into float32 on every call (about 4 ms for 43k x 100 rows
at batch 1 on the 2-core EPYC here, 4x the float32 matmul); this one reads int8 rows (0.14 ms). At
large batches writing the B x N float32 scores costs as much as any of the matmuls.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ...errors import SlimcartError

CHUNK_ROWS = 1 << 16  # rows dequantized at a time while building (bounds the transient float copy)


class Int8GemmScores(nn.Module):
    """A scoring copy of a table's rows as FBGEMM-packed int8 weights."""

    def __init__(self, lookup: Callable[[torch.Tensor], torch.Tensor], n: int, dim: int, chunk: int = CHUNK_ROWS):
        super().__init__()
        import warnings

        self.n, self.dim = int(n), int(dim)
        codes, scale = torch.empty(self.n, self.dim, dtype=torch.int8), torch.empty(self.n, dtype=torch.float64)
        with torch.no_grad():
            for s in range(0, self.n, chunk):
                rows = lookup(torch.arange(s, min(self.n, s + chunk))).double()
                t = rows.abs().amax(1).clamp_min(1e-12) / 127.0
                codes[s:s + len(rows)] = torch.round(rows / t[:, None]).clamp_(-127, 127).to(torch.int8)
                scale[s:s + len(rows)] = t
        with warnings.catch_warnings():  # quantized tensors are deprecated in torch 2.13 but are what FBGEMM's prepack takes
            warnings.filterwarnings("ignore", message=".*quantized tensor creation.*", category=UserWarning)
            q = torch._make_per_channel_quantized_tensor(codes, scale, torch.zeros(self.n, dtype=torch.int64), 0)
            self.packed = torch.ops.quantized.linear_prepack(q, None)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, dim] -> scores [B, n] float32 (inference only: the int8 kernel has no gradient)."""
        if h.requires_grad and torch.is_grad_enabled():
            raise SlimcartError("score_kernel int8_gemm has no gradient: train (recover, distill) before the table is "
                                "compressed with it, or score with the 'tiled' kernel while training")
        return torch.ops.quantized.linear_dynamic(h.float().contiguous(), self.packed, True)

    def packed_nbytes(self) -> int:
        """Bytes held outside parameters and buffers: int8 codes + float32 scale + int32 column offset per row."""
        return self.n * (self.dim + 8)

    def __deepcopy__(self, memo):
        """Packed FBGEMM weights are a C++ object: copy them through their own unpack/prepack."""
        new = self.__class__.__new__(self.__class__)
        nn.Module.__init__(new)
        new.n, new.dim = self.n, self.dim
        w, b = torch.ops.quantized.linear_unpack(self.packed)
        new.packed = torch.ops.quantized.linear_prepack(w.clone(), b)
        return new
