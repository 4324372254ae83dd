"""Weight-only quantization of decoder LLM Linears: the group layout, round-to-nearest (RTN), the
layer-by-layer calibration driver shared by GPTQ and AWQ, and the `weight_only_rtn` step.

Layout. A Linear weight W [out, in] is cut along `in` into groups of `group_size` columns (None:
one group = the whole row, i.e. per output channel). Each (row, group) has a float16 scale and,
when asymmetric, an integer zero point z in [0, 2**bits - 1]; codes q are unsigned and
    W ~ (q - z) * scale            (symmetric: z = 2**(bits-1), implied and not stored).
Integer zero points are what ONNX Runtime's MatMulNBits fast path (int8 dot products on VNNI)
accepts, so the values computed here are exactly the values the kernel multiplies with. The range
of a group always contains 0 (z is then a valid code). When `group_size` does not divide `in`
(SmolLM2's 576 = 4.5 * 128), `partial_last_group: true` lets the last group be shorter, as
MatMulNBits does; otherwise it is an error.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, model_validator

from ...errors import SlimcartError
from ...recipe import Step, register_step

SUPPORTED_BITS = (2, 3, 4, 8)


class WeightSpec(BaseModel):
    """Bits and grouping of weight-only quantization."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    bits: int = 4
    group_size: int | None = 128  # None: per output channel
    symmetric: bool = False
    zero_point: Literal["int", "float"] = "int"  # asymmetric only
    partial_last_group: bool = False

    @model_validator(mode="before")
    @classmethod
    def _check(cls, v):
        if isinstance(v, dict):
            bits, g = v.get("bits", 4), v.get("group_size", 128)
            if bits not in SUPPORTED_BITS or isinstance(bits, bool):
                raise SlimcartError(f"weight-only bits must be one of {SUPPORTED_BITS}, got {bits!r}")
            if g is not None and (not isinstance(g, int) or g < 16 or g & (g - 1)):
                raise SlimcartError(f"group_size must be a power of two >= 16 (or null for per-channel), got {g!r}")
        return v

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int, name: str = "weight") -> list[tuple[int, int]]:
        """[(start, end)] column ranges of the groups of a row of `in_features` columns."""
        g = self.group_size or in_features
        if in_features % g and not self.partial_last_group:
            raise SlimcartError(
                f"group_size {g} does not divide in_features {in_features} of {name} "
                "(set partial_last_group: true to allow a shorter last group)")
        return [(s, min(s + g, in_features)) for s in range(0, in_features, g)]


@dataclass
class QuantizedWeight:
    """Codes [out, in] uint8; scale [out, n_groups] float16; zero [out, n_groups] uint8 (zero_point int)
    or offset [out, n_groups] float16 (zero_point float); neither when symmetric."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: WeightSpec
    offset: torch.Tensor | None = None
    codebook: torch.Tensor | None = None  # [out, 2**bits] float16: k-means levels (codes index them)

    def offsets(self) -> torch.Tensor:
        """m per (row, group) in float32: W = codes * scale + m."""
        if self.offset is not None:
            return self.offset.float()
        z = self.zero.float() if self.zero is not None else torch.full_like(self.scale, 2 ** (self.spec.bits - 1), dtype=torch.float32)
        return -z * self.scale.float()

    def per_column(self, t: torch.Tensor) -> torch.Tensor:
        """Expand a per-(row, group) tensor to [out, in]."""
        idx = torch.cat([torch.full((e - s,), i) for i, (s, e) in enumerate(self.spec.groups(self.codes.shape[1]))])
        return t[:, idx]

    def dequantize(self) -> torch.Tensor:
        """The float32 weight the kernels compute with."""
        if self.codebook is not None:
            return torch.gather(self.codebook.float(), 1, self.codes.long())
        return self.codes.float() * self.per_column(self.scale.float()) + self.per_column(self.offsets())


def check_weight(w: torch.Tensor, name: str) -> None:
    if w.dim() != 2 or w.numel() == 0:
        raise SlimcartError(f"{name}: expected a non-empty 2-D weight, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise SlimcartError(f"{name}: weight contains NaN or inf values; refusing to quantize")


def fit_params(w: torch.Tensor, spec: WeightSpec, shrink: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) per row of `w` [rows, cols] covering its range shrunk by `shrink` (clipping).

    The scale (and a float offset) are rounded to float16 first, so codes are computed against the
    stored values."""
    lo, hi = w.min(dim=1).values * shrink, w.max(dim=1).values * shrink
    tiny = 1e-8
    if spec.symmetric:
        half = 2 ** (spec.bits - 1)
        scale = (torch.maximum(-lo, hi) / (half - 1)).clamp_min(tiny).half().float()
        return scale, -half * scale
    if spec.zero_point == "float":
        scale = ((hi - lo) / spec.maxq).clamp_min(tiny).half().float()
        return scale, lo.half().float()
    lo, hi = lo.clamp_max(0), hi.clamp_min(0)
    scale = ((hi - lo) / spec.maxq).clamp_min(tiny).half().float()
    return scale, -torch.round(-lo / scale).clamp(0, spec.maxq) * scale


