"""Quantization schemes: one typed `QuantScheme`, `quantize(x, scheme) -> (codes, params)` and
`dequantize(codes, params)`, plus two-int4-per-byte packing shared by every 4-bit format.

Layout. Every granularity is a view of the tensor as rows of a 2-D grid, one set of parameters per row:
  per_tensor  -> 1 row holding everything;
  per_channel -> one row per index of `axis` (axis 0 = output channel of an nn.Linear weight);
  per_group   -> consecutive runs of `group_size` along the last dim (row-major over [..., in/g]),
                 so for a Linear weight [out, in] the parameters reshape to [out, in/g].
Levels. "uniform" is the affine grid q = clamp(round(x/scale) + zp); "kmeans" learns 2**bits levels
per row (codes are indices into a per-row codebook); "pow2" uses sign * amax * 2**-k (log levels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, model_validator

from ...errors import SlimcartError
from ...runtime.packed_llm import pack_int4, unpack_int4  # noqa: F401  (re-exported: the 4-bit packing every format shares)

SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)


class QuantScheme(BaseModel):
    """How to quantize one tensor. `symmetric` is ignored by kmeans (its levels are learned)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    bits: int = 8
    symmetric: bool = True
    granularity: Literal["per_tensor", "per_channel", "per_group"] = "per_channel"
    group_size: int | None = None
    axis: int = 0  # channel axis for per_channel
    levels: Literal["uniform", "kmeans", "pow2"] = "uniform"

    @model_validator(mode="before")
    @classmethod
    def _check(cls, v):
        # Validate before pydantic so every problem is one clear SlimcartError line.
        if not isinstance(v, dict):
            return v
        bits = v.get("bits", 8)
        if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
            raise SlimcartError(f"quantization bits must be an integer from 2 to 8, got {bits!r}")
        gran = v.get("granularity", "per_channel")
        gs = v.get("group_size")
        if gran == "per_group":
            if gs not in SUPPORTED_GROUP_SIZES:
                raise SlimcartError(f"group_size must be one of {SUPPORTED_GROUP_SIZES} for per_group, got {gs!r}")
        elif gs is not None:
            raise SlimcartError(f"group_size is only used with granularity per_group (got {gran})")
        if v.get("levels") == "pow2" and v.get("symmetric", True) is False:
            raise SlimcartError("pow2 (log) levels are sign-magnitude: use symmetric: true")
        return v

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


@dataclass
class QuantParams:
    """Per-row parameters of a quantized tensor (rows as described in the module docstring)."""

    scheme: QuantScheme
    shape: tuple[int, ...]
    scale: torch.Tensor  # [rows] float32 (uniform, pow2); None-like zeros for kmeans
    zero_point: torch.Tensor | None = None  # [rows] int32, asymmetric uniform only
    codebook: torch.Tensor | None = None  # [rows, 2**bits] float32, kmeans only

    @property
    def rows(self) -> int:
        return int(self.scale.numel())


def _check_finite(x: torch.Tensor, what: str = "tensor") -> None:
    if x.numel() == 0:
        raise SlimcartError(f"cannot quantize an empty {what}")
    if not torch.isfinite(x).all():
        raise SlimcartError(f"cannot quantize a {what} containing NaN or inf values")


