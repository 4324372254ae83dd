"""Weight-only LLM quantization (RTN, GPTQ, AWQ, k-means), packed storage and the int4 kernels.

Every check compares against an independently computed value: output errors are measured with the
calibration inputs X directly (not through the Hessian the algorithms use), kernels against a plain
float32 matmul of the dequantized weights, storage by bit-exact equality."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from slimcart.compress.quantize.awq import search_clip, search_scale
from slimcart.compress.quantize.calib_stats import InputStats, collect_stats
from slimcart.compress.quantize.gptq import fit_group, gptq
from slimcart.runtime.llm_kernels import GraphBuilder, OrtLLMRunner, TorchInt4Linear, torch_int4_model
from slimcart.compress.quantize.kmeans import kmeans_rows
from slimcart.compress.quantize.weight_only import WeightSpec, fake_cols, fit_params, layer_inputs, rtn
from slimcart.runtime.packed_llm import load_packed, pack_bits, save_packed, to_torch, unpack_bits
from slimcart.errors import SlimcartError


def _inputs(n=2048, k=128, seed=0):
    """Correlated activations with a few outlier channels, like a transformer's."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g))
    x[:, :4] *= 8.0
    return x


def _out_err(x, w, wq):
    return float(((x @ w.t() - x @ wq.t()) ** 2).mean())


def _stats(x):
    st = InputStats(x.shape[1])
    st.add(x)
    return st


def _tiny_llama(tied=True, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tied, rope_theta=10000.0)
    return LlamaForCausalLM(cfg).eval()


def _rtn_all(model, spec):
    return {n: rtn(m.weight, spec, n) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}


# ---------------------------------------------------------------- RTN layout


def test_rtn_error_bound_and_symmetric_zero():
    w = torch.randn(32, 96, generator=torch.Generator().manual_seed(0))
    for spec in (WeightSpec(bits=4, group_size=32), WeightSpec(bits=3, group_size=32, symmetric=True),
                 WeightSpec(bits=8, group_size=None), WeightSpec(bits=4, group_size=64, zero_point="float",
                                                                 partial_last_group=True)):
        q = rtn(w, spec)
        err = (q.dequantize() - w).abs()
        step = q.per_column(q.scale.float())
        # round to nearest: half a step, plus the float16 rounding of scale/offset at the range ends
        assert (err <= 0.52 * step + 1e-6).all(), spec
    wz = torch.tensor([[0.0, 1.0, -0.5, 0.25] * 8])
    assert rtn(wz, WeightSpec(bits=4, group_size=32, symmetric=True)).dequantize()[0, 0] == 0.0


def test_float_zero_g32_reproduces_q4_1_blocks_exactly():
    # GGUF Q4_1: each block of 32 is d * q + m with float16 d, m and q in 0..15 (min and max present).
    g = torch.Generator().manual_seed(1)
    d = (torch.rand(16, 4, generator=g) * 0.01 + 1e-3).half().float()
    m = (-torch.rand(16, 4, generator=g) * 0.05).half().float()
    codes = torch.randint(0, 16, (16, 4, 32), generator=g)
    codes[..., 0], codes[..., 1] = 0, 15
    w = (codes * d[..., None] + m[..., None]).reshape(16, 128)
    exact = rtn(w, WeightSpec(bits=4, group_size=32, zero_point="float")).dequantize()
    assert torch.equal(exact, w)
    # an integer zero point cannot place the grid at m: visibly lossy on the same weights
    assert (rtn(w, WeightSpec(bits=4, group_size=32)).dequantize() - w).abs().max() > 1e-4


# ---------------------------------------------------------------- GPTQ


def test_gptq_lowers_output_error_vs_rtn():
    x, w = _inputs(), torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    H = x.t() @ x / x.shape[0]
    for spec in (WeightSpec(bits=4, group_size=32), WeightSpec(bits=3, group_size=64, symmetric=True),
                 WeightSpec(bits=4, group_size=None)):
        e_rtn = _out_err(x, w, rtn(w, spec).dequantize())
        for act_order in (False, True):
            e_gptq = _out_err(x, w, gptq(w, H, spec, act_order=act_order).dequantize())
            assert e_gptq < 0.8 * e_rtn, (spec, act_order, e_gptq, e_rtn)


