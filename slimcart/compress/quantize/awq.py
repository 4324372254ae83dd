"""AWQ: activation-aware weight quantization (Lin et al. 2023).

Input channels that carry large activations matter most; scaling such a channel's weights up by s
(and the activation down by 1/s, folded into the op that produces it) shrinks its relative rounding
error. Per "site" (an op feeding a set of Linears) the per-channel scale is s = mean|x|^alpha,
normalised, with alpha searched on a grid; alpha = 0 (no scaling) is on the grid, so the chosen
scales never do worse than plain RTN on the search metric. The metric is the exact output error on
the calibration tokens, tr(E H E^T) with E = W - Q(W diag s) diag(s)^-1 and H = X^T X / n.
Sites in a Llama decoder layer (the fp function is unchanged by each fold):
  input_layernorm -> q, k, v     (norm weight / s,  Linear columns * s)
  post_attention_layernorm -> gate, up
  up_proj -> down_proj           (up rows / s, down columns * s: exact through act(gate) * up)
  v_proj -> o_proj only without grouped-query attention (SmolLM2 has 3 KV heads for 9 query heads,
  so one v channel feeds three o channels and the fold is skipped).
Then an optional clipping search shrinks each (row, group) range where that lowers output error,
and the weights are quantized by RTN (or by GPTQ on the scaled Hessian).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ...arch import causal_lm
from ...recipe import register_step
from .calib_stats import InputStats, collect_stats
from .gptq import gptq
from .weight_only import WeightOnlyBase, WeightSpec, best_shrink, layerwise, rtn


def output_error(w: torch.Tensor, wq: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per-row mean squared output error of replacing w by wq on inputs with second moment H."""
    d = w - wq
    return ((d @ H) * d).sum(1)


def search_scale(weights: list[tuple[torch.Tensor, WeightSpec]], stats: InputStats, grid: int = 20) -> tuple[torch.Tensor, float]:
    """Best per-input-channel scale s (and its alpha) for Linears sharing one input."""
    base = stats.mean_abs.clamp_min(1e-6)
    best, best_s, best_a = float("inf"), torch.ones_like(base), 0.0
    for k in range(grid):
        alpha = k / grid
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 (keeps fp16 scales in range)
        loss = 0.0
        for w, spec in weights:
            wq = rtn(w * s[None, :], spec).dequantize() / s[None, :]
            loss += float(output_error(w, wq, stats.H).sum())
        if loss < best:
            best, best_s, best_a = loss, s, alpha
    return best_s, best_a


def fold_scales(prev: torch.nn.Module, linears: list[torch.nn.Linear], s: torch.Tensor) -> None:
    """Divide the producer of the Linears' input by s (an RMSNorm weight, or a Linear's output rows)
    and multiply the Linears' input columns by s: the float function is unchanged."""
    if isinstance(prev, torch.nn.Linear):
        prev.weight.data /= s[:, None]
        if prev.bias is not None:
            prev.bias.data /= s
    else:
        prev.weight.data /= s
    for lin in linears:
        lin.weight.data *= s[None, :]


def search_clip(w: torch.Tensor, H: torch.Tensor, spec: WeightSpec, ratios: int = 10, min_ratio: float = 0.5) -> torch.Tensor:
    """Per (row, group) shrink factor of the min/max range, in [min_ratio, 1], minimising that group's
    output error (its block of H; cross-group terms are left out)."""
    groups = spec.groups(w.shape[1])
    shrink = torch.ones(w.shape[0], len(groups))
    for g, (s, e) in enumerate(groups):
        wg, Hg = w[:, s:e], H[s:e, s:e]
        shrink[:, g] = best_shrink(wg, spec, lambda wq: output_error(wg, wq, Hg), ratios, min_ratio)  # noqa: B023
    return shrink


@register_step
class AWQStep(WeightOnlyBase):
    """AWQ weight-only quantization (scale search + optional clip search), layer by layer."""

    kind: Literal["weight_only_awq"] = "weight_only_awq"
    calibration_windows: int = Field(32, ge=1)
    grid: int = Field(20, ge=1)
    clip_search: bool = True
    quantizer: Literal["rtn", "gptq"] = "rtn"
    damp: float = Field(0.01, gt=0, lt=1)  # used when quantizer is gptq
    clip_grid: int = Field(1, ge=1)  # used when quantizer is gptq: per-group range shrink search (see gptq.fit_group)

    def apply(self, state, ctx):
        lm = causal_lm(state.torch_module(self.kind))
        named = self.linears(lm)
        batches = ctx.calibration(state.bundle, self.calibration_windows)
        qweights, alphas = {}, []
        skipped_vo = False

        def quantize_layer(i, layer, hidden, kwargs):
            nonlocal skipped_vo
            prefix = next(n for n, m in lm.named_modules() if m is layer) + "."
            mine = {n[len(prefix):]: m for n, m in named.items() if n.startswith(prefix)}
            stats = collect_stats(layer, hidden, kwargs, mine)
            att, mlp = layer.self_attn, layer.mlp
            sites = [(layer.input_layernorm, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                     (layer.post_attention_layernorm, ["mlp.gate_proj", "mlp.up_proj"]),
                     (mlp.up_proj, ["mlp.down_proj"])]
            if att.v_proj.out_features == att.o_proj.in_features:
                sites.append((att.v_proj, ["self_attn.o_proj"]))
            else:
                skipped_vo = True
            for prev, names in sites:
                names = [n for n in names if n in mine]
                if not names:
                    continue
                st = stats[names[0]]  # Linears of one site see the same tensor: one stats object
                s, a = search_scale([(mine[n].weight.float(), self.spec_for(prefix + n)) for n in names], st, self.grid)
                alphas.append(a)
                fold_scales(prev, [mine[n] for n in names], s)
                scaled = st.scaled(s)
                for n in names:
                    stats[n] = scaled
            for n, m in mine.items():
                spec, H = self.spec_for(prefix + n), stats[n].H
                if self.quantizer == "gptq":
                    q = gptq(m.weight, H, spec, self.damp, True, 128, prefix + n, self.clip_grid)
                else:
                    shrink = search_clip(m.weight.float(), H, spec) if self.clip_search else None
                    q = rtn(m.weight, spec, prefix + n, shrink)
                qweights[prefix + n] = q
                m.weight.data = q.dequantize()

        with torch.no_grad():
            layerwise(lm, batches, quantize_layer, ctx.progress)
        if skipped_vo:
            state.notes.append("AWQ: v_proj -> o_proj scaling skipped (grouped-query attention: one v channel feeds several o channels)")
        if alphas:
            state.notes.append(f"AWQ: chosen alpha mean {sum(alphas) / len(alphas):.2f} over {len(alphas)} sites")
        return self.finish(state, lm, qweights, "awq" if self.quantizer == "rtn" else "awq+gptq")
