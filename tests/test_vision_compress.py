"""Compressing the vision workload's CNN through recipes, on tiny ResNets and JPEG folders written by
the tests (fixtures in conftest.py): the prune_channels step (teacher kept, batch norm re-estimated,
the saved folder reloads with the pruned shapes and the same outputs), distillation of the pruned
model (student `current`, batch norm updating), static int8 of convolutions on real ONNX Runtime /
OpenVINO int8 kernels (weights and biases checked against a numpy reference, the fused kernels
against the QDQ graph's own float semantics), and the built-in cnn-* recipes."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_cnn_bundle
from onnx import numpy_helper

from slimcart import api
from slimcart.compress.quantize.conv_qdq import activation_plan, conv_nodes, insert_conv_qdq, resolve_identities
from slimcart.compress.quantize.static_int8 import collect_ranges, module_name_of
from slimcart.contracts import ModelState, StepContext, load_saved
from slimcart.errors import SlimcartError
from slimcart.models.cnn import count_params
from slimcart.recipe import load_recipe, parse_recipe, parse_step
from slimcart.runtime.onnx_runtime import OnnxRunner, export_onnx
from slimcart.workloads import get_workload

pytestmark = pytest.mark.usefixtures("one_thread")

CNN_RECIPES = ["cnn-int8", "cnn-prune-30", "cnn-prune-30-int8", "cnn-distill-half", "cnn-distill-half-int8"]


@pytest.fixture
def setup(photos, tmp_path):
    """(workload, saved tiny model folder, data) with stage widths 16/16/32/32 so 50% pruning leaves 8/8/16/16."""
    wl = get_workload("vision")
    data = wl.load_data(str(photos))
    bundle = tiny_cnn_bundle(data.classes, widths=(16, 16, 32, 32), stem=16)
    folder = tmp_path / "dense"
    wl.save_model(bundle, folder)
    return wl, folder, data


def build(wl, folder, data, steps, tmp_path):
    return api.build(wl, str(folder), parse_recipe({"name": "t", "steps": steps}), threads=1, workdir=tmp_path / "work",
                     loaded=(wl.load_model(str(folder)), data))


def logits(runner, wl, bundle, data):
    return wl.evaluate(runner, bundle, data).outputs["logits"]


# ---------------------------------------------------------------- prune_channels
def test_prune_channels_step_reloads_with_pruned_shapes_and_equal_outputs(setup, tmp_path):
    wl, folder, data = setup
    built = build(wl, folder, data, [{"kind": "prune_channels", "ratio": 0.5, "round_to": None}], tmp_path)
    st, dense = built.state, built.baseline.module
    assert st.teacher is None  # no recover / distill follows: no dense copy kept
    pruned = st.bundle.module
    assert pruned.stem[0].out_channels == 8 and pruned.blocks[3].conv2[0].out_channels == 16
    assert pruned.head.out_features == 3  # the class count is the model's interface: never pruned
    rep = st.reports["prune_channels"]
    assert rep["params_after"] == count_params(pruned) < rep["params_before"] == count_params(dense)
    assert rep["batchnorms_recalibrated"] == 1 + 2 * 4 + 3  # stem, two per block, three shortcuts
    # re-estimated statistics: the stem BN holds the calibration photos' mean of the (pruned) stem conv output
    batches = wl.calibration_batches(st.bundle, data, 16)
    with torch.no_grad():
        outs = [pruned.stem[0]((torch.as_tensor(b["pixels"]) - pruned.mean) / pruned.std) for b in batches]
    expected = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    assert torch.allclose(pruned.stem[1].running_mean, expected, atol=1e-5)
    out = tmp_path / "saved"
    st.save(out, wl)
    runner, loaded = api.load(wl, out, 1)  # a plain workload folder: the config's widths come from the weights
    assert [m.out_channels for m in loaded.module.modules() if isinstance(m, torch.nn.Conv2d)] == \
        [m.out_channels for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]
    np.testing.assert_array_equal(logits(runner, wl, loaded, data), logits(wl.torch_runner(st.bundle), wl, st.bundle, data))


def test_prune_channels_keeps_the_teacher_when_distill_follows_and_refuses_bad_requests(setup, tmp_path):
    wl, folder, data = setup
    state = ModelState(bundle=wl.load_model(str(folder)))
    ctx = StepContext(workload=wl, data=data, workdir=tmp_path, threads=1, later_steps=("distill",))
    state = parse_step({"kind": "prune_channels", "ratio": 0.5}).apply(state, ctx)
    assert state.teacher is not state.bundle.module and not state.teacher.training
    assert state.teacher.stem[0].out_channels == 16 and state.bundle.module.stem[0].out_channels == 8
    with pytest.raises(SlimcartError, match="ratio must be in"):
        parse_recipe({"name": "t", "steps": [{"kind": "prune_channels", "ratio": 1.0}]})
    with pytest.raises(SlimcartError, match="select no Conv"):
        build(wl, folder, data, [{"kind": "prune_channels", "ratio": 0.3, "targets": ["nothing*"]}], tmp_path)
    # exclude: the stem's channels (and every layer coupled to them through the residual stream) stay
    st = build(wl, folder, data, [{"kind": "prune_channels", "ratio": 0.5, "exclude": ["stem.0"]}], tmp_path).state
    assert st.bundle.module.stem[0].out_channels == 16 and st.bundle.module.blocks[0].conv1[0].out_channels == 8


def test_prune_then_distill_the_current_student_with_batch_norm_updating(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMCART_HOME", str(tmp_path / "home"))
    wl, folder, data = setup
    train = {"max_steps": 6, "max_minutes": None, "batch_size": 8, "eval_every": 3, "lr": 1e-3, "batch_norm": "update"}
    steps = [{"kind": "prune_channels", "ratio": 0.5},
             {"kind": "distill", "student": {"type": "current"}, "temperature": 2.0, "train": train}]
    pruned_only = build(wl, folder, data, steps[:1], tmp_path / "a").state.bundle.module
    built = build(wl, folder, data, steps, tmp_path / "b")
    st = built.state
    student = st.bundle.module
    assert st.teacher is None and st.reports["distill"]["steps"] == 6  # the teacher is used up
    assert [m.out_channels for m in student.modules() if isinstance(m, torch.nn.Conv2d)] == \
        [m.out_channels for m in pruned_only.modules() if isinstance(m, torch.nn.Conv2d)]
    changed = [not torch.equal(a, b) for a, b in zip(student.state_dict().values(), pruned_only.state_dict().values())]
    assert any(changed)  # trained
    bn, bn0 = student.blocks[0].conv1[1], pruned_only.blocks[0].conv1[1]
    # batch norm "update": the running statistics moved during training (frozen would keep the re-estimated ones)
    assert not torch.equal(bn.running_mean, bn0.running_mean)
    out = tmp_path / "saved"
    st.save(out, wl)
    runner, loaded = api.load(wl, out, 1)
    np.testing.assert_array_equal(logits(runner, wl, loaded, data), logits(wl.torch_runner(st.bundle), wl, st.bundle, data))
    # the finished distillation is found again by a rerun (its fingerprint survives the JSON checkpoint)
    again = build(wl, folder, data, steps, tmp_path / "c").state
    assert again.reports["distill"]["stopped"].startswith("reused finished run")
    assert all(torch.equal(a, b) for a, b in zip(again.bundle.module.state_dict().values(), student.state_dict().values()))


# ---------------------------------------------------------------- static int8 of convolutions
def test_module_names_of_sequential_children():
    assert module_name_of("/blocks/blocks.0/conv1/conv1.0/Conv") == "blocks.0.conv1.0"
    assert module_name_of("/stem/stem.0/Conv") == "stem.0"
    assert module_name_of("/transformer/encoder/layer.0/attention/self/query/MatMul") == \
        "transformer.encoder.layer.0.attention.self.query"


def _qdq_cnn(tmp_path, wl, bundle, data):
    """The tiny CNN exported and quantized the way static_int8 does it; returns (fp32 path, int8 path, ranges)."""
    spec = wl.export_spec(bundle)
    fp32 = export_onnx(bundle.module, spec["example"], tmp_path / "fp32.onnx", spec["dynamic_axes"], spec["output_name"])
    model = onnx.load(str(fp32))
    resolve_identities(model)
    convs = conv_nodes(model)
    tensors, same_as = activation_plan(model, convs)
    ranges = collect_ranges(fp32, [t for t in tensors if t not in same_as], wl.calibration_batches(bundle, data, 2),
                            "minmax", {})
    reference = onnx.load(str(fp32))
    resolve_identities(reference)
    insert_conv_qdq(model, convs, ranges)
    onnx.save(model, str(tmp_path / "int8.onnx"))
    return reference, tmp_path / "int8.onnx", ranges


def test_conv_int8_weights_biases_and_activation_pairs_match_a_numpy_reference(setup, tmp_path):
    wl, folder, data = setup
    bundle = wl.load_model(str(folder))
    fp32, path, ranges = _qdq_cnn(tmp_path, wl, bundle, data)
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    ref_inits = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 1 + 2 * 4 + 3
    producer = {o: n for n in model.graph.node for o in n.output}
    ref_convs = {n.name: n for n in fp32.graph.node if n.op_type == "Conv"}
    for n in convs:
        ref = ref_convs[n.name]
        w = ref_inits[ref.input[1]]  # the exporter's folded conv + BN weight
        scale = np.abs(w).reshape(len(w), -1).max(1) / 127
        wdq = producer[n.input[1]]
        assert wdq.op_type == "DequantizeLinear"
        np.testing.assert_allclose(inits[wdq.input[1]], scale, rtol=1e-6)
        assert inits[wdq.input[0]].dtype == np.int8
        np.testing.assert_array_equal(inits[wdq.input[0]], np.clip(np.round(w / scale.reshape(-1, 1, 1, 1)), -127, 127))
        # int32 bias at the accumulator's scale: input activation scale x weight scale
        x_dq = producer[n.input[0]]
        x_scale = float(inits[x_dq.input[1]])
        lo, hi = ranges.get(ref.input[0], (None, None))
        if lo is not None:
            assert x_scale == pytest.approx((max(hi, 0) - min(lo, 0)) / 255, rel=1e-6)
        bdq = producer[n.input[2]]
        assert inits[bdq.input[0]].dtype == np.int32
        b = ref_inits[ref.input[2]]
        np.testing.assert_array_equal(inits[bdq.input[0]], np.round(b / (x_scale * scale)).astype(np.int32))
    # the relu after the stem is folded into the stem's output range: zero point 0, lower end 0
    relu_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "/Relu_output_0"]
    assert len(relu_q) == 1 and int(inits[relu_q[0].input[2]]) == 0


def test_conv_int8_runs_fused_int8_kernels_on_onnxruntime_and_openvino(setup, tmp_path):
    import onnxruntime as ort

    from slimcart.runtime.openvino_runtime import OpenVinoRunner

    wl, folder, data = setup
    bundle = wl.load_model(str(folder))
    _, path, _ = _qdq_cnn(tmp_path, wl, bundle, data)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ops["QLinearConv"] == 12 and ops["Conv"] == 0, ops  # every convolution on ORT's int8 kernel
    assert ops["QLinearAdd"] >= 3, ops  # residual additions in int8 (the last one feeds the float pooling)
    # the int8 kernels compute what the QDQ graph specifies (ORT with no fusion runs the float reference)
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    reference = ort.InferenceSession(str(path), plain, providers=["CPUExecutionProvider"])
    fused, vino = OnnxRunner(path, 1), OpenVinoRunner(path, 1)
    batch = wl.calibration_batches(bundle, data, 1)[0]
    want = reference.run(None, {"pixels": batch["pixels"]})[0]
    spread = float(np.abs(want).max())
    assert float(np.abs(fused(batch) - want).max()) < 0.05 * spread  # a few requantization steps of rounding
    assert float(np.abs(vino(batch) - want).max()) < 0.05 * spread
    with torch.no_grad():
        fp32 = bundle.module(torch.as_tensor(batch["pixels"])).numpy()
    assert float(np.abs(want - fp32).max()) < 0.1 * float(np.abs(fp32).max())  # int8 stays close to fp32
    precisions = collections.Counter(
        op.get_rt_info()["runtimePrecision"].astype(str) for op in vino.compiled.get_runtime_model().get_ops()
        if op.get_rt_info()["layerType"].astype(str) == "Convolution")
    assert precisions and set(precisions) <= {"u8", "i8"}, precisions  # OpenVINO runs the convolutions in int8


@pytest.mark.parametrize("runtime", ["auto", "openvino"])
def test_static_int8_step_on_a_cnn_saves_and_reloads(setup, tmp_path, runtime):
    wl, folder, data = setup
    built = build(wl, folder, data, [{"kind": "static_int8", "runtime": runtime, "calibration_batches": 2}], tmp_path)
    st = built.state
    assert len(st.reports["static_int8"]["quantized"]) == 12 and st.reports["static_int8"]["kept_fp32"] == []
    assert any("int8" in k for k in st.kernels) and st.runtime in ("onnxruntime", "openvino")
    out = tmp_path / "saved"
    st.save(out, wl)
    runner, loaded = load_saved(out, wl, 1)
    assert runner.runtime == st.runtime and loaded.module is None  # classes and input size from the companions
    q = wl.evaluate(runner, loaded, data)
    ref = wl.evaluate(wl.torch_runner(built.baseline), built.baseline, data)
    assert q.outputs["logits"].shape == ref.outputs["logits"].shape
    assert np.mean(q.outputs["pred"] == ref.outputs["pred"]) >= 0.75  # a random tiny net: most argmaxes agree


def test_static_int8_excludes_chosen_convolutions(setup, tmp_path):
    wl, folder, data = setup
    steps = [{"kind": "static_int8", "runtime": "onnxruntime", "calibration_batches": 1, "exclude": ["stem.*"]}]
    rep = build(wl, folder, data, steps, tmp_path).state.reports["static_int8"]
    assert rep["kept_fp32"] == ["stem.0"] and len(rep["quantized"]) == 11
    with pytest.raises(SlimcartError, match="no Linear or Conv layer left"):
        build(wl, folder, data, [{"kind": "static_int8", "targets": ["nothing"], "calibration_batches": 1}], tmp_path / "x")


def test_pruned_then_int8(setup, tmp_path):
    wl, folder, data = setup
    steps = [{"kind": "prune_channels", "ratio": 0.5}, {"kind": "static_int8", "runtime": "onnxruntime",
                                                        "calibration_batches": 2}]
    st = build(wl, folder, data, steps, tmp_path).state
    st.save(tmp_path / "saved", wl)
    runner, loaded = load_saved(tmp_path / "saved", wl, 1)
    assert wl.evaluate(runner, loaded, data).outputs["logits"].shape == (12, 3)
    proto = onnx.load(str(tmp_path / "saved" / "model.onnx"))
    w = {i.name: i for i in proto.graph.initializer}
    stem_w = next(v for k, v in w.items() if k.startswith("stem_stem.0_Conv_w_int8"))
    assert list(stem_w.dims) == [8, 3, 3, 3]  # the pruned widths reach the int8 graph


# ---------------------------------------------------------------- recipes
@pytest.mark.parametrize("name", CNN_RECIPES)
def test_cnn_recipes_parse_and_are_for_vision_only(name):
    rec = load_recipe(name)
    rec.check_workload("vision")
    with pytest.raises(SlimcartError, match="does not apply to workload 'search'"):
        rec.check_workload("search")
    kinds = [s.kind for s in rec.steps]
    assert ("prune_channels" in kinds) == ("distill" in kinds)  # pruning is always followed by its recovery
    for s in rec.steps:
        if s.kind == "distill":
            assert s.student.type == "current" and s.train.batch_norm == "update" and s.train.schedule == "cosine"


def test_the_search_only_steps_still_refuse_vision():
    with pytest.raises(SlimcartError, match="does not apply to workload 'vision'"):
        load_recipe("w8a8-smoothquant").check_workload("vision")


def test_compress_publishes_a_vision_output_folder(setup, tmp_path):
    wl, folder, data = setup
    m = api.compress("vision", str(folder), "cnn-int8", tmp_path / "out", data=str(data.info.source), threads=1,
                     repeats=1, measure_rss=False)
    assert m["workload"] == "vision" and m["compressed"]["runtime"] in ("onnxruntime", "openvino")
    assert set(m["compressed"]["quality"]) == {"accuracy", "macro_f1"} and m["bench"]["unit"] == "images"
    assert m["ratios"]["size"] < 0.5  # int8 weights: about a quarter of fp32 plus scales and graph
    runner, bundle = api.load("vision", tmp_path / "out", 1)  # the published folder reloads
    assert wl.evaluate(runner, bundle, data).quality == m["compressed"]["quality"]
