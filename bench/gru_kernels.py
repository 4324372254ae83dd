"""Which runtime runs a GRU with REAL int8 kernels on this CPU, and what it is worth.

Candidates, each checked for what actually executes (not what the file says):
  torch     torch.ao.nn.quantized.dynamic.GRU (quantize_dynamic): weights int8, activations quantized per
            call, both GRU matmuls through fbgemm/onednn int8 GEMM (`quantized::linear_dynamic`-style packed
            weights); the gate math stays fp32.
  ORT       onnxruntime.quantization.quantize_dynamic: the check lists the op types before and after;
            ORT's dynamic registry has an int8 LSTM (DynamicQuantizeLSTM) but no GRU entry, so a GRU
            node staying `GRU` means fp32 kernels.
  OpenVINO  NNCF post-training int8 on the OpenVINO model; the check reads the compiled model's
            runtime precision of the GRUSequence node (i8/u8 = int8 kernel ran).
Timed in ONE interleaved run (slimcart.bench.measure_interleaved, per-round ratios): a GRU layer alone
(100 -> 100 units, 10 clicks) and the whole GRU4Rec (the trained checkpoint if present: item table -> GRU
-> scores over all items) on the workload's bench inputs, fp32 vs torch dynamic int8 of the GRU, and of
GRU + scoring (the tied item table packed as a dynamic-int8 Linear; an untied `out` Linear directly),
with HR@20 on 10,000 validation rows for each.
Load average is recorded before and after: on a shared machine only the ratios mean something.

    SLIMCART_DATA=../shared/data python bench/gru_kernels.py [--threads 1] [--rounds 5]

Writes bench/results/gru_kernels.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slimcart.bench import environment, measure_interleaved, paired_ratio, set_threads
from slimcart.contracts import BenchInputs, ModelBundle
from slimcart.models.gru4rec import GRU4Rec, GRU4RecConfig


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", flush=True)


class GRULayer(nn.Module):
    """A GRU whose forward returns only the output sequence (exportable, timeable)."""

    def __init__(self, gru: nn.Module):
        super().__init__()
        self.gru = gru

    def forward(self, x):
        return self.gru(x)[0]


def torch_side(module):
    module.eval()

    def run(batch):
        with torch.inference_mode():
            return module(torch.as_tensor(next(iter(batch.values()))))
    return run


def ort_check(layer: nn.Module, example: np.ndarray, folder: Path) -> dict:
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32, int8 = folder / "gru.onnx", folder / "gru-int8.onnx"
    with torch.inference_mode():
        torch.onnx.export(layer, (torch.from_numpy(example),), str(fp32), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch", 1: "length"}, "y": {0: "batch", 1: "length"}},
                          opset_version=17, dynamo=False)
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    ops = lambda p: sorted({n.op_type for n in onnx.load(str(p)).graph.node})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                for k, p in (("fp32", fp32), ("after quantize_dynamic", int8))}
    got = {k: s.run(None, {"x": example})[0] for k, s in sessions.items()}
    with torch.inference_mode():
        ref = layer(torch.from_numpy(example)).numpy()
    return {"ops_fp32": ops(fp32), "ops_after_quantize_dynamic": ops(int8),
            "gru_still_fp32": "GRU" in ops(int8) and "DynamicQuantizeLSTM" not in ops(int8),
            "max_abs_diff_vs_torch": {k: float(np.abs(v - ref).max()) for k, v in got.items()},
            "sessions": sessions}


def _rnn_precision(compiled) -> list[str]:
    """Runtime precision of every recurrent node the CPU plugin actually runs."""
    out = []
    for op in compiled.get_runtime_model().get_ops():
        rt = op.get_rt_info()
        if "layerType" in rt and rt["layerType"].astype(str) == "RNNSeq":
            out.append(rt["runtimePrecision"].astype(str))
    return out


def openvino_check(fp32_onnx: Path, calib: list[np.ndarray]) -> dict:
    """f32 (precision hint forced), the plugin's default (bf16 on CPUs with AVX512-BF16), and whether NNCF
    post-training quantization puts the GRU into int8 at all (FakeQuantize inserted, RNNSeq in i8/u8)."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(fp32_onnx))
    threads = {"INFERENCE_NUM_THREADS": torch.get_num_threads()}
    f32 = core.compile_model(model, "CPU", {**threads, "INFERENCE_PRECISION_HINT": "f32"})
    default = core.compile_model(model, "CPU", threads)
    out = {"compiled": {"OpenVINO f32": f32, "OpenVINO default hint": default},
           "rnn_runtime_precision": {"f32 hint": _rnn_precision(f32), "default hint": _rnn_precision(default)}}
    try:
        import nncf
    except ImportError:
        return {**out, "nncf": "not installed: OpenVINO int8 not checked"}
    q = nncf.quantize(model, nncf.Dataset([{"x": c} for c in calib]), subset_size=len(calib))
    ops = sorted({o.get_type_name() for o in q.get_ops()})
    compiled = core.compile_model(q, "CPU", {**threads, "INFERENCE_PRECISION_HINT": "f32"})
    out["nncf"] = {"version": nncf.__version__, "ops_after_quantize": ops, "fake_quantize_inserted": "FakeQuantize" in ops,
                   "rnn_runtime_precision": _rnn_precision(compiled)}
    if "FakeQuantize" in ops:
        out["compiled"]["OpenVINO int8 (NNCF)"] = compiled
    return out


