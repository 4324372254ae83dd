"""Real execution of weight-only quantized LLMs (the `slimcart-wq` format of packed_llm.py), two ways (picked by measurement, both kept):

* "onnxruntime": one ONNX graph per model built straight from the packed weights, with
  com.microsoft ops: MatMulNBits (4-bit codes, int8 dot products on VNNI with accuracy_level 4;
  the int8 lm_head as an 8-bit MatMulNBits), GroupQueryAttention (KV cache, rotary, causal mask),
  SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (RMSNorm + residual). q/k/v and
  gate/up run as one fused MatMulNBits each. Decoding is a short Python loop feeding the KV cache
  back as ORT values, so per-token overhead is ~300 kernel launches inside ORT.
* "torch": the Hugging Face model with its Linears swapped for torch's CPU int4 kernel
  (`aten._weight_int4pack_mm_for_cpu`, bf16 activations) and the tied lm_head for
  `aten._weight_int8pack_mm`; decoding is the same `generate` loop as the fp32 baseline, so it
  isolates what the kernel alone buys.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..arch import causal_lm
from ..contracts import Artifact, ModelBundle, register_artifact
from ..errors import SlimcartError
from .packed_llm import (
    FORMAT,
    PackedLLM,
    QuantizedWeight,
    embedding_rows,
    load_packed,
    pack_int4,
    save_packed,
    to_torch,
)

MS = "com.microsoft"


def _block_for(k: int) -> int:
    """Largest MatMulNBits block (power of two, 16..256) dividing k; else 128 with a shorter last block."""
    for b in (256, 128, 64, 32, 16):
        if k % b == 0:
            return b
    return 128


def nbits_tensors(q: QuantizedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """(B, scales, zero_points, bits, block) in MatMulNBits layout, computing (codes - zp) * scale.

    Integer zero points (and symmetric) are exact; with float offsets the zero point is the mid code
    and `offset_correction` supplies the rest. 2- and 3-bit codes run on the 4-bit kernel."""
    n, k = q.codes.shape
    block = q.spec.group_size or _block_for(k)
    nb = -(-k // block)
    kbits = 8 if q.spec.bits == 8 else 4
    scale = q.scale.float()
    if q.offset is not None:
        zero = torch.full_like(q.scale, 2 ** (kbits - 1), dtype=torch.uint8)
    else:
        zero = torch.round(-q.offsets() / scale).to(torch.uint8)
    if q.spec.group_size is None:  # per channel: the row's one scale/zero repeated per block
        scale, zero = scale.expand(n, nb), zero.expand(n, nb)
    codes = torch.nn.functional.pad(q.codes, (0, nb * block - k))
    if kbits == 4:
        B = pack_int4(codes).reshape(n, nb, block // 2)
        zp = pack_int4(torch.nn.functional.pad(zero, (0, nb % 2))).reshape(-1)
    else:
        B, zp = codes.reshape(n, nb, block), zero.reshape(-1)
    return B.numpy(), scale.reshape(-1).numpy().astype(np.float32), zp.contiguous().numpy(), kbits, block


def offset_correction(q: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """For float offsets: W = (q - mid) * s + (m + mid * s), so x W^T = MatMulNBits + (x Ind) C^T with
    Ind [K, n_groups] the group indicator (sums x over each group) and C = m + mid * s [N, n_groups]."""
    mid = 128 if q.spec.bits == 8 else 8
    groups = q.spec.groups(q.codes.shape[1])
    ind = np.zeros((q.codes.shape[1], len(groups)), np.float32)
    for i, (s, e) in enumerate(groups):
        ind[s:e, i] = 1.0
    C = q.offsets() + mid * q.scale.float()
    return ind, C.t().contiguous().numpy()


def concat(ws: list) -> QuantizedWeight | torch.Tensor | None:
    """Stack Linears along out_features when they can run as one matmul (same spec), else None."""
    ws = [w.dequantize() if isinstance(w, QuantizedWeight) and w.codebook is not None else w for w in ws]
    if all(isinstance(w, torch.Tensor) for w in ws):
        return torch.cat(ws, 0)
    if all(isinstance(w, QuantizedWeight) for w in ws) and len({w.spec for w in ws}) == 1:
        cat = lambda attr: None if getattr(ws[0], attr) is None else torch.cat([getattr(w, attr) for w in ws])  # noqa: E731
        return QuantizedWeight(cat("codes"), cat("scale"), cat("zero"), ws[0].spec, cat("offset"))
    return None


class GraphBuilder:
    def __init__(self, accuracy_level: int):
        self.nodes, self.inits, self.acc = [], [], accuracy_level

    def init(self, name, arr):
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(self, op, ins, outs, domain="", **attrs):
        self.nodes.append(helper.make_node(op, ins, outs, name=f"{op}_{len(self.nodes)}", domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def linear(self, x, w, name) -> str:
        if isinstance(w, QuantizedWeight) and w.codebook is not None:
            w = w.dequantize()  # non-uniform levels: no MatMulNBits kernel, runs as a float MatMul
        if isinstance(w, QuantizedWeight):
            B, s, z, bits, block = nbits_tensors(w)
            n, k = w.codes.shape
            ins = [x, self.init(name + ".B", B), self.init(name + ".scales", s), self.init(name + ".zp", z)]
            y = self.node("MatMulNBits", ins, [name + ".q"], MS, K=k, N=n, bits=bits, block_size=block,
                          accuracy_level=self.acc)
            if w.offset is None:
                return y
            ind, C = offset_correction(w)
            sums = self.node("MatMul", [x, self.init(name + ".ind", ind)], [name + ".gsum"])
            corr = self.node("MatMul", [sums, self.init(name + ".corr", C)], [name + ".corr_out"])
            return self.node("Add", [y, corr], [name + ".out"])
        return self.node("MatMul", [x, self.init(name + ".wT", w.detach().float().t().numpy())], [name + ".out"])


def build_graph(p: PackedLLM, accuracy_level: int = 4, max_positions: int = 4096) -> onnx.ModelProto:
    """The decoder as one ONNX graph: inputs_embeds + per-layer KV cache in, logits + new KV cache out."""
    c = p.config
    if c.get("model_type") not in ("llama", "mistral", "qwen2") or c.get("rope_scaling"):
        raise SlimcartError(f"the ONNX Runtime int4 path supports Llama-style decoders, not {c.get('model_type')}")
    H, nh, kvh, L = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["num_hidden_layers"]
    D = c.get("head_dim") or H // nh
    eps = float(c["rms_norm_eps"])
    theta = float((c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 10000.0)))
    g = GraphBuilder(accuracy_level)
    inv = 1.0 / theta ** (np.arange(0, D, 2, dtype=np.float64) / D)
    ang = np.arange(min(max_positions, c.get("max_position_embeddings", max_positions)))[:, None] * inv[None]
    cos, sin = g.init("cos_cache", np.cos(ang).astype(np.float32)), g.init("sin_cache", np.sin(ang).astype(np.float32))
    kv_shape = ["batch", kvh, "past", D]
    inputs = [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "seq", H]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", c["vocab_size"]])]
    lin = p.linears
    x, resid = "inputs_embeds", None
    for i in range(L):
        pre = f"model.layers.{i}"

        def norm(inp, res, gamma, tag):
            w = g.init(f"{pre}.{tag}.weight", p.others[f"{pre}.{tag}.weight"].numpy())
            if res is None:
                return g.node("SimplifiedLayerNormalization", [inp, w], [f"{pre}.{tag}.out"], axis=-1, epsilon=eps), inp
            outs = g.node("SkipSimplifiedLayerNormalization", [inp, res, w],
                          [f"{pre}.{tag}.out", "", "", f"{pre}.{tag}.sum"], MS, epsilon=eps)
            return outs[0], outs[3]

        h, resid = norm(x, resid, "input_layernorm", "input_layernorm")
        names = [f"{pre}.self_attn.{n}_proj" for n in "qkv"]
        fused = concat([lin[n] for n in names])
        if fused is not None:
            qkv, kin, vin = g.linear(h, fused, f"{pre}.self_attn.qkv_proj"), "", ""
        else:
            qkv, kin, vin = (g.linear(h, lin[n], n) for n in names)
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", TensorProto.FLOAT, kv_shape))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}", TensorProto.FLOAT, ["batch", kvh, "total", D]))
        att = g.node("GroupQueryAttention",
                     [qkv, kin, vin, f"past_key_{i}", f"past_value_{i}", "seqlens_k", "total_sequence_length", cos, sin],
                     [f"{pre}.attn", f"present_key_{i}", f"present_value_{i}"], MS,
                     num_heads=nh, kv_num_heads=kvh, do_rotary=1, rotary_interleaved=0)[0]
        o = g.linear(att, lin[f"{pre}.self_attn.o_proj"], f"{pre}.self_attn.o_proj")
        h, resid = norm(o, resid, "post_attention_layernorm", "post_attention_layernorm")
        gu = concat([lin[f"{pre}.mlp.gate_proj"], lin[f"{pre}.mlp.up_proj"]])
        if gu is not None:
            gate, up = g.node("Split", [g.linear(h, gu, f"{pre}.mlp.gate_up_proj")], [f"{pre}.gate", f"{pre}.up"], axis=-1,
                              num_outputs=2)
        else:
            gate, up = (g.linear(h, lin[f"{pre}.mlp.{n}_proj"], f"{pre}.mlp.{n}_proj") for n in ("gate", "up"))
        act = g.node("Mul", [gate, g.node("Sigmoid", [gate], [f"{pre}.sig"])], [f"{pre}.silu"])
        x = g.linear(g.node("Mul", [act, up], [f"{pre}.act"]), lin[f"{pre}.mlp.down_proj"], f"{pre}.mlp.down_proj")
    w = g.init("model.norm.weight", p.others["model.norm.weight"].numpy())
    final = g.node("SkipSimplifiedLayerNormalization", [x, resid, w], ["final_norm", "", "", ""], MS, epsilon=eps)[0]
    g.linear(final, p.lm_head if p.lm_head is not None else p.embed, "lm_head")
    g.nodes[-1].output[0] = "logits"
    graph = helper.make_graph(g.nodes, "slimcart_wq_decoder", inputs, outputs, g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)])


class OrtLLMRunner:
    """Workload runner on the ORT graph: logits for `{"input_ids"}`, greedy decoding with `max_new_tokens`."""

    runtime = "onnxruntime-matmulnbits"

    def __init__(self, p: PackedLLM, threads: int, accuracy_level: int = 4, pad_token_id=None):
        import onnxruntime as ort

        model = build_graph(p, accuracy_level).SerializeToString()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise SlimcartError(f"ONNX Runtime rejected the int4 graph: {str(e).splitlines()[0]}") from None
        c = p.config
        self.layers, self.kvh = c["num_hidden_layers"], c["num_key_value_heads"]
        self.head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        # Embedding lookup outside the graph, from the quantized table: one row per token, no fp32 copy of the
        # table; only the table is kept (not the PackedLLM, whose unpacked codes the session no longer needs).
        self.embed = functools.partial(embedding_rows, p.embed)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.vocab = c["vocab_size"]

    def forward(self, ids: np.ndarray, past: list | None):
        b, s = ids.shape
        if past is None:
            empty = np.zeros((b, self.kvh, 0, self.head_dim), np.float32)
            past = [empty] * (2 * self.layers)
        total = past[0].shape[2] + s
        feeds = {"inputs_embeds": self.embed(ids), "seqlens_k": np.full(b, total - 1, np.int32),
                 "total_sequence_length": np.array(total, np.int32)}
        for i in range(self.layers):
            feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = past[2 * i], past[2 * i + 1]
        out = self.session.run(self.outputs, feeds)
        return out[0], out[1:]

    def generate(self, ids: np.ndarray, n: int) -> np.ndarray:
        """Greedy decoding of exactly `n` tokens with the KV cache in preallocated buffers that every
        layer's GroupQueryAttention updates in place (past and present bound to the same memory, so no
        per-token copy of the cache) and the logits written into one reused array (IO binding)."""
        from onnxruntime import OrtValue

        b, s = ids.shape
        io = self.session.io_binding()
        shape = (b, self.kvh, s + n, self.head_dim)
        self._kv = [OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32)) for _ in range(2 * self.layers)]
        for i in range(self.layers):
            for j, kind in enumerate(("key", "value")):
                io.bind_ortvalue_input(f"past_{kind}_{i}", self._kv[2 * i + j])
                io.bind_ortvalue_output(f"present_{kind}_{i}", self._kv[2 * i + j])
        prefill = np.empty((b, s, self.vocab), np.float32)
        step_logits = np.empty((b, 1, self.vocab), np.float32)
        new = np.empty((b, n), np.int64)
        x, total, logits = ids, s, prefill
        for step in range(n):
            io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(self.embed(x), dtype=np.float32))
            io.bind_cpu_input("seqlens_k", np.full(b, total - 1, np.int32))
            io.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
            io.bind_ortvalue_output("logits", OrtValue.ortvalue_from_numpy(logits))
            self.session.run_with_iobinding(io)
            new[:, step] = logits[:, -1].argmax(-1)
            x, total, logits = new[:, step : step + 1], total + 1, step_logits
        return new

    def __call__(self, batch: dict) -> np.ndarray:
        ids = np.asarray(batch["input_ids"], dtype=np.int64)
        if "max_new_tokens" not in batch:
            return self.forward(ids, None)[0]
        return self.generate(ids, int(batch["max_new_tokens"]))


class TorchInt4Linear(torch.nn.Module):
    """y = x W^T through aten._weight_int4pack_mm_for_cpu (bf16 activations, K padded to the group)."""

    def __init__(self, q: QuantizedWeight):
        super().__init__()
        n, k = q.codes.shape
        g = q.spec.group_size or _block_for(k)
        if q.spec.bits > 4:
            raise SlimcartError("the torch int4 kernel runs 2- to 4-bit weights only")
        self.k, self.n, self.g = k, n, g
        self.kp = -(-k // g) * g
        codes = torch.nn.functional.pad(q.codes, (0, self.kp - k)).to(torch.int32)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2))
        scale, offset = q.scale.float(), q.offsets()
        if q.spec.group_size is None:
            scale, offset = scale.expand(n, self.kp // g), offset.expand(n, self.kp // g)
        # tinygemm convention: w = (q - 8) * scale + z, so z = offset + 8 * scale
        sz = torch.stack([scale, offset + 8 * scale], -1).transpose(0, 1).contiguous()
        self.register_buffer("scale_zeros", sz.to(torch.bfloat16))

    def forward(self, x):
        shape = x.shape
        x2 = torch.nn.functional.pad(x.reshape(-1, self.k), (0, self.kp - self.k)).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.g, self.scale_zeros)
        return y.float().reshape(*shape[:-1], self.n)


class TorchInt8Head(torch.nn.Module):
    """lm_head on int8 per-row weights through aten._weight_int8pack_mm (bf16 activations)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        # A fresh copy: tensors straight from safetensors may sit at unaligned offsets of the file
        # buffer, which this kernel's vector loads do not tolerate (it segfaults).
        self.register_buffer("w", codes.clone(memory_format=torch.contiguous_format))
        self.register_buffer("s", scales.to(torch.bfloat16))

    def forward(self, x):
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.w, self.s)
        return y.float().reshape(*shape[:-1], -1)


