"""SmoothQuant: move activation outliers into the weights before W8A8 quantization.

For a Linear y = x W^T, pick a per-input-channel scale s and compute y = (x / s)(W diag(s))^T: the same
function, but the activation x / s has flatter channels (easier to quantize per tensor) and the
weight absorbs the range (easy to quantize per output channel).
    s_j = max|x_j|^alpha / max|W_:j|^(1 - alpha)            (Xiao et al., 2023)
alpha is searched on calibration batches: smooth, fake-quantize W8A8, keep the alpha whose outputs are
closest to the fp32 model's.

Where the 1/s goes. In pre-LN decoders it folds into the preceding norm. In post-LN BERT encoders the
LayerNorm output also feeds the residual add, so folding it there would change the function; the 1/s
is an explicit per-channel multiply on the Linear input instead (`SmoothedLinear`; linears that read
the same tensor, e.g. Q/K/V, share one s). Scales are rounded to powers of two, so x * 2^-k and
W * 2^k are exact in floating point and the smoothed fp32 model computes bit-for-bit the same outputs
as the original (see tests).
"""
from __future__ import annotations

import copy
from typing import Annotated, Any, Callable, Literal

import torch
from pydantic import Field

from ...arch import LayerSelect, run_batch
from ...errors import SlimcartError
from ...recipe import Step, register_step
from .fake_quant import (
    FakeQuantConfig,
    calibrate_,
    dequantize_,
    quantize_,
    spread_batches,
)
from .schemes import QuantScheme


class SmoothQuantConfig(LayerSelect):
    """alpha: migration strength (0 = none, 1 = all onto weights); `alphas` is the search grid used when
    alpha is "auto", each scored on `score_batches` batches spread over the calibration list. Linears
    outside `targets` / in `exclude` are left untouched."""

    alpha: Annotated[float, Field(ge=0, le=1)] | Literal["auto"] = "auto"
    alphas: list[Annotated[float, Field(ge=0, le=1)]] = Field([0.5, 0.6, 0.7, 0.8, 0.9], min_length=1)
    pow2: bool = True
    score_batches: int = Field(8, ge=1)


class SmoothedLinear(torch.nn.Module):
    """Linear whose input is multiplied per channel by `inv_scale` (= 1/s) and whose weight carries s."""

    def __init__(self, linear: torch.nn.Linear, inv_scale: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.register_buffer("inv_scale", inv_scale.to(linear.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.inv_scale)


def _linear_names(model: torch.nn.Module, select: LayerSelect) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and select.selects(n)]


def collect_input_stats(model: torch.nn.Module, run: Callable[[], Any], names: list[str]) -> tuple[dict, list[list[str]]]:
    """Per-input-channel max |x| of each named Linear over `run()`, and groups of Linears that read the
    very same input tensor (they must share one smoothing scale)."""
    amax: dict[str, torch.Tensor] = {}
    first_src: dict[str, int] = {}
    groups: dict[int, list[str]] = {}
    alive: list[torch.Tensor] = []  # keep first-batch inputs alive so no two tensors share an id()
    hooks = []

    def hook(name):
        def fn(mod, inp):
            x = inp[0].detach()
            if not torch.isfinite(x).all():
                raise SlimcartError(f"NaN or inf activations entering {name}")
            m = x.abs().reshape(-1, x.shape[-1]).amax(0).float()
            amax[name] = m if name not in amax else torch.maximum(amax[name], m)
            if name not in first_src:  # identify the producer by the tensor object seen on the first batch
                key = id(inp[0])
                alive.append(inp[0])
                first_src[name] = key
                groups.setdefault(key, []).append(name)
        return fn

    for n in names:
        hooks.append(model.get_submodule(n).register_forward_pre_hook(hook(n)))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
        alive.clear()
    return amax, [g for g in groups.values() if all(n in amax for n in g)]


def smooth_scales(act_amax: torch.Tensor, weights: list[torch.Tensor], alpha: float, pow2: bool) -> torch.Tensor:
    """s_j = max|x_j|^alpha / max_i|W_ij|^(1-alpha) over all weights of the group, optionally rounded to 2^k."""
    w_amax = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)
    s = act_amax.clamp_min(1e-5).pow(alpha) / w_amax.clamp_min(1e-5).pow(1 - alpha)
    s = torch.where((act_amax > 0) & (w_amax > 0), s, torch.ones_like(s))
    if pow2:
        s = torch.pow(2.0, torch.round(torch.log2(s)))
    return s