def test_gptq_with_diagonal_hessian_is_rtn():
    # Uncorrelated inputs: no column can compensate another, so GPTQ must round exactly like RTN.
    w, spec = torch.randn(16, 64, generator=torch.Generator().manual_seed(2)), WeightSpec(bits=4, group_size=32)
    q = gptq(w, torch.diag(torch.rand(64) + 0.5), spec, act_order=False)
    assert torch.equal(q.codes, rtn(w, spec).codes)


def test_group_clip_search_never_worse_and_helps_rows_with_an_outlier():
    g = torch.Generator().manual_seed(3)
    w, h = torch.randn(32, 128, generator=g), torch.rand(128, generator=g) + 0.1
    w[::2, 5] = 12.0  # one outlier in every other row stretches that row's min/max range
    spec = WeightSpec(bits=4, group_size=None)

    def energy_err(sc, off):
        return (w - fake_cols(w, sc, off, spec)) ** 2 @ h

    plain = energy_err(*fit_params(w, spec))
    clipped = energy_err(*fit_group(w, h, spec, clip_grid=10))
    assert (clipped <= plain + 1e-6).all()
    assert (clipped[::2] < plain[::2]).all()  # every outlier row gains from a finer grid for its other columns
    assert clipped[::2].sum() < 0.95 * plain[::2].sum()
    x = torch.randn(4096, 128, generator=g) * h.sqrt()  # inputs whose energy per channel is h
    H = x.t() @ x / x.shape[0]
    e_plain, e_clip = (_out_err(x, w, gptq(w, H, spec, clip_grid=c).dequantize()) for c in (1, 10))
    assert e_clip < e_plain


# ---------------------------------------------------------------- AWQ


def test_awq_scale_search_lowers_output_error():
    x = _inputs(seed=2)
    x[:, 4:12] *= 6.0
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    spec = WeightSpec(bits=4, group_size=32)
    s, alpha = search_scale([(w, spec)], _stats(x))
    assert alpha > 0
    awq = rtn(w * s, spec).dequantize() / s
    assert _out_err(x, w, awq) < 0.9 * _out_err(x, w, rtn(w, spec).dequantize())
    shrink = search_clip(w * s, _stats(x / s).H, spec)
    clipped = rtn(w * s, spec, shrink=shrink).dequantize() / s
    assert _out_err(x, w, clipped) <= _out_err(x, w, awq) * 1.001


def test_awq_fold_leaves_fp_function_unchanged():
    from slimcart.compress.quantize.awq import fold_scales

    model = _tiny_llama()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        for layer in model.model.layers:
            fold_scales(layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
                        torch.rand(96) + 0.5)
            fold_scales(layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj], torch.rand(96) + 0.5)
            fold_scales(layer.mlp.up_proj, [layer.mlp.down_proj], torch.rand(192) + 0.5)
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)


def test_awq_step_runs_and_beats_rtn_on_tiny_llama():
    from types import SimpleNamespace

    from slimcart.compress.quantize.awq import AWQStep
    from slimcart.compress.quantize.weight_only import WeightOnlyRTN
    from slimcart.contracts import ModelState
    from slimcart.contracts import ModelBundle

    def run(step):
        model = _tiny_llama(seed=3)
        ctx = SimpleNamespace(calibration=lambda b, n: [{"input_ids": torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(i))} for i in range(4)],
                              progress=lambda m: None)
        state = step.apply(ModelState(bundle=ModelBundle("t", model, None)), ctx)
        return state.bundle.module

    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = _tiny_llama(seed=3)(ids).logits
        kw = dict(bits=3, group_size=32)
        e_awq = float(((run(AWQStep(**kw))(ids).logits - ref) ** 2).mean())
        e_rtn = float(((run(WeightOnlyRTN(**kw))(ids).logits - ref) ** 2).mean())
    assert e_awq < e_rtn


# ---------------------------------------------------------------- k-means


def test_kmeans_beats_uniform_mse_on_gaussian_rows():
    w = torch.randn(32, 512, generator=torch.Generator().manual_seed(4))
    km = kmeans_rows(w, 4).dequantize()
    uni = rtn(w, WeightSpec(bits=4, group_size=None)).dequantize()
    assert float(((km - w) ** 2).mean()) < 0.8 * float(((uni - w) ** 2).mean())


