"""Non-uniform weight-only quantization: one learned 2**bits-level codebook per output row.

Codes index a float16 codebook of the row (stored: packed codes + codebook, ~0.4 bit per weight of
codebook overhead for 16 levels over 576 inputs). Levels come from 1-D Lloyd k-means, optionally
weighted per input column by E[x_j^2] on calibration text (diag of the Hessian: an error on a
column that sees large activations costs more output error). There is no lookup-table kernel in
ONNX Runtime or torch for CPU, so k-means models are size-only: they run dequantized to float32.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from ...arch import causal_lm
from ...errors import SlimcartError
from ...recipe import register_step
from .calib_stats import collect_stats
from .weight_only import (
    QuantizedWeight,
    WeightOnlyBase,
    WeightSpec,
    check_weight,
    layerwise,
)


def _assign(rows: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level per element (levels sorted per row)."""
    mids = ((levels[:, 1:] + levels[:, :-1]) / 2).contiguous()
    return torch.searchsorted(mids, rows.contiguous())


def kmeans_rows(w: torch.Tensor, bits: int, col_weight: torch.Tensor | None = None, iters: int = 30,
                name: str = "weight") -> QuantizedWeight:
    """Per-row weighted k-means with 2**bits levels -> codes + float16 codebook."""
    w = w.detach().float()
    check_weight(w, name)
    k = 2**bits
    R, C = w.shape
    wt = torch.ones(C) if col_weight is None else col_weight.float().clamp_min(1e-12)
    wt = wt[None].expand(R, C)
    srt = w.sort(dim=1).values
    levels = srt[:, ((torch.arange(k) + 0.5) / k * C).long().clamp_max(C - 1)]  # quantile start
    for _ in range(iters):
        idx = _assign(w, levels)
        sums = torch.zeros(R, k).scatter_add_(1, idx, w * wt)
        mass = torch.zeros(R, k).scatter_add_(1, idx, wt)
        new = torch.where(mass > 0, sums / mass.clamp_min(1e-30), levels).sort(dim=1).values
        if torch.allclose(new, levels):
            break
        levels = new
    levels = levels.half().float().sort(dim=1).values  # assign against the stored float16 levels
    codes = _assign(w, levels).to(torch.uint8)
    spec = WeightSpec(bits=bits, group_size=None, symmetric=True)
    return QuantizedWeight(codes, torch.ones(R, 1, dtype=torch.float16), None, spec, codebook=levels.half())


@register_step
class KMeansStep(WeightOnlyBase):
    """k-means (codebook) weight-only quantization, activation-weighted when `calibrated`."""

    kind: Literal["weight_only_kmeans"] = "weight_only_kmeans"
    group_size: int | None = None
    calibrated: bool = True
    calibration_windows: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _kmeans(self):
        if self.group_size is not None:
            raise SlimcartError("weight_only_kmeans learns one codebook per output row: leave group_size unset (null)")
        if self.overrides:
            raise SlimcartError("weight_only_kmeans does not take per-layer overrides")
        return self

    def apply(self, state, ctx):
        lm = causal_lm(state.torch_module(self.kind))
        named = self.linears(lm)
        qweights: dict[str, QuantizedWeight] = {}
        if not self.calibrated:
            for n, m in named.items():
                qweights[n] = kmeans_rows(m.weight, self.bits, name=n)
        else:
            batches = ctx.calibration(state.bundle, self.calibration_windows)

            def quantize_layer(i, layer, hidden, kwargs):
                prefix = next(n for n, m in lm.named_modules() if m is layer) + "."
                mine = {n[len(prefix):]: m for n, m in named.items() if n.startswith(prefix)}
                stats = collect_stats(layer, hidden, kwargs, mine)
                for n, m in mine.items():
                    q = kmeans_rows(m.weight, self.bits, torch.diag(stats[n].H), name=prefix + n)
                    qweights[prefix + n] = q
                    m.weight.data = q.dequantize()

            with torch.no_grad():
                layerwise(lm, batches, quantize_layer, ctx.progress)
        return self.finish(state, lm, qweights, "kmeans")
