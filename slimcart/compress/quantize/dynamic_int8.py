"""Dynamic int8 of recurrent (GRU, LSTM) and Linear layers on PyTorch's own int8 kernels, and the
`torch_dynamic_int8` step (in dynamic_int8_artifact.py, beside the format it saves as). The model stays in PyTorch, so the int8 layers compose with anything else
that does (e.g. a DIN's row-wise int4 embedding tables on FBGEMM's fused lookups: no second runtime).

Each chosen layer becomes its torch.ao.nn.quantized.dynamic counterpart. Weights are int8, symmetric,
per output row (or per tensor):
    W[r] ~= s_r * q_r,   q_r in [-128, 127],   s_r = max|W[r]| / 127.5 (PyTorch's min/max observer)
and activations are quantized per call from their own range (uint8 affine; 7 bits in recurrent cells,
`reduce_range`, which keeps the int16 accumulation of the x86 kernels from saturating):
    x ~= s_x * (q_x - z_x),   W x + b ~= s_r * s_x * (q_r . (q_x - z_x)) + b   (an int8 GEMM, FBGEMM)
For a GRU every gate matmul (W_ih x_t for all t, W_hh h_{t-1} at each step) runs this way; gates and
state update stay in float. ONNX Runtime and OpenVINO have no int8 GRU (bench/gru_kernels.py), so the
model stays on PyTorch.

Quantized torch modules are never pickled: the int8 weights, scales and float biases are written as
safetensors (`QUANT_FILE`) and the modules rebuilt from them on load (artifact: dynamic_int8_artifact.py).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
import torch.ao.nn.quantized.dynamic as nnqd
from torch import nn
from torch.ao.quantization.qconfig import (
    default_dynamic_qconfig,
    per_channel_dynamic_qconfig,
)

from ...errors import SlimcartError

FLOAT_TYPES = {"gru": nn.GRU, "lstm": nn.LSTM, "linear": nn.Linear}
QUANT_TYPES = {"gru": nnqd.GRU, "lstm": nnqd.LSTM, "linear": nnqd.Linear}
PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric)


@contextmanager
def quiet_deprecation():
    """PyTorch 2.13 warns that creating quantized tensors is deprecated; the dynamic GRU/LSTM/Linear
    kernels this file uses still need them (no successor runs an int8 GRU on CPU yet)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*deprecated.*")
        yield


def kind_of(module: nn.Module) -> str | None:
    """'gru' / 'lstm' / 'linear' for a quantized dynamic module, else None."""
    return next((k for k, t in QUANT_TYPES.items() if type(module) is t), None)


def quantize_module(module: nn.Module, per_channel: bool) -> nn.Module:
    """The dynamic int8 counterpart of an nn.GRU / nn.LSTM / nn.Linear (the float module is left untouched)."""
    kind = next((k for k, t in FLOAT_TYPES.items() if type(module) is t), None)
    if kind is None:
        raise SlimcartError(f"dynamic int8 covers nn.GRU, nn.LSTM and nn.Linear, not {type(module).__name__}")
    if kind != "linear" and (not module.bias or getattr(module, "proj_size", 0)):
        raise SlimcartError(f"dynamic int8 needs recurrent layers with biases and no projection, got {module}")
    module.qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    try:
        with quiet_deprecation(), torch.no_grad():
            return QUANT_TYPES[kind].from_float(module.float()).eval()
    finally:
        del module.qconfig


