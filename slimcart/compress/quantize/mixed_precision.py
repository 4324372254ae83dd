"""Sensitivity-guided mixed precision: quantize one Linear at a time (W8A8 fake-quant), measure how far the
model's outputs move on calibration batches, then keep the most sensitive layers in fp32 until the whole
quantized model meets the user's budget.

Quality drop = 1 - mean cosine(quantized outputs, fp32 outputs) over the calibration batches (for the
search workload: embedding agreement on dev-split texts, never the evaluation split). The chosen layers
are handed to the next `static_int8` step through `ModelState.keep_fp32`.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Literal

import torch
from pydantic import Field

from ...arch import LayerSelect, run_batch
from ...errors import SlimcartError
from ...recipe import Step, register_step
from .fake_quant import (
    FakeQuantConfig,
    FakeQuantLinear,
    calibrate_,
    quantize_,
    spread_batches,
)
from .schemes import QuantScheme

Forward = Callable[[torch.nn.Module, Any], torch.Tensor]


class MixedPrecisionConfig(LayerSelect):
    """max_drop: allowed 1 - mean output cosine; max_layers: most layers kept fp32 (bytes and speed cost);
    score_batches: batches (spread over the calibration list) the drop is measured on. Linears outside
    `targets` / in `exclude` are never quantized anyway (not scored)."""

    max_drop: float = Field(0.002, gt=0, lt=1)
    max_layers: int = Field(6, ge=0)
    score_batches: int = Field(8, ge=1)
    w8a8: FakeQuantConfig = FakeQuantConfig(
        weight=QuantScheme(bits=8, symmetric=True, granularity="per_channel"),
        activation=QuantScheme(bits=8, symmetric=False, granularity="per_tensor"),
    )


def output_drop(model: torch.nn.Module, batches: list, forward: Forward, reference: list[torch.Tensor]) -> float:
    """1 - mean cosine between `model`'s outputs and the fp32 reference outputs, row by row."""
    cos = []
    with torch.no_grad():
        for b, ref in zip(batches, reference):
            out = forward(model, b).double().reshape(ref.shape[0], -1)  # float64: tiny drops must not round to 0
            cos.append(torch.nn.functional.cosine_similarity(out, ref.double().reshape(ref.shape[0], -1), dim=1))
    return float(1 - torch.cat(cos).mean())


def _linear_names(model: torch.nn.Module, select: LayerSelect) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and select.selects(n)]


class _Simulator:
    """One fake-quantized copy of the model, activation ranges calibrated once on all batches with the
    float model (as static_int8 calibrates); layers are then switched on/off to simulate any mix."""

    def __init__(self, model, names, cfg: MixedPrecisionConfig, batches, forward):
        if not batches:
            raise SlimcartError("mixed precision needs calibration data (got no batches)")
        self.forward, self.score = forward, spread_batches(batches, cfg.score_batches)
        with torch.no_grad():
            self.ref = [forward(model, b).float() for b in self.score]
        self.model = copy.deepcopy(model)
        wanted = set(names)
        quantize_(self.model, cfg.w8a8, filter_fn=lambda n, m: n in wanted)
        calibrate_(self.model, lambda: [forward(self.model, b) for b in batches])
        self.layers = {n: m for n, m in self.model.named_modules() if isinstance(m, FakeQuantLinear)}

    def drop(self, quantized: set[str]) -> float:
        for n, m in self.layers.items():
            m.enabled = n in quantized
        return output_drop(self.model, self.score, self.forward, self.ref)


def layer_sensitivity(model: torch.nn.Module, batches: list, forward: Forward, cfg: MixedPrecisionConfig,
                      names: list[str] | None = None, progress: Callable[[str], None] = lambda m: None,
                      sim: _Simulator | None = None) -> dict[str, float]:
    """Quality drop when only that Linear is W8A8 fake-quantized, for each Linear (model left unchanged)."""
    names = names if names is not None else _linear_names(model, cfg)
    sim = sim or _Simulator(model, names, cfg, batches, forward)
    out = {}
    for i, n in enumerate(names):
        out[n] = sim.drop({n})
        progress(f"sensitivity {i + 1}/{len(names)}: {n} drop {out[n]:.2e}")
    return out


def choose_fp32_layers(model: torch.nn.Module, batches: list, forward: Forward, cfg: MixedPrecisionConfig,
                       progress: Callable[[str], None] = lambda m: None) -> dict:
    """Greedy: quantize everything, then return layers to fp32 most-sensitive first until the drop fits.
    Returns {"keep_fp32": [...], "drop": final drop, "drop_all_int8": ..., "sensitivity": {...}, "met": bool}."""
    names = _linear_names(model, cfg)
    if not names:
        raise SlimcartError("mixed precision found no nn.Linear layers")
    sim = _Simulator(model, names, cfg, batches, forward)
    sens = layer_sensitivity(model, batches, forward, cfg, names, progress, sim)
    order = sorted(names, key=lambda n: -sens[n])
    keep: list[str] = []
    drop = drop_all = sim.drop(set(names))
    progress(f"all layers int8: drop {drop:.2e} (budget {cfg.max_drop:.2e})")
    while drop > cfg.max_drop and len(keep) < min(cfg.max_layers, len(names) - 1):
        keep.append(order[len(keep)])
        drop = sim.drop(set(names) - set(keep))
        progress(f"keeping {len(keep)} layer(s) fp32 ({keep[-1]}): drop {drop:.2e}")
    return {"keep_fp32": keep, "drop": drop, "drop_all_int8": drop_all, "met": drop <= cfg.max_drop,
            "sensitivity": dict(sorted(sens.items(), key=lambda kv: -kv[1]))}


@register_step
class MixedPrecision(MixedPrecisionConfig, Step):
    """Pick the layers to keep fp32 for the following static_int8 step (sensitivity-guided, W8A8 simulated)."""

    kind: Literal["mixed_precision"] = "mixed_precision"
    workloads = ("search",)
    calibration_batches: int = Field(32, ge=1)  # ranges are calibrated on all of them, as static_int8 does

    def apply(self, state, ctx):
        module = state.torch_module(self.kind)
        batches = ctx.calibration(state.bundle, self.calibration_batches)
        ctx.progress("measuring per-layer int8 sensitivity")
        res = choose_fp32_layers(module, batches, run_batch, self, ctx.progress)
        # SmoothedLinear wraps the Linear as `.linear`; static_int8 names layers without that level
        res["keep_fp32"] = [n[: -len(".linear")] if n.endswith(".linear") else n for n in res["keep_fp32"]]
        state.keep_fp32 += res["keep_fp32"]
        state.reports[self.kind] = res
        verdict = "met" if res["met"] else f"NOT met with {self.max_layers} layers kept fp32"
        state.notes.append(
            f"mixed precision: all-int8 simulated drop {res['drop_all_int8']:.2e} -> {res['drop']:.2e} keeping "
            f"{len(res['keep_fp32'])} layer(s) fp32 ({', '.join(res['keep_fp32']) or 'none'}); budget {self.max_drop} {verdict}")
        return state
