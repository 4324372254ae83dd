"""Per-layer sensitivity, measured on the validation split: the ranking the planner's seed trials and its
"layers kept at higher precision" parameter use, and the report's sensitivity plot.

    W8A8 (search, recsys)   each nn.Linear alone W8A8 fake-quantized (per-channel symmetric int8 weights,
                            per-tensor int8 activations calibrated on the calibration split: the scheme
                            static_int8 runs); sensitivity = relative loss of the primary metric.
    4-bit (llm)             each decoder layer's Linears alone rounded to 4 bits (RTN, group 128,
                            asymmetric); sensitivity = relative increase of validation perplexity.

One validation evaluation per layer, on the screening subset of validation; the model is restored after.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch

from ..arch import run_batch
from ..compress.quantize.fake_quant import FakeQuantLinear, calibrate_, quantize_
from ..compress.quantize.mixed_precision import MixedPrecisionConfig
from ..compress.quantize.weight_only import DEFAULT_TARGETS, WeightSpec, rtn
from ..contracts import Progress, no_progress
from ..arch import matches
from .trial import quality_loss


def _score(wl, bundle, module, vdata, base: float, hib: bool, reference: Any = None) -> tuple[float, float]:
    """(relative loss of the primary metric, 1 - cosine to the baseline's outputs when the workload
    reports it): the second figure orders layers whose metric does not move on a small validation set."""
    q = wl.evaluate(wl.torch_runner(replace(bundle, module=module)), bundle, vdata, reference=reference).quality
    return quality_loss(base, q[wl.primary_metric], hib), (1.0 - q["cosine"]) if "cosine" in q and reference is not None else 0.0


@torch.no_grad()
def linear_w8a8(wl, bundle, vdata, calib: list[Any], base: float, reference: Any = None,
                progress: Progress = no_progress) -> dict[str, float]:
    """{Linear name: validation loss when only it runs W8A8}, most sensitive first (ties: by cosine drop)."""
    model = copy.deepcopy(bundle.module).eval()
    names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    quantize_(model, MixedPrecisionConfig().w8a8, filter_fn=lambda n, m: n in set(names))
    calibrate_(model, lambda: [run_batch(model, b) for b in calib])
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    hib = wl.higher_is_better[wl.primary_metric]
    out, tie = {}, {}
    for i, n in enumerate(layers):
        for other, m in layers.items():
            m.enabled = other == n
        out[n], tie[n] = _score(wl, bundle, model, vdata, base, hib, reference)
        progress(f"sensitivity {i + 1}/{len(layers)}: {n} {out[n]:+.4%}")
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], -tie[kv[0]])))


@torch.no_grad()
def decoder_4bit(wl, bundle, vdata, base: float, progress: Progress = no_progress) -> dict[int, float]:
    """{decoder layer index: validation perplexity increase when only its Linears are 4-bit}, most sensitive first."""
    from ..arch import detect

    model = bundle.module
    spec = WeightSpec(bits=4, group_size=128, symmetric=False, partial_last_group=True)
    hib = wl.higher_is_better[wl.primary_metric]
    out = {}
    blocks = detect(model).layers
    for i, block in enumerate(blocks):
        lins = {n: m for n, m in block.named_modules() if type(m) is torch.nn.Linear
                and matches("x." + n, DEFAULT_TARGETS)}
        saved = {n: m.weight.data.clone() for n, m in lins.items()}
        try:
            for n, m in lins.items():
                m.weight.data = rtn(m.weight, spec, n).dequantize().to(m.weight.dtype)
            out[i] = _score(wl, bundle, model, vdata, base, hib)[0]
        finally:
            for n, m in lins.items():
                m.weight.data = saved[n]
        progress(f"sensitivity {i + 1}/{len(blocks)}: layer {i} {out[i]:+.4%}")
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))
