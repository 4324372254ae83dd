"""OpenVINO layout rewrites of the static int8 graph: exact (same numbers), and in the shape OpenVINO's
CPU plugin runs fastest ([out, in] int8 weights, embedding dequantization fused into the Gather)."""
import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_quant_int8 import _qdq_model, batches, tiny_encoder

from slimcart.compress.quantize.ov_layout import dequantize_then_gather, weights_out_in

pytestmark = pytest.mark.usefixtures("one_thread")


def _run_unoptimized(path, b):
    """ONNX Runtime with graph optimisations off: every QDQ node computed as written (float reference)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, b)[0]


def test_rewrites_are_exact_and_change_the_layout(tmp_path):
    path, lin, tables = _qdq_model(tmp_path, tiny_encoder(outliers=False))
    proto = onnx.load(str(path))
    casts = sum(n.op_type == "Cast" for n in proto.graph.node)
    assert weights_out_in(proto) == len(lin) == 12
    assert dequantize_then_gather(proto) == len(tables) == 1
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["Cast"] == casts - 1 and ops["Transpose"] >= 12  # the table's Cast + Mul are gone
    inits = {i.name: i for i in proto.graph.initializer}
    table = inits["transformer.embeddings.word_embeddings.weight_int8"]
    gather_src = {n.input[0] for n in proto.graph.node if n.op_type == "Gather"}
    assert any(s.endswith("_dequantized") for s in gather_src)  # the Gather reads the dequantized table
    assert list(table.dims) == [600, 32]
    onnx.checker.check_model(proto)
    out = tmp_path / "ov.onnx"
    onnx.save(proto, str(out))
    for b in batches(2):
        feed = {k: v.numpy() for k, v in b.items()}
        np.testing.assert_allclose(_run_unoptimized(out, feed), _run_unoptimized(path, feed), rtol=0, atol=2e-6)


def test_openvino_runs_the_rewritten_graph_with_int8_kernels(tmp_path):
    ov = pytest.importorskip("openvino")
    path, _, _ = _qdq_model(tmp_path, tiny_encoder(outliers=False))
    proto = onnx.load(str(path))
    weights_out_in(proto)
    dequantize_then_gather(proto)
    out = tmp_path / "ov.onnx"
    onnx.save(proto, str(out))
    compiled = ov.Core().compile_model(str(out), "CPU", {"PERF_COUNT": True, "INFERENCE_NUM_THREADS": 1})
    req = compiled.create_infer_request()
    feed = {k: v.numpy() for k, v in batches(1)[0].items()}
    got = req.infer(feed)[compiled.outputs[0]]
    kinds = collections.Counter((p.node_type, p.exec_type) for p in req.profiling_info)
    int8_fc = sum(v for (t, e), v in kinds.items() if t.startswith("FullyConnected") and "8" in e.lower().split("_")[-1])
    assert int8_fc >= 12, kinds  # every Linear on an int8 kernel
    ref = _run_unoptimized(out, feed)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert float(cos.min()) > 0.995


def test_static_int8_nncf_engine(tmp_path, tiny_encoder_dir, synthetic_data):
    """engine: nncf quantizes the same exported graph with NNCF; excluded layers stay float; reloads."""
    pytest.importorskip("nncf")
    from slimcart import api
    from slimcart.recipe import Recipe
    from slimcart.workloads import get_workload

    wl = get_workload("search")
    keep = "transformer.encoder.layer.1.output.dense"
    rec = Recipe(name="n", steps=[{"kind": "static_int8", "engine": "nncf", "runtime": "openvino",
                                   "calibration_batches": 4, "exclude": [keep]}])
    built = api.build(wl, str(tiny_encoder_dir), rec, threads=1, workdir=tmp_path / "w")
    assert built.state.reports["static_int8"]["kept_fp32"] == [keep]
    built.state.save(tmp_path / "m", wl)
    runner, bundle = api.load(wl, tmp_path / "m", threads=1)
    assert runner.runtime == "openvino" and (tmp_path / "m" / "openvino" / "openvino_model.xml").exists()
    import openvino as ov

    model = ov.Core().read_model(str(tmp_path / "m" / "openvino" / "openvino_model.xml"))
    quantized = {n.get_friendly_name() for n in model.get_ops() if n.get_type_name() == "MatMul"
                 and n.input_value(0).get_node().get_type_name() == "FakeQuantize"}
    assert len(quantized) == 11 and not any("layer.1/output/dense" in q for q in quantized)
    batch = wl.tokenize(bundle.tokenizer, ["red running shoes", "usb c cable 2m", "Acme coffee maker"])
    ref = wl.torch_runner(wl.load_model(str(tiny_encoder_dir)))(batch)
    got = runner(batch)
    assert float(((got * ref).sum(1)).min()) > 0.98