def quantize_cols(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """Codes (as float) of columns `w` [rows, k] under per-row (scale, offset) [rows]."""
    return torch.round((w - offset[:, None]) / scale[:, None]).clamp(0, spec.maxq)


def fake_cols(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    return quantize_cols(w, scale, offset, spec) * scale[:, None] + offset[:, None]


def best_shrink(w: torch.Tensor, spec: WeightSpec, row_error: Callable[[torch.Tensor], torch.Tensor], ratios: int = 10,
                min_ratio: float = 0.5) -> torch.Tensor:
    """Per-row range shrink of `w` [rows, cols] in [min_ratio, 1] (a `ratios`-point grid from 1 down)
    minimising `row_error(fake-quantized w)` [rows]; 1 (plain min/max) wins ties."""
    best = torch.full((w.shape[0],), float("inf"))
    shrink = torch.ones(w.shape[0])
    for k in range(ratios):
        r = 1.0 - (1.0 - min_ratio) * k / max(ratios - 1, 1)
        scale, offset = fit_params(w, spec, r)
        err = row_error(fake_cols(w, scale, offset, spec))
        better = err < best
        best = torch.where(better, err, best)
        shrink[better] = r
    return shrink


def make_qweight(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, spec: WeightSpec) -> QuantizedWeight:
    """Package codes and per-(row, group) float32 (scale, offset) in the stored dtypes."""
    zero = off = None
    if not spec.symmetric and spec.zero_point == "int":
        zero = torch.round(-offset / scale).to(torch.uint8)  # exact: offset = -z * scale
    elif not spec.symmetric:
        off = offset.half()
    return QuantizedWeight(codes.to(torch.uint8), scale.half(), zero, spec, off)


def rtn(w: torch.Tensor, spec: WeightSpec, name: str = "weight", shrink: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest: min/max per group (optionally shrunk per [out, n_groups] by `shrink`)."""
    w = w.detach().float()
    check_weight(w, name)
    groups = spec.groups(w.shape[1], name)
    codes = torch.empty(w.shape)
    scales, offsets = torch.empty(w.shape[0], len(groups)), torch.empty(w.shape[0], len(groups))
    for i, (s, e) in enumerate(groups):
        scales[:, i], offsets[:, i] = fit_params(w[:, s:e], spec, 1.0 if shrink is None else shrink[:, i])
        codes[:, s:e] = quantize_cols(w[:, s:e], scales[:, i], offsets[:, i], spec)
    return make_qweight(codes, scales, offsets, spec)


# ---------------------------------------------------------------- which Linears, layer by layer

DEFAULT_TARGETS = ["*.self_attn.q_proj", "*.self_attn.k_proj", "*.self_attn.v_proj", "*.self_attn.o_proj",
                   "*.mlp.gate_proj", "*.mlp.up_proj", "*.mlp.down_proj"]


def causal_lm(module: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face *ForCausalLM inside the workload's wrapper (or the module itself)."""
    for m in (module, getattr(module, "model", None)):
        if m is not None and hasattr(getattr(m, "model", None), "layers") and hasattr(m, "lm_head"):
            return m
    raise SlimcartError("weight-only LLM quantization needs a decoder LM with model.layers (e.g. Llama)")


def match(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class Catcher(Exception):
    """Raised by a hook to stop the forward pass once the first decoder layer's inputs are captured."""


@torch.no_grad()
def layer_inputs(lm: torch.nn.Module, batches: list[dict]) -> tuple[list[torch.Tensor], list[dict]]:
    """Hidden states entering decoder layer 0 for each calibration batch, with the kwargs it gets
    (rotary embeddings, mask, positions) so each layer can be re-run on its own."""
    if not batches:
        raise SlimcartError("calibration data is empty")
    hidden, kwargs = [], []

    def grab(_mod, args, kw):
        hidden.append((args[0] if args else kw.pop("hidden_states")).detach())
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise Catcher

    handle = lm.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for b in batches:
            try:
                lm(input_ids=torch.as_tensor(b["input_ids"]), use_cache=False)
            except Catcher:
                pass
    finally:
        handle.remove()
    return hidden, kwargs


def run_layer(layer: torch.nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for h, kw in zip(hidden, kwargs):
            y = layer(h, **kw)
            out.append((y[0] if isinstance(y, tuple) else y).detach())
    return out


def layerwise(lm: torch.nn.Module, batches: list[dict], quantize_layer: Callable[[int, torch.nn.Module, list, list], None],
              progress: Callable[[str], None] = lambda m: None) -> None:
    """Walk the decoder: inputs of layer i are the outputs of the already-quantized layers 0..i-1,
    so each layer's calibration sees the errors of the layers before it; only one layer's
    activations are held at a time."""
    hidden, kwargs = layer_inputs(lm, batches)
    for i, layer in enumerate(lm.model.layers):
        progress(f"layer {i + 1}/{len(lm.model.layers)}")
        quantize_layer(i, layer, hidden, kwargs)
        hidden = run_layer(layer, hidden, kwargs)


def quantize_linear_set(lm: torch.nn.Module, targets: list[str]) -> list[tuple[str, torch.nn.Linear]]:
    named = [(n, m) for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear) and match(n, targets)]
    if not named:
        raise SlimcartError(f"no Linear layer matches {targets}")
    for n, m in named:
        check_weight(m.weight, n)
    return named


# ---------------------------------------------------------------- the RTN step

class WeightOnlyBase(Step):
    """Shared fields of the weight-only steps (RTN, GPTQ, AWQ)."""

    workloads: ClassVar[tuple[str, ...] | None] = ("llm",)
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    zero_point: Literal["int", "float"] = "int"
    partial_last_group: bool = True
    targets: list[str] = DEFAULT_TARGETS
    overrides: dict[str, dict] = {}  # fnmatch pattern -> {bits/group_size/symmetric}, e.g. keep one layer int8
    embedding_bits: Literal[8, 16] = 8  # tied embedding / lm_head: int8 per row, or float16
    # MatMulNBits arithmetic: int8 dot products on VNNI (activations quantized per block, fast) or fp32
    # (the weights' own error only, ~1% lower perplexity on SmolLM2, but ORT's fp32 path decoded 13x
    # slower here: docs/bench-quantization-llm.md)
    compute: Literal["int8", "fp32"] = "int8"

    def spec_for(self, name: str) -> WeightSpec:
        base = {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "zero_point": self.zero_point, "partial_last_group": self.partial_last_group}
        for pat, over in self.overrides.items():
            if fnmatch.fnmatchcase(name, pat):
                base.update(over)
        return WeightSpec(**base)

    def finish(self, state, ctx, lm, qweights: dict[str, QuantizedWeight], method: str):
        """Put the dequantized weights into the model (for torch evaluation) and hand the packed
        weights to the saver, which writes the int4/int8 artifact run by ONNX Runtime MatMulNBits."""
        from .int4_kernels import attach_packed

        for name, mod in lm.named_modules():
            if name in qweights:
                mod.weight.data = qweights[name].dequantize()
        return attach_packed(state, lm, qweights, method, self.embedding_bits, self.compute)


@register_step
class WeightOnlyRTN(WeightOnlyBase):
    """Round-to-nearest weight-only quantization of the decoder Linears (no calibration data)."""

    kind: Literal["weight_only_rtn"] = "weight_only_rtn"

    def apply(self, state, ctx):
        lm = causal_lm(state.bundle.module)
        named = quantize_linear_set(lm, self.targets)
        q = {n: rtn(m.weight, self.spec_for(n), n) for n, m in named}
        return self.finish(state, ctx, lm, q, "rtn")
