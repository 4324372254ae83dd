"""Static int8 for convolutions in an exported ONNX graph (QDQ): the CNN half of the `static_int8` step.

For every chosen Conv node (batch norm already folded into it by the exporter, eval mode):
- weight W (C_out, C_in/groups, kh, kw) stored int8 per output channel c:
      s_c = max|W_c| / 127,   W_q = clip(round(W / s_c), -127, 127);
- bias b stored int32 at scale s_x * s_c, zero point 0 (s_x: the input activation's scale), the
  accumulator's own scale, so an int8 convolution adds it without a float step (ONNX Runtime's
  QDQ Conv fusion takes only an int32 bias);
- the input activation x and the output y get QuantizeLinear -> DequantizeLinear pairs, scale and zero
  point from a range [lo, hi] calibrated by slimcart's observers (uint8 asymmetric by default:
  s = (hi - lo) / 255, z = round(-lo / s)). Where the output feeds only a Relu the pair goes after the
  Relu: its range starts at 0, so z = 0 and ONNX Runtime folds the Relu into the quantized conv.
Quantizing outputs as well as inputs keeps tensors int8 between layers: ONNX Runtime fuses
DQ -> Conv -> Q into QLinearConv only when the Q is there, and DQ, DQ -> Add (-> Relu) -> Q (residual
additions) into QLinearAdd; OpenVINO turns the pairs into FakeQuantize and runs int8 convolutions.
A tensor MaxPool makes from a quantized tensor reuses that tensor's range (max-pooling cannot leave
it), so the runtimes pool the int8 values directly. Every consumer of a quantized tensor reads its
dequantized copy: one pair per tensor, shared by the convs and additions that read it.

Hand-written rather than onnxruntime.quantization.quantize_static so the ranges come from
slimcart's observers (the same ones the Linear path uses) and one graph runs on both runtimes.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...errors import SlimcartError

RANGE_KEEPING = ("MaxPool",)  # ops whose output lies inside their input's range


def resolve_identities(model: onnx.ModelProto) -> None:
    """Drop Identity nodes that only rename an initializer (the exporter deduplicates equal biases that
    way), pointing their consumers at the initializer itself, so every Conv reads its constants directly."""
    inits = {i.name for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    alias = {n.output[0]: n.input[0] for n in model.graph.node
             if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs}
    if not alias:
        return
    keep = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for n in keep:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def conv_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Conv nodes whose weight is a float initializer (the exported nn.Conv layers)."""
    inits = {i.name: i for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits
            and inits[n.input[1]].data_type == TensorProto.FLOAT]


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for name in n.input:
            out.setdefault(name, []).append(n)
    return out


def activation_plan(model: onnx.ModelProto, convs: list[onnx.NodeProto]) -> tuple[list[str], dict[str, str]]:
    """(tensors to quantize, {tensor: tensor whose range it reuses}) for the chosen convs: each conv's
    input and output (after a sole-consumer Relu), and MaxPool outputs of quantized tensors."""
    users = _consumers(model)
    graph_outputs = {o.name for o in model.graph.output}
    tensors: list[str] = []
    for n in convs:
        out = n.output[0]
        after = users.get(out, [])
        if len(after) == 1 and after[0].op_type == "Relu" and out not in graph_outputs:
            out = after[0].output[0]
        for t in (n.input[0], out):
            if t not in tensors:
                tensors.append(t)
    producer = {o: n for n in model.graph.node for o in n.output}
    same_as = {}
    for t in tensors:
        p = producer.get(t)
        if p is not None and p.op_type in RANGE_KEEPING and p.input[0] in tensors:
            same_as[t] = p.input[0]
    return tensors, same_as


