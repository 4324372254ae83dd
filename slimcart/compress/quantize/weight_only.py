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

from typing import Callable, ClassVar, Literal

import torch
from pydantic import model_validator

from ...arch import LayerSelect, causal_lm, first_match
from ...errors import SlimcartError
from ...recipe import Step, register_step
from ...runtime.llm_kernels import ACCURACY_LEVEL, PackedLLMFolder
from ...runtime.packed_llm import QuantizedWeight, WeightSpec


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


# ---------------------------------------------------------------- the shared step fields and the RTN step

class WeightOnlyBase(LayerSelect, Step):
    """Shared fields of the weight-only steps (RTN, GPTQ, AWQ, k-means). Layers: `targets` / `exclude`;
    `overrides` maps a pattern to WeightSpec fields, e.g. {"*.down_proj": {"bits": 8}}."""

    workloads: ClassVar[tuple[str, ...] | None] = ("llm",)
    targets: list[str] = DEFAULT_TARGETS
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    zero_point: Literal["int", "float"] = "int"
    partial_last_group: bool = True
    # tied embedding / lm_head (SmolLM2: 28M weights, the largest matrix decode reads): int8 per row,
    # 4-bit symmetric groups of `embedding_group_size` (group 32 = GGUF Q4_0's blocks), or float16
    embedding_bits: Literal[4, 8, 16] = 8
    embedding_group_size: int = 32
    # MatMulNBits arithmetic: int8 dot products on VNNI (activations quantized per block, fast) or fp32
    # (the weights' own error only, ~1% lower perplexity on SmolLM2, but ORT's fp32 path decoded 13x
    # slower here: docs/bench-quantization-llm.md)
    compute: Literal["int8", "fp32"] = "int8"
    overrides: dict[str, dict] = {}

    @model_validator(mode="after")
    def _specs(self):
        """Bits, group size and every override are checked when the recipe is read, not after the model loads."""
        self.spec_for("")
        for pattern, over in self.overrides.items():
            if not isinstance(over, dict) or set(over) - set(WeightSpec.model_fields):
                raise SlimcartError(f"override '{pattern}' must map to WeightSpec fields ({', '.join(WeightSpec.model_fields)})")
            WeightSpec(**{**self._base_spec(), **over})
        return self

    def _base_spec(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "zero_point": self.zero_point, "partial_last_group": self.partial_last_group}

    def spec_for(self, name: str) -> WeightSpec:
        return WeightSpec(**{**self._base_spec(), **(first_match(name, self.overrides) or {})})

    def linears(self, lm: torch.nn.Module) -> dict[str, torch.nn.Linear]:
        """The selected decoder Linears (every weight checked finite)."""
        named = self.pick(lm)
        if not named:
            raise SlimcartError(f"no Linear layer matches targets {self.targets} (exclude {self.exclude})")
        for n, m in named.items():
            check_weight(m.weight, n)
        return named

    def finish(self, state, lm, qweights: dict[str, QuantizedWeight], method: str):
        """Put the dequantized weights into the model (for torch evaluation) and make the packed
        weights the artifact (run by ONNX Runtime MatMulNBits)."""
        for name, mod in lm.named_modules():
            if name in qweights:
                mod.weight.data = qweights[name].dequantize()
        embed_q = None
        if self.embedding_bits == 4:
            spec = WeightSpec(bits=4, group_size=self.embedding_group_size, symmetric=True, partial_last_group=True)
            embed_q = rtn(lm.get_input_embeddings().weight, spec, "embedding")
            lm.get_input_embeddings().weight.data = embed_q.dequantize()  # the tied lm_head sees it too
        state.artifact = PackedLLMFolder(lm, qweights, method, self.embedding_bits, self.compute, embed_q)
        bits = sorted({q.spec.bits for q in qweights.values()})
        if any(q.codebook is not None for q in qweights.values()):
            state.size_only.append(f"k-means {bits}-bit codebooks: dequantized to float32 at load (no LUT kernel)")
        else:
            state.kernels.append(f"onnxruntime MatMulNBits {'/'.join(map(str, bits))}-bit weights, {self.compute} compute "
                                 f"(accuracy_level {ACCURACY_LEVEL[self.compute]})")
        emb = {8: "int8 per row", 4: f"int4 symmetric, groups of {self.embedding_group_size}", 16: "float16"}[self.embedding_bits]
        if self.embedding_bits < 16:
            state.kernels.append(f"onnxruntime MatMulNBits {self.embedding_bits}-bit lm_head (embedding {emb})")
        state.notes.append(f"weight-only {method}: {len(qweights)} decoder Linears; tied embedding/lm_head {emb}")
        return state


@register_step
class WeightOnlyRTN(WeightOnlyBase):
    """Round-to-nearest weight-only quantization of the decoder Linears (no calibration data)."""

    kind: Literal["weight_only_rtn"] = "weight_only_rtn"

    def apply(self, state, ctx):
        lm = causal_lm(state.torch_module(self.kind))
        q = {n: rtn(m.weight, self.spec_for(n), n) for n, m in self.linears(lm).items()}
        return self.finish(state, lm, q, "rtn")