def torch_int4_model(p: PackedLLM) -> torch.nn.Module:
    """The HF model with int4 Linears on torch's CPU kernel (float Linears stay float)."""
    model = to_torch(p)
    for name, q in p.linears.items():
        if isinstance(q, QuantizedWeight) and q.spec.bits <= 4 and q.codebook is None:
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, TorchInt4Linear(q))
    head = p.lm_head if p.lm_head is not None else p.embed
    if isinstance(head, QuantizedWeight) and head.spec.bits == 8 and head.spec.symmetric and head.spec.group_size is None:
        model.lm_head = TorchInt8Head((head.codes.to(torch.int16) - 128).to(torch.int8), head.scale[:, 0])
    elif isinstance(head, QuantizedWeight) and head.spec.bits <= 4 and head.codebook is None:
        model.lm_head = TorchInt4Linear(head)
    return model


ACCURACY_LEVEL = {"int8": 4, "fp32": 1}  # MatMulNBits attribute: 4 = int8 dot products, 1 = fp32


def make_runner(p: PackedLLM, threads: int, runtime: str = "onnxruntime", pad_token_id=None, compute: str = "int8"):
    """A runner for a packed model: "onnxruntime" (MatMulNBits graph, int8 or fp32 compute) or "torch"
    (int4 kernel inside the same `generate` loop as the fp32 baseline)."""
    if runtime == "onnxruntime":
        if compute not in ACCURACY_LEVEL:
            raise SlimcartError(f"unknown MatMulNBits compute '{compute}' (int8 or fp32)")
        return OrtLLMRunner(p, threads, accuracy_level=ACCURACY_LEVEL[compute], pad_token_id=pad_token_id)
    if runtime == "torch":
        from ..models.causal_lm import CausalLM
        from .torch_runtime import CausalLMRunner

        r = CausalLMRunner(CausalLM(torch_int4_model(p)), pad_token_id=pad_token_id)
        r.runtime = "torch-int4pack"
        return r
    raise SlimcartError(f"unknown runtime '{runtime}' for a packed LLM (onnxruntime or torch)")