# ---------------------------------------------------------------- tensors <-> modules (no pickle)
def _q_tensors(prefix: str, q: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {f"{prefix}.int8": q.int_repr().contiguous()}
    if q.qscheme() in PER_CHANNEL:
        if q.q_per_channel_axis() != 0:
            raise SlimcartError("per-channel int8 weights must be quantized per output row (axis 0)")
        out[f"{prefix}.scale"] = q.q_per_channel_scales().to(torch.float64).contiguous()
        out[f"{prefix}.zero_point"] = q.q_per_channel_zero_points().to(torch.int64).contiguous()
    else:
        out[f"{prefix}.scale"] = torch.tensor([q.q_scale()], dtype=torch.float64)
        out[f"{prefix}.zero_point"] = torch.tensor([q.q_zero_point()], dtype=torch.int64)
    return out


def _q_from(tensors: dict[str, torch.Tensor], prefix: str, rows: int, cols: int, per_channel: bool) -> torch.Tensor:
    codes, scale, zp = (tensors.get(f"{prefix}.{k}") for k in ("int8", "scale", "zero_point"))
    n = rows if per_channel else 1
    if codes is None or scale is None or zp is None or codes.dtype != torch.int8 or tuple(codes.shape) != (rows, cols) \
            or tuple(scale.shape) != (n,) or tuple(zp.shape) != (n,):
        raise SlimcartError(f"saved int8 weight '{prefix}' is missing or not int8 ({rows}, {cols}) with {n} scale(s)")
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise SlimcartError(f"saved int8 weight '{prefix}' has non-positive or non-finite scales")
    if per_channel:
        return torch._make_per_channel_quantized_tensor(codes, scale.double(), zp.long(), 0)
    return torch._make_per_tensor_quantized_tensor(codes, float(scale[0]), int(zp[0]))


def _rnn_names(m: nn.Module) -> list[str]:
    """weight_ih_l{k}{sfx}, weight_hh_l{k}{sfx} per layer and direction (bias names are the same with bias_)."""
    sfx = ["", "_reverse"] if m.bidirectional else [""]
    return [f"weight_{g}_l{k}{s}" for k in range(m.num_layers) for s in sfx for g in ("ih", "hh")]


def module_state(m: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON description) of a quantized dynamic module: int8 codes, scales, zero points, float biases."""
    kind = kind_of(m)
    with quiet_deprecation():
        if kind == "linear":
            w, b = m._weight_bias()
            tensors = {**_q_tensors("weight", w), **({"bias": b.detach().contiguous()} if b is not None else {})}
            return tensors, {"type": kind, "in_features": m.in_features, "out_features": m.out_features,
                             "bias": b is not None, "per_channel": w.qscheme() in PER_CHANNEL}
        if kind is None:
            raise SlimcartError(f"{type(m).__name__} is not a dynamic int8 module")
        wb = m._weight_bias()
    tensors, per_channel = {}, None
    for name in _rnn_names(m):
        q = wb["weight"][name]
        per_channel = q.qscheme() in PER_CHANNEL
        tensors.update(_q_tensors(name, q))
        tensors[name.replace("weight", "bias")] = wb["bias"][name.replace("weight", "bias")].detach().contiguous()
    return tensors, {"type": kind, "input_size": m.input_size, "hidden_size": m.hidden_size, "num_layers": m.num_layers,
                     "bidirectional": m.bidirectional, "batch_first": m.batch_first, "per_channel": per_channel}


def module_from_state(tensors: dict[str, torch.Tensor], meta: dict) -> nn.Module:
    """Rebuild a quantized dynamic module from what `module_state` returned. Every declared size is
    checked against the saved tensors before anything is allocated."""
    kind = meta.get("type") if isinstance(meta, dict) else None
    if kind not in QUANT_TYPES:
        raise SlimcartError(f"unknown dynamic int8 module type {kind!r}")
    try:
        per_channel = bool(meta["per_channel"])
        if kind == "linear":
            n_in, n_out, has_bias = int(meta["in_features"]), int(meta["out_features"]), bool(meta["bias"])
        else:
            i, h, layers = int(meta["input_size"]), int(meta["hidden_size"]), int(meta["num_layers"])
            batch_first, bidirectional = bool(meta["batch_first"]), bool(meta["bidirectional"])
    except (KeyError, TypeError, ValueError):
        raise SlimcartError(f"saved dynamic int8 {kind} description is incomplete") from None
    with quiet_deprecation():
        if kind == "linear":
            weight = _q_from(tensors, "weight", n_out, n_in, per_channel)
            bias = tensors.get("bias")
            if has_bias and (bias is None or tuple(bias.shape) != (n_out,)):
                raise SlimcartError(f"saved int8 Linear lacks a bias of shape ({n_out},)")
            m = nnqd.Linear(n_in, n_out, bias_=has_bias, dtype=torch.qint8)
            m.set_weight_bias(weight, bias.float() if has_bias else None)
            return m.eval()
        if not (0 < layers <= 64 and h > 0 and i > 0):
            raise SlimcartError(f"saved dynamic int8 {kind} has an impossible shape ({i}, {h}, {layers} layers)")
        directions = 2 if bidirectional else 1
        gates = {"gru": 3, "lstm": 4}[kind] * h
        wb = {}
        for k in range(layers):
            for sfx in ["", "_reverse"][:directions]:
                for g, cols in (("ih", i if k == 0 else h * directions), ("hh", h)):
                    name = f"weight_{g}_l{k}{sfx}"
                    wb[name] = _q_from(tensors, name, gates, cols, per_channel)
                    bias = tensors.get(name.replace("weight", "bias"))
                    if bias is None or tuple(bias.shape) != (gates,):
                        raise SlimcartError(f"saved int8 {kind} lacks bias {name.replace('weight', 'bias')} of shape ({gates},)")
                    wb[name.replace("weight", "bias")] = bias.float()
        m = QUANT_TYPES[kind](i, h, layers, bias=True, batch_first=batch_first, bidirectional=bidirectional, dtype=torch.qint8)
        m.set_weight_bias(wb)
    return m.eval()


def float_stand_in(m: nn.Module) -> nn.Module:
    """A float module of the same shape with all-zero parameters (saved in place of `m`, then removed)."""
    meta = module_state(m)[1]
    if meta["type"] == "linear":
        new = nn.Linear(meta["in_features"], meta["out_features"], bias=meta["bias"])
    else:
        new = FLOAT_TYPES[meta["type"]](meta["input_size"], meta["hidden_size"], meta["num_layers"],
                                        batch_first=meta["batch_first"], bidirectional=meta["bidirectional"])
    with torch.no_grad():
        for p in new.parameters():
            p.zero_()
    return new.eval()
