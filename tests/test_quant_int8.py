"""Fake-quant, SmoothQuant, static int8 (real ONNX Runtime / OpenVINO kernels), mixed precision and QAT on
a tiny random BERT encoder."""
import collections
import json

import numpy as np
import onnx
import pytest
import torch
from transformers import BertConfig, BertModel

from slimcart.compress.quantize.fake_quant import FakeQuantConfig, FakeQuantLinear, LayerOverride, calibrate_, dequantize_, quantize_
from slimcart.compress.quantize.mixed_precision import MixedPrecisionConfig, choose_fp32_layers, layer_sensitivity
from slimcart.compress.quantize.qat import QATConfig, qat_
from slimcart.compress.quantize.schemes import QuantScheme, fake_quantize
from slimcart.compress.quantize.smoothquant import SmoothedLinear, SmoothQuantConfig, smoothquant_
from slimcart.compress.quantize.static_int8 import collect_ranges, insert_qdq, linear_matmuls, quantize_embeddings
from slimcart.errors import SlimcartError
from slimcart.workloads.search import SentenceEncoder



pytestmark = pytest.mark.usefixtures("one_thread")


W8A8 = FakeQuantConfig(weight=QuantScheme(bits=8), activation=QuantScheme(bits=8, symmetric=False, granularity="per_tensor"))


def tiny_encoder(seed=0, outliers=True, init=0.02):
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=600, max_position_embeddings=64, attn_implementation="eager", initializer_range=init)
    bert = BertModel(cfg, add_pooling_layer=False).eval()
    if outliers:  # BERT-like outlier channels in the LayerNorm outputs
        with torch.no_grad():
            bert.embeddings.LayerNorm.weight[3] = 25.0
            bert.encoder.layer[0].attention.output.LayerNorm.weight[7] = 30.0
            bert.encoder.layer[0].output.LayerNorm.weight[3] = 20.0
    return SentenceEncoder(bert).eval()


def batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(5, 600, (8, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[: i + 2, 9:] = 0  # some padding
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def fwd(model, b):
    return model(**b)


def cos(a, b):
    return torch.nn.functional.cosine_similarity(torch.as_tensor(a).float(), torch.as_tensor(b).float(), dim=1)


# ---------------------------------------------------------------- fake quant

def test_fake_quant_weight_only_matches_scheme_and_overrides():
    m = tiny_encoder()
    scheme = QuantScheme(bits=4, granularity="per_group", group_size=32)
    names = quantize_(m, FakeQuantConfig(weight=scheme, overrides=[LayerOverride(pattern="*.intermediate.dense", skip=True)]))
    assert names and not any(n.endswith("intermediate.dense") for n in names)
    q = m.get_submodule(names[0])
    assert isinstance(q, FakeQuantLinear)
    assert torch.equal(q.quantized_weight(), fake_quantize(q.linear.weight, scheme))
    x = torch.randn(5, 32)
    assert torch.allclose(q(x), torch.nn.functional.linear(x, fake_quantize(q.linear.weight, scheme), q.linear.bias))
    dequantize_(m)
    assert not any(isinstance(x, FakeQuantLinear) for x in m.modules())


def test_fake_quant_activation_needs_calibration_and_stays_close():
    m = tiny_encoder(outliers=False)
    bs = batches()
    with torch.no_grad():
        ref = [m(**b) for b in bs]
    quantize_(m, W8A8)
    with pytest.raises(SlimcartError, match="calibration"):
        m(**bs[0])
    calibrate_(m, lambda: [m(**b) for b in bs])
    with torch.no_grad():
        assert min(float(cos(m(**b), r).min()) for b, r in zip(bs, ref)) > 0.99


def test_fake_quant_activation_scheme_must_be_per_tensor_uniform():
    with pytest.raises(SlimcartError, match="per tensor"):
        FakeQuantConfig(activation=QuantScheme(bits=8))
    with pytest.raises(SlimcartError, match="uniform"):
        FakeQuantConfig(activation=QuantScheme(bits=8, levels="kmeans", granularity="per_tensor"))


# ---------------------------------------------------------------- SmoothQuant

def test_smoothquant_leaves_fp32_function_unchanged_exactly():
    m = tiny_encoder()
    bs = batches()
    with torch.no_grad():
        ref = [m(**b) for b in bs]
    info = smoothquant_(m, bs, fwd, SmoothQuantConfig(alpha=0.5))
    assert info["linears"] == 12 and any(isinstance(x, SmoothedLinear) for x in m.modules())
    s = m.transformer.encoder.layer[0].attention.self.query.inv_scale
    assert not torch.all(s == 1)  # it really moved something
    # Q, K and V read the same LayerNorm output, so they share one scale
    att = m.transformer.encoder.layer[0].attention.self
    assert torch.equal(att.query.inv_scale, att.key.inv_scale) and torch.equal(att.key.inv_scale, att.value.inv_scale)
    with torch.no_grad():
        for b, r in zip(bs, ref):
            assert torch.equal(m(**b), r)  # power-of-two scales: bit-for-bit identical


def test_smoothquant_auto_alpha_reduces_w8a8_error_on_outliers():
    m = tiny_encoder()
    bs = batches()
    with torch.no_grad():
        ref = [m(**b) for b in bs]

    def w8a8_err(model):
        quantize_(model, W8A8)
        calibrate_(model, lambda: [model(**b) for b in bs])
        with torch.no_grad():
            return float(np.mean([float(((model(**b) - r) ** 2).mean()) for b, r in zip(bs, ref)]))

    import copy
    plain = w8a8_err(copy.deepcopy(m))
    info = smoothquant_(m, bs, fwd, SmoothQuantConfig(alpha="auto"))
    assert info["alpha"] in SmoothQuantConfig().alphas
    assert w8a8_err(m) < plain
    assert min(info["scores"].values()) == info["scores"][info["alpha"]]


def test_smoothquant_bad_input():
    with pytest.raises(SlimcartError, match="calibration"):
        smoothquant_(tiny_encoder(), [], fwd)


# ---------------------------------------------------------------- static int8 on real kernels

def _export(model, path):
    from slimcart.runtime.onnx_runtime import export_onnx

    b = batches(1)[0]
    ex = {k: v.numpy() for k, v in b.items()}
    axes = {k: {0: "batch", 1: "sequence"} for k in ex}
    axes["embedding"] = {0: "batch"}
    export_onnx(model, ex, path, axes, "embedding")
    return path


def _qdq_model(tmp_path, model, exclude=()):
    src = _export(model, tmp_path / "fp32.onnx")
    proto = onnx.load(str(src))
    lin = linear_matmuls(proto)
    chosen = [n for n, name in lin if name not in exclude]
    bs = [{k: v.numpy() for k, v in b.items()} for b in batches()]
    ranges = collect_ranges(src, sorted({n.input[0] for n in chosen}), bs, "minmax", {})
    insert_qdq(proto, chosen, ranges)
    tables = quantize_embeddings(proto)
    out = tmp_path / "int8.onnx"
    onnx.save(proto, str(out))
    return out, lin, tables


def test_static_int8_runs_real_int8_kernels_on_onnxruntime(tmp_path):
    import onnxruntime as ort

    m = tiny_encoder(outliers=False)
    path, lin, tables = _qdq_model(tmp_path, m)
    assert len(lin) == 12  # 2 layers x (q, k, v, attn out, ffn in, ffn out)
    assert tables == ["transformer.embeddings.word_embeddings.weight"]
    proto = onnx.load(str(path))
    inits = {i.name: i for i in proto.graph.initializer}
    assert inits["transformer.embeddings.word_embeddings.weight_int8"].data_type == onnx.TensorProto.INT8
    assert "transformer.embeddings.word_embeddings.weight" not in inits
    # ORT's optimiser must turn the QDQ pairs into integer MatMul kernels
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] + ops["DynamicQuantizeMatMul"] >= 12, ops
    assert ops["MatMul"] <= 4  # only the two activation x activation matmuls per layer remain float
    for b in batches():
        with torch.no_grad():
            ref = m(**b)
        out = sess.run(None, {k: v.numpy() for k, v in b.items()})[0]
        assert float(cos(out, ref).min()) > 0.98


def test_static_int8_exclude_keeps_layers_fp32(tmp_path):
    m = tiny_encoder(outliers=False)
    keep = "transformer.encoder.layer.1.output.dense"
    path, lin, _ = _qdq_model(tmp_path, m, exclude=(keep,))
    proto = onnx.load(str(path))
    node = next(n for n in proto.graph.node if n.op_type == "MatMul" and "layer.1/output/dense" in n.name)
    inits = {i.name: i for i in proto.graph.initializer}
    assert inits[node.input[1]].data_type == onnx.TensorProto.FLOAT  # weight still a float initializer


def test_static_int8_same_result_on_openvino(tmp_path):
    pytest.importorskip("openvino")
    import onnxruntime as ort

    from slimcart.runtime.openvino_runtime import OpenVinoRunner

    m = tiny_encoder(outliers=False)
    path, _, _ = _qdq_model(tmp_path, m)
    ov = OpenVinoRunner(path, threads=1)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    b = {k: v.numpy() for k, v in batches(1)[0].items()}
    assert float(cos(ov(b), sess.run(None, b)[0]).min()) > 0.995


def test_collect_ranges_ignores_padding_and_rejects_empty(tmp_path):
    m = tiny_encoder(outliers=False)
    src = _export(m, tmp_path / "fp32.onnx")
    with pytest.raises(SlimcartError, match="calibration"):
        collect_ranges(src, ["x"], [], "minmax", {})


# ---------------------------------------------------------------- mixed precision and QAT

def test_sensitivity_finds_the_outlier_layer_and_budget_holds():
    m = tiny_encoder(outliers=False, init=0.1)  # larger weights: layers matter for the output
    with torch.no_grad():  # make one layer's input carry a huge outlier channel
        m.transformer.encoder.layer[1].attention.output.LayerNorm.weight[5] = 60.0
    bs = batches()
    cfg = MixedPrecisionConfig(max_drop=1e-4, max_layers=3)
    sens = layer_sensitivity(m, bs, fwd, cfg)
    assert max(sens, key=sens.get) == "transformer.encoder.layer.1.intermediate.dense"
    res = choose_fp32_layers(m, bs, fwd, cfg)
    assert res["keep_fp32"][0] == "transformer.encoder.layer.1.intermediate.dense"
    assert res["drop"] < res["drop_all_int8"]
    assert res["met"] == (res["drop"] <= cfg.max_drop)


def test_qat_lowers_distillation_loss_and_exports_ranges():
    m = tiny_encoder(outliers=False, init=0.1)
    bs = batches()
    info = qat_(m, bs, fwd, QATConfig(max_steps=40, lr=1e-4, scale_lr=1e-3))
    assert info["steps"] == 40
    assert info["loss_after"] < 0.8 * info["loss_before"]  # mean W8A8 distillation loss over the same batches
    assert len(info["act_ranges"]) == 12
    lo, hi = info["act_ranges"]["transformer.encoder.layer.0.attention.self.query"]
    assert lo < 0 < hi
    assert not any(isinstance(x, FakeQuantLinear) for x in m.modules())


def test_qat_ranges_reach_the_int8_graph(tmp_path):
    m = tiny_encoder(outliers=False)
    src = _export(m, tmp_path / "fp32.onnx")
    proto = onnx.load(str(src))
    lin = linear_matmuls(proto)
    q, k = (n for n, name in lin if name.endswith("layer.0.attention.self.query") or name.endswith("layer.0.attention.self.key"))
    insert_qdq(proto, [q, k], {}, node_ranges={q.name: (-1.0, 3.0), k.name: (-2.0, 2.0)})
    scales = {numpy_helper_to(i) for i in proto.graph.initializer if i.name.endswith("_scale") and not i.name.endswith("wscale")}
    # Q and K read the same tensor but learned different ranges: two QDQ pairs with those exact scales
    assert scales == {np.float32(4.0 / 255), np.float32(4.0 / 255)} or len(scales) == 1
    zps = sorted(int(onnx.numpy_helper.to_array(i)) for i in proto.graph.initializer if i.name.endswith("_zp") and not i.name.endswith("wzp"))
    assert zps == [round(1.0 / (4.0 / 255)), round(2.0 / (4.0 / 255))]


def numpy_helper_to(init):
    return np.float32(onnx.numpy_helper.to_array(init))


# ---------------------------------------------------------------- recipes end to end (tiny model, synthetic data)

def _recipe(name, steps):
    from slimcart.recipe import Recipe

    return Recipe.model_validate({"name": name, "workloads": ["search"], "steps": steps})


@pytest.mark.slow  # full api.compress (evaluation, timing) — about a minute on a loaded 2-core machine
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_smoothquant_static_int8_compress_end_to_end(tmp_path, tiny_encoder_dir, synthetic_data, runtime):
    from slimcart import api

    rec = _recipe("w8a8-test", [{"kind": "smoothquant", "alpha": "auto", "alphas": [0.5, 0.8], "calibration_batches": 2},
                                {"kind": "static_int8", "observer": "minmax", "observer_args": {}, "calibration_batches": 4,
                                 "runtime": runtime}])
    m = api.compress("search", str(tiny_encoder_dir), rec, tmp_path / "out", repeats=1, measure_rss=False)
    assert m["compressed"]["runtime"] == runtime
    assert any("int8" in k for k in m["kernels"]) and any("SmoothQuant alpha=" in n for n in m["notes"])
    assert m["compressed"]["quality"]["cosine"] > 0.98
    assert m["ratios"]["size"] < 0.35  # int8 weights and embedding tables on disk


@pytest.mark.slow
def test_mixed_precision_and_qat_compress_end_to_end(tmp_path, tiny_encoder_dir, synthetic_data):
    from slimcart import api

    rec = _recipe("mixed-qat-test", [
        {"kind": "mixed_precision", "max_drop": 1e-15, "max_layers": 2, "calibration_batches": 2},
        {"kind": "qat", "max_steps": 3, "calibration_batches": 2},
        {"kind": "static_int8", "calibration_batches": 2, "runtime": "onnxruntime"}])
    m = api.compress("search", str(tiny_encoder_dir), rec, tmp_path / "out", repeats=1, measure_rss=False)
    notes = " ".join(m["notes"])
    assert "keeping 2 layer(s) fp32" in notes and "NOT met" in notes  # an impossible budget is reported, not hidden
    assert "QAT-learned" in notes and "kept fp32: transformer." in notes
    assert m["compressed"]["quality"]["cosine"] > 0.98


@pytest.mark.parametrize("name", ["int8-static", "w8a8-smoothquant", "mixed-int8", "qat-int8"])
def test_search_recipes_refuse_other_workloads(name):
    from slimcart.recipe import load_recipe

    rec = load_recipe(name)
    rec.check_workload("search")
    with pytest.raises(SlimcartError, match="does not apply to workload 'llm'"):
        rec.check_workload("llm")


def test_torch_compile_step_saves_a_reloadable_folder(tmp_path, tiny_encoder_dir):
    from slimcart.contracts import ModelState, StepContext, load_saved
    from slimcart.recipe import parse_step
    from slimcart.runtime.torch_compile import CompiledTorchRunner
    from slimcart.workloads import get_workload

    wl = get_workload("search")
    bundle = wl.load_model(str(tiny_encoder_dir))
    state = parse_step({"kind": "torch_compile"}).apply(ModelState(bundle=bundle), StepContext(wl, None, tmp_path, 1))
    state.save(tmp_path / "out", wl)
    runner, b2 = load_saved(tmp_path / "out", wl, 1)
    assert isinstance(runner, CompiledTorchRunner) and runner.runtime == "torch-compile-bf16"
    for k, v in bundle.module.state_dict().items():  # fp32 weights saved unchanged (compiling happens at load)
        assert torch.equal(v, b2.module.state_dict()[k])


def test_torch_compile_after_structured_pruning_keeps_the_pruned_format(tmp_path, tiny_encoder_dir):
    """torch_compile wraps the format the step before left (here structured-hf, whose per-layer shapes
    only slimcart restores): a plain folder would not reload (the planner's prune + torch_compile trials
    failed so)."""
    from slimcart.contracts import FORMAT_FILE, ModelState, StepContext, load_saved
    from slimcart.recipe import parse_step
    from slimcart.runtime.torch_compile import CompiledTorchRunner
    from slimcart.workloads import get_workload

    wl = get_workload("search")
    ctx = StepContext(wl, None, tmp_path, 1)
    state = ModelState(bundle=wl.load_model(str(tiny_encoder_dir)))
    for step in ({"kind": "prune_structured", "heads": 0.5, "ffn": 0.5, "criterion": "magnitude"},
                 {"kind": "torch_compile", "bf16": False}, {"kind": "torch_compile", "bf16": False}):
        state = parse_step(step).apply(state, ctx)
    state.save(tmp_path / "out", wl)
    meta = json.loads((tmp_path / "out" / FORMAT_FILE).read_text())
    assert meta["format"] == "torch-compile" and meta["inner"]["format"] == "structured-hf"
    runner, b2 = load_saved(tmp_path / "out", wl, 1)
    assert isinstance(runner, CompiledTorchRunner) and runner.runtime == "torch-compile"
    want = state.bundle.module.state_dict()
    got = b2.module.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(v, got[k]) for k, v in want.items())
