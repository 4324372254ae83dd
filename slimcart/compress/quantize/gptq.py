"""GPTQ: quantize a Linear's columns one at a time, pushing each column's rounding error onto the
columns not yet quantized through the inverse Hessian of the layer's inputs (Frantar et al. 2022).

For a Linear y = W x with calibration inputs X, the output error of a quantized W' is
tr((W - W') H (W - W')^T) with H = X^T X / n. Quantizing column j and compensating the rest with
the optimal update -err_j * Hinv[j, j:] / Hinv[j, j] (via the upper Cholesky factor of H^-1) is
the Optimal Brain Surgeon step restricted to one column. Work is done in blocks of columns with
the updates to later blocks applied once per block (lazy batch updates). Options:
  * dampening: H += damp * mean(diag H) * I keeps the Cholesky factorisation stable;
  * act_order: process columns by decreasing diag(H) (the most active inputs first, while the most
    freedom to compensate remains). Groups stay contiguous in the original column order (what the
    kernels store); a group's scale/zero are fitted when its first column is reached, on the
    weights as updated by then;
  * group_size / bits / symmetric: the same layout as RTN (weight_only.WeightSpec);
  * clip_grid: fit each group's range by a shrink search instead of plain min/max (GPTQ's "mse" grid).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ...arch import causal_lm
from ...errors import SlimcartError
from ...recipe import register_step
from .calib_stats import collect_stats
from .weight_only import (
    QuantizedWeight,
    WeightOnlyBase,
    WeightSpec,
    best_shrink,
    check_weight,
    fit_params,
    layerwise,
    make_qweight,
)


def fit_group(cur: torch.Tensor, h_diag: torch.Tensor, spec: WeightSpec, clip_grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) per row for one group's current weights `cur` [rows, k]. With clip_grid > 1 the
    min/max range is shrunk per row (down to half) where that lowers the rounding error weighted by
    the inputs' energy diag(H), the first-order share of the output error."""
    if clip_grid <= 1:
        return fit_params(cur, spec)
    return fit_params(cur, spec, best_shrink(cur, spec, lambda wq: (cur - wq) ** 2 @ h_diag, clip_grid))


def gptq(w: torch.Tensor, H: torch.Tensor, spec: WeightSpec, damp: float = 0.01, act_order: bool = True,
         block: int = 128, name: str = "weight", clip_grid: int = 1) -> QuantizedWeight:
    """GPTQ-quantize `w` [out, in] given the input Hessian `H` [in, in] (X^T X / n). clip_grid > 1
    searches a per-(row, group) range shrink when each group's parameters are fitted."""
    w = w.detach().float().clone()
    check_weight(w, name)
    out_f, in_f = w.shape
    if H.shape != (in_f, in_f):
        raise SlimcartError(f"{name}: Hessian shape {tuple(H.shape)} does not match in_features {in_f}")
    if not torch.isfinite(H).all():
        raise SlimcartError(f"{name}: calibration activations contain NaN or inf")
    groups = spec.groups(in_f, name)
    group_of = torch.cat([torch.full((e - s,), i) for i, (s, e) in enumerate(groups)])
    H = H.double().clone()
    h_diag = torch.diag(H).float().clamp_min(0)
    dead = torch.diag(H) == 0  # inputs that never fire: their weights cannot matter
    H[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_f)
    H = H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(in_f, dtype=H.dtype)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()
    except RuntimeError:
        raise SlimcartError(f"{name}: Hessian is not positive definite even after dampening {damp}; raise damp") from None

    W = w[:, perm]
    where = torch.argsort(perm)  # position of each original column in the processing order
    cols = perm.tolist()
    group_list = group_of.tolist()
    codes = torch.zeros(out_f, in_f)
    scale = torch.zeros(out_f, len(groups))
    offset = torch.zeros(out_f, len(groups))
    fitted = [False] * len(groups)
    maxq = float(spec.maxq)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = group_list[cols[i1 + i]]
            if not fitted[g]:
                # Fit the group on its current (error-updated) weights, in original order. Columns in
                # later blocks have not yet received this block's lazy update: a close approximation.
                pos = where[groups[g][0]:groups[g][1]]
                cur = W[:, pos].clone()
                inblk = (pos >= i1) & (pos < i2)
                cur[:, inblk] = W1[:, pos[inblk] - i1]
                s0, e0 = groups[g]
                scale[:, g], offset[:, g] = fit_group(cur, h_diag[s0:e0], spec, clip_grid)
                fitted[g] = True
            sc, off = scale[:, g], offset[:, g]
            wcol = W1[:, i]
            q = torch.round((wcol - off) / sc).clamp_(0, maxq)
            Q1[:, i] = q
            err = (wcol - (q * sc + off)) / Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)  # compensate the columns still to come
            Err1[:, i] = err
        codes[:, perm[i1:i2]] = Q1
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of every later column
    return make_qweight(codes, scale, offset, spec)


@register_step
class GPTQStep(WeightOnlyBase):
    """GPTQ weight-only quantization, decoder layer by decoder layer, on the workload's calibration text."""

    kind: Literal["weight_only_gptq"] = "weight_only_gptq"
    calibration_windows: int = Field(32, ge=1)  # (1, 512)-token windows of train-split text
    damp: float = Field(0.01, gt=0, lt=1)
    act_order: bool = True
    block: int = 128
    clip_grid: int = Field(1, ge=1)  # > 1: search each group's range shrink (energy-weighted rounding error) on this many points

    def apply(self, state, ctx):
        lm = causal_lm(state.torch_module(self.kind))
        named = self.linears(lm)
        batches = ctx.calibration(state.bundle, self.calibration_windows)
        qweights: dict[str, QuantizedWeight] = {}

        def quantize_layer(i, layer, hidden, kwargs):
            prefix = next(n for n, m in lm.named_modules() if m is layer)
            mine = {n: m for n, m in named.items() if n.startswith(prefix + ".")}
            stats = collect_stats(layer, hidden, kwargs, {n[len(prefix) + 1:]: m for n, m in mine.items()})
            for n, m in mine.items():
                q = gptq(m.weight, stats[n[len(prefix) + 1:]].H, self.spec_for(n), self.damp, self.act_order, self.block, n, self.clip_grid)
                qweights[n] = q
                m.weight.data = q.dequantize()  # later layers calibrate against the quantized model

        with torch.no_grad():
            layerwise(lm, batches, quantize_layer, ctx.progress)
        return self.finish(state, lm, qweights, "gptq")
