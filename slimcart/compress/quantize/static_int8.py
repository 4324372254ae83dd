"""Static int8 post-training quantization on real int8 kernels (W8A8).

The PyTorch model is exported to a plain ONNX graph; each nn.Linear becomes a MatMul whose weight is
stored int8 per output channel and whose input gets a QuantizeLinear/DequantizeLinear pair with a
range calibrated on the workload's calibration batches by one of slimcart's observers (padding
positions are left out of the statistics: they never reach the output). Large embedding tables are
stored int8 per row and dequantized after the Gather (only the looked-up rows). The QDQ graph runs on
ONNX Runtime (fused into QLinearMatMul / MatMulIntegerToFloat) or OpenVINO (FakeQuantize -> int8
MatMul); `runtime: auto` times both on calibration batches and keeps the faster.

Layers chosen by `targets` / `exclude` (fnmatch on the PyTorch module name, e.g. "*.layer.5.output.dense")
and those a `mixed_precision` step hands over (`ModelState.keep_fp32`) stay fp32.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from pydantic import Field, model_validator

from ...arch import LayerSelect
from ...bench import measure_interleaved
from ...contracts import BenchInputs
from ...errors import SlimcartError
from ...recipe import Step, register_step
from ...runtime.onnx_runtime import OnnxFile, OnnxRunner, export_onnx
from ...runtime.openvino_runtime import OpenVinoIR, OpenVinoRunner
from .observers import ObserverKind, make_observer

MIN_EMBEDDING_NUMEL = 16384  # smaller tables (token types) are not worth the extra ops


def module_name_of(node_name: str) -> str:
    """"/transformer/encoder/layer.0/attention/self/query/MatMul" -> "transformer.encoder.layer.0.attention.self.query"
    (wrapper levels such as SmoothedLinear's ".linear" are dropped so names match the original model)."""
    parts = [p for p in node_name.strip("/").split("/")[:-1] if p]
    name = ".".join(parts)
    return name[: -len(".linear")] if name.endswith(".linear") else name


def linear_matmuls(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str]]:
    """MatMul nodes whose second input is a 2-D float initializer (the exported nn.Linear layers)."""
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2 \
                and inits[n.input[1]].data_type == TensorProto.FLOAT:
            out.append((n, module_name_of(n.name)))
    return out


def collect_ranges(onnx_path: Path, tensors: list[str], batches: list[dict], observer: str, observer_args: dict,
                   threads: int = 1) -> dict[str, tuple[float, float]]:
    """Run the fp32 ONNX model on `batches` and calibrate a range for each named tensor."""
    import onnxruntime as ort

    if not batches:
        raise SlimcartError("static int8 needs calibration data (got no batches)")
    model = onnx.load(str(onnx_path))
    present = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in present:
            model.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor addressable
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    obs = {t: make_observer(observer, **observer_args) for t in tensors}
    for b in batches:
        outs = sess.run(tensors, {k: np.asarray(v) for k, v in b.items() if k in names})
        mask = np.asarray(b["attention_mask"]).astype(bool) if "attention_mask" in b else None
        for t, v in zip(tensors, outs):
            if mask is not None and v.ndim == 3 and v.shape[:2] == mask.shape:
                v = v[mask]  # padded positions are masked downstream: don't let them set ranges
            obs[t].update(v)
    return {t: o.range() for t, o in obs.items()}