def activation_qparams(lo: float, hi: float, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point covering [lo, hi] (widened to contain 0): int8 symmetric or uint8 asymmetric."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        return np.array(max(-lo, hi) / 127.0 or 1.0, np.float32), np.array(0, np.int8)
    scale = (hi - lo) / 255.0 or 1.0
    return np.array(scale, np.float32), np.array(int(np.clip(round(-lo / scale), 0, 255)), np.uint8)


def _safe(name: str) -> str:
    return name.replace("/", "_").replace(":", "_").strip("_")


def insert_conv_qdq(model: onnx.ModelProto, convs: list[onnx.NodeProto], ranges: dict[str, tuple[float, float]],
                    symmetric_act: bool = False) -> list[str]:
    """Quantize the given Conv nodes in place (see module doc); `ranges` holds every tensor of
    `activation_plan` that does not reuse another's. Returns the quantized activation tensors."""
    tensors, same_as = activation_plan(model, convs)
    inits = {i.name: i for i in model.graph.initializer}
    qparams = {}
    for t in tensors:
        src = same_as.get(t, t)
        if src not in ranges:
            raise SlimcartError(f"static int8: no calibrated range for activation {src}")
        qparams[t] = qparams.get(src) or activation_qparams(*ranges[src], symmetric_act)
    conv_input = {n.name: n.input[0] for n in convs}  # before readers are pointed at the dequantized copies
    new_inits: list[onnx.TensorProto] = []
    after: dict[str, list[onnx.NodeProto]] = {}
    dq_of = {}
    for t in tensors:
        base = _safe(t)
        s, z = qparams[t]
        new_inits += [numpy_helper.from_array(s, f"{base}_scale"), numpy_helper.from_array(z, f"{base}_zp")]
        pair = [helper.make_node("QuantizeLinear", [t, f"{base}_scale", f"{base}_zp"], [f"{base}_q"], name=f"{base}_Q"),
                helper.make_node("DequantizeLinear", [f"{base}_q", f"{base}_scale", f"{base}_zp"], [f"{base}_dq"],
                                 name=f"{base}_DQ")]
        after.setdefault(t, []).extend(pair)
        dq_of[t] = f"{base}_dq"
    for n in model.graph.node:  # every reader of a quantized tensor reads its dequantized copy
        if n.op_type == "QuantizeLinear":
            continue
        for i, name in enumerate(n.input):
            if name in dq_of:
                n.input[i] = dq_of[name]
    weight_dq: dict[str, list[onnx.NodeProto]] = {}
    for n in convs:
        w_name = n.input[1]
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
        if not np.isfinite(w).all():
            raise SlimcartError(f"weight {w_name} has NaN or inf values")
        w_scale = (np.abs(w).reshape(w.shape[0], -1).max(1) / 127.0).astype(np.float32)
        w_scale[w_scale == 0] = 1.0
        wq = np.clip(np.round(w / w_scale.reshape(-1, 1, 1, 1)), -127, 127).astype(np.int8)
        base = _safe(n.name)
        new_inits += [numpy_helper.from_array(wq, f"{base}_w_int8"), numpy_helper.from_array(w_scale, f"{base}_w_scale"),
                      numpy_helper.from_array(np.zeros(len(w_scale), np.int8), f"{base}_w_zp")]
        pre = [helper.make_node("DequantizeLinear", [f"{base}_w_int8", f"{base}_w_scale", f"{base}_w_zp"], [f"{base}_w_dq"],
                                name=f"{base}_wDQ", axis=0)]
        n.input[1] = f"{base}_w_dq"
        if len(n.input) > 2 and n.input[2]:
            if n.input[2] not in inits:
                raise SlimcartError(f"static int8: the bias of {n.name} is not a constant")
            b = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64)
            b_scale = (float(qparams[conv_input[n.name]][0]) * w_scale).astype(np.float32)
            bq = np.clip(np.round(b / b_scale), -(2**31), 2**31 - 1).astype(np.int32)
            new_inits += [numpy_helper.from_array(bq, f"{base}_b_int32"), numpy_helper.from_array(b_scale, f"{base}_b_scale"),
                          numpy_helper.from_array(np.zeros(len(b_scale), np.int32), f"{base}_b_zp")]
            pre.append(helper.make_node("DequantizeLinear", [f"{base}_b_int32", f"{base}_b_scale", f"{base}_b_zp"],
                                        [f"{base}_b_dq"], name=f"{base}_bDQ", axis=0))
            n.input[2] = f"{base}_b_dq"
        weight_dq[n.name] = pre
    model.graph.initializer.extend(new_inits)
    _place(model, after, weight_dq)
    _drop_unused_initializers(model)
    return tensors


def _place(model: onnx.ModelProto, after: dict[str, list[onnx.NodeProto]], before: dict[str, list[onnx.NodeProto]]) -> None:
    """Splice new nodes in topological order: a tensor's Q/DQ pair right after the node making it (at the
    start for graph inputs), a conv's weight/bias DequantizeLinear right before the conv."""
    nodes = [x for name in (i.name for i in model.graph.input) for x in after.get(name, [])]
    for n in model.graph.node:
        nodes += before.get(n.name, []) + [n] + [x for o in n.output for x in after.get(o, [])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