# ---------------------------------------------------------------- packed storage


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_bits_round_trip(bits):
    codes = torch.randint(0, 2**bits, (7, 37), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes, bits)
    assert packed.shape[1] == -(-37 * bits // 8)  # bytes reflect the bits
    assert torch.equal(unpack_bits(packed, bits, 37), codes)


def test_packed_save_load_is_bit_exact(tmp_path):
    model = _tiny_llama()
    specs = {"int": WeightSpec(bits=4, group_size=64, partial_last_group=True),
             "float": WeightSpec(bits=4, group_size=32, zero_point="float"),
             "sym3": WeightSpec(bits=3, group_size=32, symmetric=True)}
    for tag, spec in specs.items():
        q = _rtn_all(model, spec)
        q["model.layers.0.mlp.down_proj"] = kmeans_rows(model.model.layers[0].mlp.down_proj.weight, 4)
        save_packed(tmp_path / tag, model, q, "rtn", 8)
        back = load_packed(tmp_path / tag)
        for n, a in q.items():
            b = back.linears[n]
            for attr in ("codes", "scale", "zero", "offset", "codebook"):
                x, y = getattr(a, attr), getattr(b, attr)
                assert (x is None and y is None) or (attr == "scale" and a.codebook is not None) or torch.equal(x, y), (n, attr)
        # bytes reflect the bits: 4-bit codes are half a byte per weight
        size = (tmp_path / tag / "slimcart-wq.safetensors").stat().st_size
        fp32 = sum(p.numel() * 4 for p in model.parameters())
        assert size < 0.45 * fp32


# ---------------------------------------------------------------- kernels


def _single_matmul_session(q, acc):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    g = GraphBuilder(acc)
    out = g.linear("x", q, "w")
    n, k = q.codes.shape
    graph = helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["m", n])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("spec", [WeightSpec(bits=4, group_size=32), WeightSpec(bits=4, group_size=128, partial_last_group=True),
                                  WeightSpec(bits=4, group_size=32, zero_point="float"), WeightSpec(bits=3, group_size=64, symmetric=True),
                                  WeightSpec(bits=8, group_size=None)])
def test_kernels_match_dequantized_matmul(spec):
    torch.manual_seed(6)
    w, x = torch.randn(80, 192), torch.randn(5, 192)
    q = rtn(w, spec, shrink=None) if spec.group_size != 128 else rtn(torch.randn(80, 576), spec)
    x = x if q.codes.shape[1] == 192 else torch.randn(5, 576)
    ref = (x.double() @ q.dequantize().double().t()).float().numpy()
    scale = np.abs(ref).max()
    exact = _single_matmul_session(q, 0).run(None, {"x": x.numpy()})[0]
    assert np.abs(exact - ref).max() < 1e-4 * scale
    fast = _single_matmul_session(q, 4).run(None, {"x": x.numpy()})[0]  # int8 activations per block
    assert np.abs(fast - ref).max() < 3e-2 * scale
    if spec.bits <= 4:
        with torch.no_grad():
            t = TorchInt4Linear(q)(x).numpy()  # bf16 activations and scales
        assert np.abs(t - ref).max() < 3e-2 * scale


def test_ort_graph_and_torch_int4_match_hf_model(tmp_path):
    model = _tiny_llama(tied=True)
    q = _rtn_all(model, WeightSpec(bits=4, group_size=64, partial_last_group=True))
    save_packed(tmp_path, model, q, "rtn", 8)
    packed = load_packed(tmp_path)
    ref_model = to_torch(packed)  # dequantized weights in the HF model: the reference
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = ref_model(ids).logits.numpy()
        tq = torch_int4_model(packed)(ids).logits.numpy()
    ort_exact = OrtLLMRunner(packed, 1, accuracy_level=0)
    assert np.abs(ort_exact({"input_ids": ids.numpy()}) - ref).max() < 1e-4
    assert np.abs(tq - ref).max() < 0.05 * np.abs(ref).max()
    prompt = ids[:1, :6]
    hf = ref_model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)[:, 6:].numpy()
    assert np.array_equal(ort_exact({"input_ids": prompt.numpy(), "max_new_tokens": 8}), hf)