def _qparams(lo: float, hi: float, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        scale = max(-lo, hi) / 127.0 or 1.0
        return np.array(scale, np.float32), np.array(0, np.int8)
    scale = (hi - lo) / 255.0 or 1.0
    return np.array(scale, np.float32), np.array(int(np.clip(round(-lo / scale), 0, 255)), np.uint8)


def insert_qdq(model: onnx.ModelProto, nodes: list[onnx.NodeProto], ranges: dict, symmetric_act: bool = False,
               node_ranges: dict | None = None) -> None:
    """Quantize the given Linear MatMuls in place: int8 per-column weights + QDQ on the activation input.
    `ranges` maps activation tensor -> (lo, hi); `node_ranges` (node name -> (lo, hi)) overrides it per
    consumer, e.g. with ranges learned by QAT (consumers that agree share one QDQ pair)."""
    inits = {i.name: i for i in model.graph.initializer}
    new_nodes: dict[str, list[onnx.NodeProto]] = {}  # insert before the consumer, keeping topological order
    act_done: dict[tuple, str] = {}
    weights_done: set[str] = set()
    for n in nodes:
        a, w_name = n.input[0], n.input[1]
        pre = new_nodes.setdefault(n.name, [])
        rng = tuple((node_ranges or {}).get(n.name) or ranges[a])
        key = (a, rng)
        if key not in act_done:
            s, z = _qparams(*rng, symmetric_act)
            base = a.replace("/", "_").strip("_") + (f"_{len(act_done)}" if any(k[0] == a for k in act_done) else "")
            model.graph.initializer.extend([numpy_helper.from_array(s, f"{base}_scale"), numpy_helper.from_array(z, f"{base}_zp")])
            pre += [helper.make_node("QuantizeLinear", [a, f"{base}_scale", f"{base}_zp"], [f"{base}_q"], name=f"{base}_Q"),
                    helper.make_node("DequantizeLinear", [f"{base}_q", f"{base}_scale", f"{base}_zp"], [f"{base}_dq"], name=f"{base}_DQ")]
            act_done[key] = f"{base}_dq"
        n.input[0] = act_done[key]
        if f"{w_name}_int8" in weights_done:  # a weight shared by several MatMuls is stored once
            n.input[1] = f"{w_name}_dq"
            continue
        weights_done.add(f"{w_name}_int8")
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)  # [in, out]
        if not np.isfinite(w).all():
            raise SlimcartError(f"weight {w_name} has NaN or inf values")
        scale = (np.abs(w).max(axis=0) / 127.0).astype(np.float32)
        scale[scale == 0] = 1.0
        wq = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        model.graph.initializer.extend([numpy_helper.from_array(wq, f"{w_name}_int8"),
                                        numpy_helper.from_array(scale, f"{w_name}_wscale"),
                                        numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{w_name}_wzp")])
        pre.append(helper.make_node("DequantizeLinear", [f"{w_name}_int8", f"{w_name}_wscale", f"{w_name}_wzp"],
                                    [f"{w_name}_dq"], name=f"{w_name}_wDQ", axis=1))
        n.input[1] = f"{w_name}_dq"
    _splice(model, new_nodes)
    _drop_unused_initializers(model)


def quantize_embeddings(model: onnx.ModelProto) -> list[str]:
    """Gather on a large float table -> Gather on an int8 table (per-row scale) + Cast + Mul."""
    inits = {i.name: i for i in model.graph.initializer}
    done, new_nodes = [], {}
    for n in model.graph.node:
        t = inits.get(n.input[0]) if n.op_type == "Gather" else None
        if t is None or len(t.dims) != 2 or t.data_type != TensorProto.FLOAT or np.prod(t.dims) < MIN_EMBEDDING_NUMEL:
            continue
        if any(a.name == "axis" and a.i != 0 for a in n.attribute):
            continue
        table = numpy_helper.to_array(t).astype(np.float32)
        scale = (np.abs(table).max(axis=1, keepdims=True) / 127.0).astype(np.float32)
        scale[scale == 0] = 1.0
        q = np.clip(np.round(table / scale), -127, 127).astype(np.int8)
        base, out = t.name, n.output[0]
        model.graph.initializer.extend([numpy_helper.from_array(q, f"{base}_int8"), numpy_helper.from_array(scale, f"{base}_rowscale")])
        n.input[0] = f"{base}_int8"
        n.output[0] = f"{out}_int8"
        after = [helper.make_node("Gather", [f"{base}_rowscale", n.input[1]], [f"{out}_scale"], name=f"{n.name}_scale", axis=0),
                 helper.make_node("Cast", [f"{out}_int8"], [f"{out}_f"], name=f"{n.name}_cast", to=TensorProto.FLOAT),
                 helper.make_node("Mul", [f"{out}_f", f"{out}_scale"], [out], name=f"{n.name}_dequant")]
        new_nodes[n.name] = after
        done.append(base)
    _splice(model, new_nodes, after=True)
    _drop_unused_initializers(model)
    return done


def _splice(model: onnx.ModelProto, extra: dict[str, list[onnx.NodeProto]], after: bool = False) -> None:
    nodes = []
    for n in model.graph.node:
        add = extra.get(n.name, [])
        nodes += ([n] + add) if after else (add + [n])
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def time_runners(runners: dict, batches: list[dict], rounds: int = 3) -> dict[str, float]:
    """Median seconds per pass over `batches` for each runner, rounds interleaved (same-run comparison)."""
    timing = measure_interleaved(runners, BenchInputs([], batches, 1, "batches"), repeats=rounds, warmup=1)
    return {k: len(batches) / float(np.median(t.throughput_per_s)) for k, t in timing.items()}


@register_step
class StaticInt8(LayerSelect, Step):
    """Static W8A8 int8 on ONNX Runtime or OpenVINO, with activation ranges from slimcart's observers."""

    kind: Literal["static_int8"] = "static_int8"
    workloads = ("search",)
    # auto: time both on calibration batches, keep the faster (ties within 3% go to ONNX Runtime)
    runtime: Literal["auto", "onnxruntime", "openvino"] = "auto"
    calibration_batches: int = Field(32, ge=1)
    # min-max: BERT's outlier channels carry signal; clipping them (percentile 99.99) cost 0.08 of cosine on MiniLM
    observer: ObserverKind = "minmax"
    observer_args: dict = {}
    symmetric_activations: bool = False
    quantize_embeddings: bool = True

    @model_validator(mode="after")
    def _observer(self):
        make_observer(self.observer, **self.observer_args)  # unknown observer settings fail here, before any model loads
        return self

    def apply(self, state, ctx):
        module = state.torch_module(self.kind)
        batches = ctx.calibration(state.bundle, self.calibration_batches)
        spec = ctx.workload.export_spec(state.bundle)
        fp32 = ctx.workdir / "model.fp32.onnx"
        ctx.progress("exporting to ONNX for static int8")
        export_onnx(module, spec["example"], fp32, spec["dynamic_axes"], spec["output_name"])
        model = onnx.load(str(fp32))
        linears = linear_matmuls(model)
        chosen = [(n, name) for n, name in linears if self.selects(name) and name not in state.keep_fp32]
        if not chosen:
            raise SlimcartError("static_int8: no Linear layer left to quantize (check targets / exclude)")
        node_ranges = {n.name: state.act_ranges[name] for n, name in chosen if name in state.act_ranges}  # QAT's
        todo = sorted({n.input[0] for n, _ in chosen if n.name not in node_ranges})
        ranges = {}
        if todo:
            ctx.progress(f"calibrating {len(todo)} activation ranges ({self.observer})")
            ranges = collect_ranges(fp32, todo, batches, self.observer, self.observer_args)
        insert_qdq(model, [n for n, _ in chosen], ranges, self.symmetric_activations, node_ranges)
        tables = quantize_embeddings(model) if self.quantize_embeddings else []
        qdq = ctx.workdir / "model.onnx"
        onnx.save(model, str(qdq))
        fp32.unlink()
        kept = [name for _, name in linears if name not in {c for _, c in chosen}]
        state.reports[self.kind] = {"quantized": [c for _, c in chosen], "kept_fp32": kept, "embeddings_int8": tables}
        how = f"{len(node_ranges)} QAT-learned, {len(chosen) - len(node_ranges)} {self.observer}-calibrated"
        state.notes.append(f"static int8: {len(chosen)} Linear layers W8A8 (per-channel weights; activation ranges "
                           f"{how}); kept fp32: {', '.join(kept) or 'none'}; int8 embedding tables: {len(tables)}")
        return finish_runtime(state, ctx, qdq, self.runtime, batches)


TIE = 0.03  # relative timing difference below which `auto` keeps ONNX Runtime (the more widely deployed)


def finish_runtime(state, ctx, qdq: Path, runtime: str, batches: list[dict]):
    """Make the QDQ model the artifact on the chosen runtime (timing both when `runtime` is auto)."""
    choice, note = runtime, ""
    if runtime == "auto":
        ctx.progress("timing ONNX Runtime vs OpenVINO on the int8 model")
        # the first calibration batches are the short texts (queries), closest to serving traffic
        t = time_runners({"onnxruntime": OnnxRunner(qdq, ctx.threads), "openvino": OpenVinoRunner(qdq, ctx.threads)},
                         batches[:8])
        choice = "openvino" if t["openvino"] < t["onnxruntime"] * (1 - TIE) else "onnxruntime"
        note = (f" (chosen by timing on calibration batches: onnxruntime {t['onnxruntime']*1e3:.0f} ms, openvino "
                f"{t['openvino']*1e3:.0f} ms; within {TIE:.0%} counts as a tie, kept by onnxruntime)")
        state.reports["runtime_timing_s"] = t
    state.reports.setdefault("static_int8", {})["runtime"] = choice
    if choice == "openvino":
        state.artifact = OpenVinoIR(qdq)
        state.kernels.append("OpenVINO int8 (FakeQuantize -> int8 MatMul, VNNI)" + note)
    else:
        state.artifact = OnnxFile(qdq)
        state.kernels.append("onnxruntime static int8 QDQ (QLinearMatMul / MatMulIntegerToFloat, VNNI)" + note)
    return state