@register_artifact
class PackedLLMFolder(Artifact):
    """A weight-only quantized decoder in the `slimcart-wq` layout (see packed_llm.py), run by ONNX
    Runtime's MatMulNBits (or torch's int4 kernel)."""

    format = FORMAT
    runtime = "onnxruntime-matmulnbits"

    def __init__(self, lm, qweights: dict, method: str, embedding_bits: int, compute: str = "int8", embed_q=None):
        self.lm, self.qweights, self.method = lm, qweights, method
        self.embedding_bits, self.compute, self.embed_q = embedding_bits, compute, embed_q

    def save(self, folder: Path, workload, bundle: ModelBundle) -> None:
        save_packed(folder, self.lm, self.qweights, self.method, self.embedding_bits, bundle.tokenizer, self.compute,
                    self.embed_q)

    @classmethod
    def load(cls, folder: Path, meta: dict, workload, threads: int):
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the tokenizer loader reads the refusing config.json and warns about its model type
        try:
            bundle = workload.load_companions(folder)
        finally:
            hf_logging.set_verbosity(level)
        runner = make_runner(load_packed(folder), threads, meta.get("runtime", "onnxruntime"),
                             pad_token_id=getattr(bundle.tokenizer, "eos_token_id", None), compute=meta.get("compute", "int8"))
        bundle.extra["packed"] = meta
        return runner, bundle

    @classmethod
    def reference(cls, workload, bundle: ModelBundle, workdir: Path, threads: int):
        """The same decoder graph with the unquantized fp32 weights: what the runtime alone buys."""
        lm = causal_lm(bundle.module)
        lin = {n: m.weight.detach() for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
        others = {k: v for k, v in lm.state_dict().items() if "norm" in k}
        p = PackedLLM(lm.config.to_dict(), lin, lm.get_input_embeddings().weight.detach(), None, others, {})
        runner = OrtLLMRunner(p, threads, pad_token_id=getattr(bundle.tokenizer, "eos_token_id", None))
        runner.runtime = "onnxruntime-fp32"
        return runner
