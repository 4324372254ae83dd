"""Fake-quant simulation: any `QuantScheme` on the weights and/or input activations of nn.Linear layers,
so quality can be studied before a kernel exists. Nothing here is faster than fp32 — reports must say
such results are simulated.

    cfg = FakeQuantConfig(weight=QuantScheme(bits=4, granularity="per_group", group_size=128),
                          activation=QuantScheme(bits=8, symmetric=False, granularity="per_tensor"),
                          overrides=[LayerOverride(pattern="*.output.dense", skip=True)])
    quantize_(model, cfg)                 # wraps every matching nn.Linear in a FakeQuantLinear
    calibrate_(model, lambda: [model(**b) for b in batches])   # activation ranges from observers
    model(**batch)                        # simulated quantized forward
"""
from __future__ import annotations

import fnmatch
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from ...errors import SlimcartError
from .observers import ObserverKind, make_observer
from .schemes import QuantScheme, compute_params, dequantize, quantize_with


class LayerOverride(BaseModel):
    """Per-layer exception, matched on the module's qualified name with fnmatch (first match wins)."""

    model_config = ConfigDict(extra="forbid")
    pattern: str
    skip: bool = False  # keep this layer in float
    weight: QuantScheme | None = None
    activation: QuantScheme | None = None


class FakeQuantConfig(BaseModel):
    """Which schemes to simulate. `activation=None` simulates weight-only quantization."""

    model_config = ConfigDict(extra="forbid")
    weight: QuantScheme | None = QuantScheme(bits=8, symmetric=True, granularity="per_channel")
    activation: QuantScheme | None = None
    observer: ObserverKind = "minmax"
    observer_args: dict = {}
    overrides: list[LayerOverride] = []

    @field_validator("activation")
    @classmethod
    def _per_tensor(cls, v):
        if v is not None and v.granularity != "per_tensor":
            raise SlimcartError("activation schemes are calibrated per tensor: use granularity per_tensor")
        if v is not None and v.levels != "uniform":
            raise SlimcartError("activation schemes must use uniform levels (no kernel takes codebook activations)")
        return v

    def for_layer(self, name: str) -> tuple[QuantScheme | None, QuantScheme | None] | None:
        """(weight scheme, activation scheme) for module `name`, or None to leave it alone."""
        for o in self.overrides:
            if fnmatch.fnmatchcase(name, o.pattern):
                if o.skip:
                    return None
                return (o.weight or self.weight, o.activation or self.activation)
        return self.weight, self.activation


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() whose gradient is the identity (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fake_quant_affine(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float, qmin: int, qmax: int) -> torch.Tensor:
    """Differentiable affine fake-quant: STE through round; the clamp makes the scale gradient the LSQ one
    (round(x/s) - x/s inside the range, qmin/qmax outside)."""
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


class FakeQuantLinear(torch.nn.Module):
    """nn.Linear whose weight (and optionally input) pass through fake quantization.

    mode: "observe" feeds the input to the activation observer and runs in float; "quant" simulates.
    """

    def __init__(self, linear: torch.nn.Linear, weight: QuantScheme | None, activation: QuantScheme | None,
                 observer: str = "minmax", observer_args: dict | None = None):
        super().__init__()
        self.linear, self.weight_scheme, self.act_scheme = linear, weight, activation
        self.observer = make_observer(observer, **(observer_args or {})) if activation is not None else None
        self.mode = "quant"
        self.enabled = True  # False: behave as the float Linear (lets sensitivity scans toggle layers cheaply)
        self.register_buffer("act_scale", None, persistent=False)
        self.register_buffer("act_zero", None, persistent=False)
        self.act_log_scale: torch.nn.Parameter | None = None  # set by QAT to learn the scale (LSQ)
        self._wq_cache: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self):
        return self.linear.bias

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the kernel would see it (cached in eval mode; STE-differentiable in training)."""
        w = self.linear.weight
        if self.weight_scheme is None:
            return w
        if not self.training and self._wq_cache is not None:
            return self._wq_cache
        codes_params = compute_params(w, self.weight_scheme)
        wq = dequantize(quantize_with(w, codes_params), codes_params).to(w.dtype)
        wq = w + (wq - w).detach()  # STE: gradients reach the float weight unchanged
        if not self.training:
            self._wq_cache = wq.detach()
        return wq

    def train(self, mode: bool = True):
        self._wq_cache = None
        return super().train(mode)

    def freeze_activation(self) -> None:
        """Turn the observer's range into fixed activation quantization parameters."""
        if self.observer is None:
            return
        p = self.observer.params(self.act_scheme)
        self.act_scale = p.scale.reshape(())
        self.act_zero = (p.zero_point.float() if p.zero_point is not None else torch.zeros(1)).reshape(())
        self.mode = "quant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":  # calibration sees the float model, as the int8 export's calibration does
            if self.observer is not None:
                self.observer.update(x)
            return self.linear(x)
        if not self.enabled:
            return self.linear(x)
        if self.act_scheme is not None:
            if self.act_scale is None:
                raise SlimcartError("activation quantization needs calibration first (run calibrate_)")
            else:
                scale = self.act_scale if self.act_log_scale is None else self.act_log_scale.exp()
                x = fake_quant_affine(x, scale, self.act_zero, self.act_scheme.qmin, self.act_scheme.qmax)
        return torch.nn.functional.linear(x, self.quantized_weight(), self.linear.bias)


def quantize_(model: torch.nn.Module, config: FakeQuantConfig,
              filter_fn: Callable[[str, torch.nn.Module], bool] | None = None) -> list[str]:
    """Wrap every nn.Linear of `model` (that `filter_fn(name, module)` accepts and no `skip` override
    excludes) in a FakeQuantLinear, in place. Returns the wrapped module names."""
    targets = [(n, m) for n, m in model.named_modules() if type(m) is torch.nn.Linear and (filter_fn is None or filter_fn(n, m))]
    wrapped = []
    for name, lin in targets:
        if not torch.isfinite(lin.weight).all():
            raise SlimcartError(f"layer {name} has NaN or inf weights")
        schemes = config.for_layer(name)
        if schemes is None or (schemes[0] is None and schemes[1] is None):
            continue
        _set_module(model, name, FakeQuantLinear(lin, *schemes, observer=config.observer, observer_args=config.observer_args))
        wrapped.append(name)
    return wrapped


def calibrate_(model: torch.nn.Module, run: Callable[[], object]) -> None:
    """Observe activations while `run()` feeds calibration batches, then freeze the ranges."""
    layers = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    for m in layers:
        m.mode = "observe"
    try:
        with torch.no_grad():
            run()
    finally:
        for m in layers:
            m.mode = "quant"
    for m in layers:
        m.freeze_activation()


def spread_batches(batches: list, k: int) -> list:
    """k batches evenly spaced over `batches` (a workload's calibration list may be ordered, e.g. all short
    queries first, so its first k batches are not a fair sample)."""
    if k >= len(batches):
        return list(batches)
    step = len(batches) / k
    return [batches[int(i * step)] for i in range(k)]


def dequantize_(model: torch.nn.Module) -> None:
    """Replace every FakeQuantLinear by its float nn.Linear again (in place)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, FakeQuantLinear):
            _set_module(model, name, m.linear)


def _set_module(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