def test_compute_choice_is_saved_and_selects_the_kernel(tmp_path):
    from slimcart.runtime.llm_kernels import make_runner

    model = _tiny_llama(tied=True)
    q = _rtn_all(model, WeightSpec(bits=4, group_size=64, partial_last_group=True))
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(7))
    errs = {}
    for compute in ("fp32", "int8"):
        save_packed(tmp_path / compute, model, q, "rtn", 8, None, compute)
        packed = load_packed(tmp_path / compute)
        assert packed.meta["compute"] == compute
        with torch.no_grad():
            ref = to_torch(packed)(ids).logits.numpy()
        out = make_runner(packed, compute=packed.meta["compute"], threads=1)({"input_ids": ids.numpy()})
        errs[compute] = np.abs(out - ref).max() / np.abs(ref).max()
    assert errs["fp32"] < 1e-5 < errs["int8"] < 0.05  # fp32: the weights' own error only
    with pytest.raises(SlimcartError, match="compute"):
        make_runner(packed, 1, compute="fp8")


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(SlimcartError, match="bits"):
        WeightSpec(bits=5)
    with pytest.raises(SlimcartError, match="group_size"):
        WeightSpec(group_size=48)
    with pytest.raises(SlimcartError, match="does not divide in_features 96"):
        rtn(torch.randn(4, 96), WeightSpec(group_size=64))
    bad = torch.randn(4, 64)
    bad[1, 3] = float("nan")
    with pytest.raises(SlimcartError, match="NaN"):
        rtn(bad, WeightSpec(group_size=32))
    with pytest.raises(SlimcartError, match="NaN"):
        gptq(bad, torch.eye(64), WeightSpec(group_size=32))
    with pytest.raises(SlimcartError, match="empty"):
        layer_inputs(_tiny_llama(), [])


def test_clip_grid_below_one_is_refused():
    from slimcart.recipe import parse_step

    for kind in ("weight_only_gptq", "weight_only_awq"):
        with pytest.raises(SlimcartError, match="clip_grid"):
            parse_step({"kind": kind, "clip_grid": 0})


def test_recipes_refuse_other_workloads():
    from slimcart.recipe import load_recipe

    for name in ("w4-rtn", "w4-gptq", "w4-awq", "kmeans-w4", "w8-rtn"):
        rec = load_recipe(name)
        rec.check_workload("llm")
        for other in ("search", "recsys"):
            with pytest.raises(SlimcartError, match="does not apply"):
                rec.check_workload(other)


# ---------------------------------------------------------------- end to end through `slimcart compress`

WORDS = ("the blender is loud but it crushes ice fast . my kettle leaked after a week and support never "
         "replied ! great headphones , comfy and the battery lasts all day").split()


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A tiny Llama folder with a small byte-level BPE tokenizer, plus a .txt of review-like lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([" ".join(WORDS)] * 4, trainers.BpeTrainer(
        vocab_size=256, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    root = tmp_path_factory.mktemp("tiny-llm")
    model = _tiny_llama()
    model.config.eos_token_id = model.config.pad_token_id = 0
    model.save_pretrained(str(root / "model"), safe_serialization=True)
    tok.save_pretrained(str(root / "model"))
    rng = np.random.default_rng(0)
    (root / "reviews.txt").write_text("\n".join(" ".join(rng.choice(WORDS, size=20)) for _ in range(400)) + "\n")
    return root


@pytest.mark.slow  # ~20 s alone, minutes on a loaded machine: the full compress pipeline (eval + timing)
def test_compress_reloads_packed_model_and_runs_matmulnbits(tiny_llm, tmp_path, recipe="w4-gptq"):
    from slimcart import api
    from slimcart.recipe import Recipe, load_recipe

    rec = load_recipe(recipe)
    # group 32 fits the 96-wide tiny model; few calibration windows keep the test fast
    steps = [s.model_copy(update={"group_size": 32, "calibration_windows": 4}) for s in rec.steps]
    rec = Recipe(name=rec.name, workloads=rec.workloads, steps=steps)
    m = api.compress("llm", str(tiny_llm / "model"), rec, tmp_path / "out", data=str(tiny_llm / "reviews.txt"),
                     repeats=1, measure_rss=False)
    assert m["compressed"]["runtime"] == "onnxruntime-matmulnbits"
    assert any("MatMulNBits" in k for k in m["kernels"])
    assert (tmp_path / "out" / "model" / "slimcart-format.json").exists()
    # a random tiny model: quality must merely stay in the same range as the baseline's
    assert m["compressed"]["quality"]["perplexity"] < 1.5 * m["baseline"]["quality"]["perplexity"]
    assert m["ratios"]["size"] < 0.5
