"""Rewrite a QDQ int8 graph into the shapes OpenVINO's CPU plugin runs fastest (same numbers).

Found by comparing slimcart's static int8 IR of MiniLM with NNCF's int8 PTQ IR op by op and with
OpenVINO's per-node profiling (docs/bench-quantization.md, "int8 vs NNCF"): both quantize the same 36
Linear MatMuls and keep attention in float; NNCF's graph was ~5% faster at batch 32, partly because of
two layout choices (the rest comes from its activation ranges; see the doc):

1. Linear weights. The ONNX export stores W as [in, out] (y = x W); NNCF stores [out, in] with
   MatMul(transpose_b=True), the layout of OpenVINO's FullyConnected kernel. Storing the int8 weight
   [out, in] (per-row scales, DequantizeLinear axis 0) followed by a Transpose lets OpenVINO fold
   the transpose into FullyConnected and fuse the bias add into it.
2. Embedding tables. slimcart's ONNX-Runtime-friendly pattern Gather(int8 table) -> Cast -> Mul(row
   scale) runs on OpenVINO's reference Gather plus two element-wise passes; DequantizeLinear(table,
   per-row scale, axis 0) -> Gather is the compressed-weights pattern OpenVINO fuses into one Gather
   that dequantizes only the looked-up rows. (On ONNX Runtime that pattern would dequantize the whole
   table on every call, which is why the ONNX Runtime graph keeps the first one.)

Both rewrites are exact: the dequantized values are identical, only where the arithmetic happens moves.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def weights_out_in(model: onnx.ModelProto) -> int:
    """Store every per-column int8 weight (DequantizeLinear axis=1 on a 2-D initializer) as its transpose
    with per-row scales, followed by a Transpose node. Returns how many weights were rewritten."""
    inits = {i.name: i for i in model.graph.initializer}
    nodes, done = [], 0
    for n in model.graph.node:
        nodes.append(n)
        w = inits.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        if w is None or len(w.dims) != 2 or axis != 1:
            continue
        w.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(w).T), w.name))
        for a in n.attribute:
            if a.name == "axis":
                a.i = 0
        out = n.output[0]
        n.output[0] = f"{out}_out_in"
        nodes.append(helper.make_node("Transpose", [n.output[0]], [out], perm=[1, 0], name=f"{n.name}_T"))
        done += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return done


def dequantize_then_gather(model: onnx.ModelProto) -> int:
    """Gather(int8 table) -> Cast -> Mul(Gather(row scales))  ==>  DequantizeLinear(table, scales, axis 0) -> Gather.
    Matches the pattern quantize_embeddings writes; returns how many tables were rewritten."""
    inits = {i.name: i for i in model.graph.initializer}
    by_output = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    drop, done = set(), 0
    for n in model.graph.node:
        if n.op_type != "Mul" or not n.name.endswith("_dequant"):
            continue
        cast, scale_gather = by_output.get(n.input[0]), by_output.get(n.input[1])
        gather = by_output.get(cast.input[0]) if cast is not None and cast.op_type == "Cast" else None
        if gather is None or gather.op_type != "Gather" or scale_gather is None or scale_gather.op_type != "Gather":
            continue
        table, scales = inits.get(gather.input[0]), inits.get(scale_gather.input[0])
        if table is None or scales is None or len(consumers.get(cast.output[0], [])) != 1:
            continue
        flat = numpy_helper.to_array(scales).reshape(-1).astype(np.float32)
        scales.CopyFrom(numpy_helper.from_array(flat, scales.name))
        zp = f"{table.name}_zp0"
        model.graph.initializer.append(numpy_helper.from_array(np.zeros_like(flat, dtype=np.int8), zp))
        deq = f"{table.name}_dequantized"
        # the Mul becomes the Gather of the dequantized table (same output name, so consumers are untouched)
        n.op_type, n.domain = "Gather", ""
        del n.input[:]
        n.input.extend([deq, gather.input[1]])
        del n.attribute[:]
        n.attribute.append(helper.make_attribute("axis", 0))
        gather.op_type = "DequantizeLinear"
        del gather.input[:]
        gather.input.extend([table.name, scales.name, zp])
        gather.output[0] = deq
        del gather.attribute[:]
        gather.attribute.append(helper.make_attribute("axis", 0))
        drop |= {cast.name, scale_gather.name}
        done += 1
    keep = [n for n in model.graph.node if n.name not in drop]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return done