def ov_side(compiled):
    req = compiled.create_infer_request()

    def run(batch):
        return req.infer({0: next(iter(batch.values()))})
    return run


class Int8TiedScoring(nn.Module):
    """Scores of a tied GRU4Rec through an int8 GEMM: the item table packed as a dynamic-quantized Linear
    (per-row int8 weights = per item). Only for timing here: the fp32 table is still kept for the lookup.
    The shipped form of this is compress_embeddings' score_kernel int8_gemm (slimcart/compress/embeddings/int8_gemm.py)."""

    def __init__(self, model: GRU4Rec):
        super().__init__()
        table, bias = model.item_emb.weight, model.out_bias
        lin = nn.Linear(table.shape[1], table.shape[0])
        with torch.no_grad():
            lin.weight.copy_(table)
            lin.bias.copy_(bias)
        self.linear = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)[0]

    def forward(self, h):
        return self.linear(h)


def whole_model(rounds: int) -> dict:
    """fp32 vs torch dynamic int8 of the GRU, and of GRU + scoring, on the trained model if there is one."""
    from slimcart.errors import SlimcartError
    from slimcart.workloads import get_workload

    wl = get_workload("session")
    data = wl.load_data(None)
    try:
        bundle = wl.load_model("gru4rec")
        model, which = bundle.module, f"trained checkpoint {bundle.source}"
    except SlimcartError:
        model, which = GRU4Rec(GRU4RecConfig(n_items=data.n_items, tied=True)).eval(), "random weights (no checkpoint)"
    q_gru = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.GRU}, dtype=torch.qint8)
    q_all = copy.deepcopy(q_gru)
    if model.out is None:  # tied: scoring is F.linear over the input table, not an nn.Linear
        # instance attribute, so forward's self.score(...) finds it before the class method
        object.__setattr__(q_all, "score", Int8TiedScoring(model))
    else:
        q_all = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.GRU, nn.Linear}, dtype=torch.qint8)
    sides = {"fp32": model, "int8 GRU": q_gru, "int8 GRU + int8 scoring": q_all}
    runners = {k: wl.torch_runner(ModelBundle(name=k, module=m, source=None)) for k, m in sides.items()}
    inputs = wl.bench_inputs(ModelBundle(name="fp32", module=model, source=None), data)
    probe = inputs.serving[0]
    if np.array_equal(runners["int8 GRU"](probe), runners["int8 GRU + int8 scoring"](probe)):
        raise RuntimeError("int8 scoring is not in use")
    t = measure_interleaved(runners, inputs, repeats=rounds, progress=log)
    base = t["fp32"]
    val_in, val_tgt = data.validation_rows(10_000)
    quality = {k: wl.evaluate_rows(m, val_in, val_tgt, data.n_items) for k, m in sides.items()}
    return {
        "model": which, "data": data.info.name, "synthetic_data": data.info.synthetic,
        "inputs": "the workload's bench inputs: 64 single test prefixes, 16 batches of 256 (padded to the longest)",
        "sides": {k: v.summary() for k, v in t.items()},
        "throughput_ratio_vs_fp32": {k: paired_ratio(v.throughput_per_s, base.throughput_per_s) for k, v in t.items()},
        "latency_p50_ratio_vs_fp32": {k: float(np.median(base.latency_ms) / np.median(v.latency_ms)) for k, v in t.items()},
        "validation_10k_rows": quality,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gru_kernels.json")
    args = ap.parse_args()
    set_threads(args.threads)
    load_before = os.getloadavg()
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    result: dict = {"environment": environment(args.threads), "loadavg_before": load_before}

    # ---- a GRU layer alone
    layer = GRULayer(nn.GRU(100, 100, batch_first=True)).eval()
    qlayer = torch.ao.quantization.quantize_dynamic(copy.deepcopy(layer), {nn.GRU}, dtype=torch.qint8)
    result["torch_int8_module"] = type(qlayer.gru).__module__ + "." + type(qlayer.gru).__name__
    x1 = [{"x": rng.standard_normal((1, 10, 100)).astype(np.float32)} for _ in range(32)]
    x256 = [{"x": rng.standard_normal((256, 10, 100)).astype(np.float32)} for _ in range(4)]
    with torch.inference_mode():
        ref, q = layer(torch.from_numpy(x256[0]["x"])), qlayer(torch.from_numpy(x256[0]["x"]))
    result["torch_int8_max_abs_diff"] = float((ref - q).abs().max())
    sides = {"torch fp32": torch_side(layer), "torch int8 (dynamic)": torch_side(qlayer)}
    with tempfile.TemporaryDirectory() as tmp:
        ort_info = ort_check(layer, x256[0]["x"], Path(tmp))
        for k, sess in ort_info.pop("sessions").items():
            sides[f"ORT {k}"] = lambda b, sess=sess: sess.run(None, {"x": b["x"]})
        result["onnxruntime"] = ort_info
        log(f"ORT: ops after quantize_dynamic {ort_info['ops_after_quantize_dynamic']}")
        ov_info = openvino_check(Path(tmp) / "gru.onnx", [b["x"] for b in x256[:2]])
        for name, compiled in ov_info.pop("compiled").items():
            sides[name] = ov_side(compiled)
        result["openvino"] = ov_info
        log(f"OpenVINO: {ov_info}")
        inputs = BenchInputs(single=x1, serving=x256, items_per_serving_batch=256, unit="sequences of 10")
        t = measure_interleaved(sides, inputs, repeats=args.rounds, progress=log)
    base = t["torch fp32"]
    result["gru_layer"] = {
        "shape": "GRU 100 -> 100, 10 steps; latency batch 1, throughput batch 256",
        "sides": {k: v.summary() for k, v in t.items()},
        "throughput_ratio_vs_torch_fp32": {k: paired_ratio(v.throughput_per_s, base.throughput_per_s) for k, v in t.items()},
        "latency_p50_ratio_vs_torch_fp32": {k: float(np.median(base.latency_ms) / np.median(v.latency_ms)) for k, v in t.items()},
    }

    # ---- the whole session model: where the time goes, and what int8 costs in validation HR@20
    result["gru4rec_model"] = whole_model(args.rounds)
    result["loadavg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.rename(args.out)
    print(json.dumps({k: result[k] for k in ("gru_layer", "gru4rec_model")}, indent=1, default=str)[:6000])
    log(f"written {args.out}; load before {load_before}, after {result['loadavg_after']}")


if __name__ == "__main__":
    main()