def to_rows(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """View `x` as the [rows, cols] grid of `scheme` (see module docstring)."""
    if scheme.granularity == "per_tensor":
        return x.reshape(1, -1)
    if scheme.granularity == "per_channel":
        if x.dim() == 0 or not -x.dim() <= scheme.axis < x.dim():
            raise SlimcartError(f"per_channel axis {scheme.axis} does not exist in a tensor of shape {tuple(x.shape)}")
        return x.movedim(scheme.axis, 0).reshape(x.shape[scheme.axis], -1)
    g = scheme.group_size
    if x.dim() == 0 or x.shape[-1] % g:
        raise SlimcartError(f"group_size {g} does not divide the last dimension of shape {tuple(x.shape)}")
    return x.reshape(-1, g)


def from_rows(rows: torch.Tensor, shape: tuple[int, ...], scheme: QuantScheme) -> torch.Tensor:
    """Inverse of `to_rows`."""
    if scheme.granularity == "per_channel":
        moved = (shape[scheme.axis],) + tuple(s for i, s in enumerate(shape) if i != scheme.axis % len(shape))
        return rows.reshape(moved).movedim(0, scheme.axis)
    return rows.reshape(shape)


def uniform_params(lo: torch.Tensor, hi: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) of the affine grid covering [lo, hi] per row. The range always includes 0
    so that zero (padding, ReLU output) is exactly representable and int kernels accept the zero point."""
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    tiny = torch.finfo(torch.float32).tiny
    if scheme.symmetric:
        amax = torch.maximum(-lo, hi)
        return (amax / scheme.qmax).clamp_min(tiny), None
    scale = ((hi - lo) / (scheme.qmax - scheme.qmin)).clamp_min(tiny)
    zp = (scheme.qmin - torch.round(lo / scale)).clamp(scheme.qmin, scheme.qmax).to(torch.int32)
    return scale, zp


def _pow2_levels(scheme: QuantScheme) -> torch.Tensor:
    """Magnitudes, in units of the row's amax, for codes 1..L: 2**(c - L)."""
    L = 2 ** (scheme.bits - 1) - 1
    return torch.pow(2.0, torch.arange(1, L + 1, dtype=torch.float32) - L)


def kmeans_1d(rows: torch.Tensor, k: int, iters: int = 25) -> torch.Tensor:
    """Lloyd's k-means on each row independently (1-D, so assignment is a sorted search). -> [rows, k]."""
    R, C = rows.shape
    # Start from evenly spaced quantiles (sort-based: torch.quantile refuses very large rows).
    pos = ((torch.arange(k, dtype=torch.float32) + 0.5) / k * C).long().clamp_max(C - 1)
    cent = rows.sort(dim=1)[0][:, pos].contiguous()
    for _ in range(iters):
        cent, _ = cent.sort(dim=1)
        idx = _nearest(rows, cent)
        sums = torch.zeros(R, k).scatter_add_(1, idx, rows)
        counts = torch.zeros(R, k).scatter_add_(1, idx, torch.ones_like(rows))
        new = torch.where(counts > 0, sums / counts.clamp_min(1), cent)  # empty cluster keeps its level
        if torch.allclose(new, cent):
            break
        cent = new
    return cent.sort(dim=1)[0]


def _nearest(rows: torch.Tensor, sorted_levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level per element (levels sorted per row)."""
    mids = (sorted_levels[:, 1:] + sorted_levels[:, :-1]) / 2
    return torch.searchsorted(mids.contiguous(), rows.contiguous())


def compute_params(x: torch.Tensor, scheme: QuantScheme, clip: float = 1.0) -> QuantParams:
    """Parameters of `scheme` for tensor `x` (min/max per row, shrunk by `clip` in (0, 1])."""
    x = torch.as_tensor(x).detach().float()
    _check_finite(x)
    if not 0 < clip <= 1:
        raise SlimcartError(f"clip ratio must be in (0, 1], got {clip}")
    rows = to_rows(x, scheme)
    if scheme.levels == "kmeans":
        cb = kmeans_1d(rows, 2**scheme.bits)
        return QuantParams(scheme, tuple(x.shape), torch.ones(rows.shape[0]), codebook=cb)
    lo, hi = rows.min(dim=1).values * clip, rows.max(dim=1).values * clip
    if scheme.levels == "pow2":
        amax = torch.maximum(-lo, hi).clamp_min(torch.finfo(torch.float32).tiny)
        return QuantParams(scheme, tuple(x.shape), amax)
    scale, zp = uniform_params(lo, hi, scheme)
    return QuantParams(scheme, tuple(x.shape), scale, zero_point=zp)


def quantize_with(x: torch.Tensor, params: QuantParams) -> torch.Tensor:
    """Codes of `x` under fixed `params` (e.g. calibrated activation ranges); same shape as `x`."""
    s = params.scheme
    x = torch.as_tensor(x).detach().float()
    _check_finite(x)
    if tuple(x.shape) != params.shape and params.rows != 1:
        raise SlimcartError(f"tensor shape {tuple(x.shape)} does not match quantization params for {params.shape}")
    rows = to_rows(x, s) if params.rows != 1 else x.reshape(1, -1)
    if s.levels == "kmeans":
        codes = _nearest(rows, params.codebook).to(torch.uint8)
    elif s.levels == "pow2":
        mags = rows.abs() / params.scale[:, None]
        lv = torch.cat([torch.zeros(1), _pow2_levels(s)])[None].expand(rows.shape[0], -1)
        codes = (_nearest(mags, lv) * torch.sign(rows)).to(torch.int8)
    else:
        zp = params.zero_point[:, None] if params.zero_point is not None else 0
        q = torch.round(rows / params.scale[:, None]) + zp
        codes = q.clamp(s.qmin, s.qmax).to(torch.int8 if s.symmetric else torch.uint8)
    return codes.reshape(x.shape) if params.rows == 1 else from_rows(codes, tuple(x.shape), s)


def dequantize(codes: torch.Tensor, params: QuantParams) -> torch.Tensor:
    """Float32 tensor represented by `codes` under `params`."""
    s = params.scheme
    shape = tuple(codes.shape)
    rows = codes.reshape(1, -1) if params.rows == 1 else to_rows(codes, s)
    if s.levels == "kmeans":
        out = torch.gather(params.codebook, 1, rows.long())
    elif s.levels == "pow2":
        c = rows.float()
        mags = torch.where(c == 0, 0.0, torch.pow(2.0, c.abs() - (2 ** (s.bits - 1) - 1)))
        out = torch.sign(c) * mags * params.scale[:, None]
    else:
        zp = params.zero_point[:, None].float() if params.zero_point is not None else 0.0
        out = (rows.float() - zp) * params.scale[:, None]
    return out.reshape(shape) if params.rows == 1 else from_rows(out, shape, s)


def quantize(x: torch.Tensor, scheme: QuantScheme, clip: float = 1.0) -> tuple[torch.Tensor, QuantParams]:
    """Quantize `x` with `scheme` -> (codes, params); `dequantize(codes, params)` approximates `x`."""
    params = compute_params(x, scheme, clip)
    return quantize_with(x, params), params


def fake_quantize(x: torch.Tensor, scheme: QuantScheme, clip: float = 1.0) -> torch.Tensor:
    """dequantize(quantize(x)): the float tensor a quantized kernel would see (no gradient)."""
    codes, params = quantize(x, scheme, clip)
    return dequantize(codes, params).to(torch.as_tensor(x).dtype)


# ---------------------------------------------------------------- int4 packing (two codes per byte)