def apply_smoothing_(model: torch.nn.Module, act_amax: dict, groups: list[list[str]], alpha: float, pow2: bool = True) -> int:
    """Smooth every group in place (wrapping its Linears in SmoothedLinear); returns how many Linears."""
    from .fake_quant import _set_module

    count = 0
    for group in groups:
        lins = [model.get_submodule(n) for n in group]
        s = smooth_scales(act_amax[group[0]], [m.weight for m in lins], alpha, pow2)
        for name, lin in zip(group, lins):
            with torch.no_grad():
                lin.weight.mul_(s.to(lin.weight.dtype))
            _set_module(model, name, SmoothedLinear(lin, 1.0 / s))
            count += 1
    return count


def smoothquant_(model: torch.nn.Module, batches: list, forward: Callable[[torch.nn.Module, Any], torch.Tensor],
                 config: SmoothQuantConfig | None = None) -> dict:
    """Apply SmoothQuant in place. `forward(model, batch)` returns the model output used to score alphas.
    Returns {"alpha": chosen, "scores": {alpha: mean output MSE vs fp32 under W8A8 fake-quant}, "linears": n}."""
    cfg = config or SmoothQuantConfig()
    if not batches:
        raise SlimcartError("SmoothQuant needs calibration data (got no batches)")
    names = _linear_names(model, cfg)
    if not names:
        raise SlimcartError("SmoothQuant found no nn.Linear layers to smooth")
    run = lambda m=model: [forward(m, b) for b in batches]  # noqa: E731
    amax, groups = collect_input_stats(model, run, names)
    scores: dict[float, float] = {}
    if cfg.alpha == "auto":
        # Ranges are calibrated on every batch (as the int8 step will); the error is scored on a spread subset.
        score = spread_batches(batches, cfg.score_batches)
        with torch.no_grad():
            ref = [forward(model, b).float() for b in score]
        for a in cfg.alphas:
            trial = copy.deepcopy(model)
            apply_smoothing_(trial, amax, groups, a, cfg.pow2)
            fq = FakeQuantConfig(weight=QuantScheme(bits=8), activation=QuantScheme(bits=8, symmetric=False, granularity="per_tensor"))
            quantize_(trial, fq)
            calibrate_(trial, lambda t=trial: [forward(t, b) for b in batches])
            with torch.no_grad():
                err = sum(float(((forward(trial, b).float() - r) ** 2).mean()) for b, r in zip(score, ref)) / len(ref)
            scores[a] = err
            dequantize_(trial)
            del trial
        alpha = min(scores, key=scores.get)
    else:
        alpha = float(cfg.alpha)
    n = apply_smoothing_(model, amax, groups, alpha, cfg.pow2)
    return {"alpha": alpha, "scores": scores, "linears": n, "groups": len(groups)}


@register_step
class SmoothQuantStep(SmoothQuantConfig, Step):
    """SmoothQuant scale migration on the PyTorch model (function unchanged); follow with `static_int8`
    for the real W8A8 kernels."""

    kind: Literal["smoothquant"] = "smoothquant"
    workloads = ("search",)  # the W8A8 execution path (static_int8) is wired for encoders
    calibration_batches: int = Field(32, ge=1)  # channel maxima need the same coverage as the int8 step's ranges

    def apply(self, state, ctx):
        module = state.torch_module(self.kind)
        batches = ctx.calibration(state.bundle, self.calibration_batches)
        ctx.progress("SmoothQuant: searching the migration strength alpha" if self.alpha == "auto" else "SmoothQuant")
        info = smoothquant_(module, batches, run_batch, self)
        state.notes.append(f"SmoothQuant alpha={info['alpha']} on {info['linears']} Linear layers "
                           f"({info['groups']} shared-input groups, power-of-two scales)")
        state.reports[self.kind] = info
        return state
