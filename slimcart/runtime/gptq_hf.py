"""Hugging Face folder in the GPTQ layout ("quant_method": "gptq"), the checkpoint GPU servers such as
vLLM and transformers (with its optional gptqmodel backend) load.

Per quantized Linear NAME (4-bit codes q [out, in], groups of `group_size` consecutive input columns):
  NAME.qweight  int32 [in / 8, out]        bits 4k..4k+3 of qweight[i, o] = q[o, 8i + k]
  NAME.qzeros   int32 [n_groups, out / 8]  bits 4k..4k+3 of qzeros[g, j] = zero[8j + k, g] - 1
  NAME.scales   float16 [n_groups, out]
  NAME.g_idx    int32 [in]                 group of input column i = i // group_size
and W[o, i] = scales[g, o] * (q[o, i] - (stored zero + 1)), g = g_idx[i] ("checkpoint_format": "gptq",
the original AutoGPTQ convention that stores zero - 1; a zero point of 0 cannot be stored in it, so such
weights are refused). Symmetric weights store zero 8. Act-order GPTQ in slimcart keeps groups
contiguous in the original column order, so `desc_act` is false and g_idx is the identity grouping.
The embedding, lm_head and norms are float16, as GPTQ checkpoints keep them.

slimcart reads the folder back itself (`read_gptq`) to evaluate it, since no GPTQ backend for
transformers installs on this CPU-only setup; transformers without one refuses the folder with an
ImportError rather than loading random weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..contracts import Artifact, ModelBundle, inside, register_artifact, write_format
from ..errors import SlimcartError
from .packed_llm import PackedLLM, QuantizedWeight, WeightSpec

FORMAT = "gptq-hf"
WEIGHTS = "model.safetensors"


def check_gptq(name: str, q) -> None:
    if not isinstance(q, QuantizedWeight) or q.codebook is not None or q.offset is not None or q.spec.bits != 4:
        raise SlimcartError(f"{name}: the GPTQ layout holds 4-bit codes with integer zero points only")
    out, n_in = q.codes.shape
    g = q.spec.group_size
    if g is None or n_in % g or n_in % 8 or out % 8:
        raise SlimcartError(f"{name}: the GPTQ layout needs groups that divide in_features ({n_in}, group {g}) "
                            "and widths that are multiples of 8")
    if q.zero is not None and int(q.zero.min()) == 0:
        raise SlimcartError(f"{name}: a zero point of 0 cannot be stored in the GPTQ (v1) layout; use symmetric: true")


def pack_rows8(v: np.ndarray) -> np.ndarray:
    """[n, m] 4-bit values -> int32 [n / 8, m]: value 8i+k of a column in bits 4k..4k+3 of word i."""
    v = v.astype(np.uint32).reshape(v.shape[0] // 8, 8, v.shape[1])
    words = np.zeros((v.shape[0], v.shape[2]), np.uint32)
    for k in range(8):
        words |= (v[:, k] & 0xF) << np.uint32(4 * k)
    return words.view(np.int32)


def unpack_rows8(words: np.ndarray) -> np.ndarray:
    w = words.view(np.uint32)
    return np.stack([(w >> np.uint32(4 * k)) & 0xF for k in range(8)], 1).reshape(w.shape[0] * 8, w.shape[1]).astype(np.uint8)


def gptq_tensors(name: str, q: QuantizedWeight) -> dict[str, torch.Tensor]:
    check_gptq(name, q)
    zero = q.zero if q.zero is not None else torch.full_like(q.scale, 8, dtype=torch.uint8)
    g = q.spec.group_size
    return {f"{name}.qweight": torch.from_numpy(pack_rows8(q.codes.numpy().T)),
            f"{name}.qzeros": torch.from_numpy(pack_rows8(zero.numpy().astype(np.int16) - 1).T.copy()),
            f"{name}.scales": q.scale.half().t().contiguous(),
            f"{name}.g_idx": torch.arange(q.codes.shape[1], dtype=torch.int32) // g}


def write_gptq(folder: Path, p: PackedLLM, tokenizer=None) -> dict:
    """Write the GPTQ folder; returns its quantization_config."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specs = {q.spec for q in p.linears.values() if isinstance(q, QuantizedWeight)}
    if len(specs) != 1 or len(p.linears) != sum(isinstance(q, QuantizedWeight) for q in p.linears.values()):
        raise SlimcartError("the GPTQ layout needs every quantized Linear at the same bits/group (no per-layer overrides)")
    spec = specs.pop()
    tensors: dict[str, torch.Tensor] = {}
    for name, q in p.linears.items():
        tensors.update(gptq_tensors(name, q))
    tensors["model.embed_tokens.weight"] = p.embedding_f32().half()
    if p.lm_head is not None:
        h = p.lm_head
        tensors["lm_head.weight"] = (h.dequantize() if isinstance(h, QuantizedWeight) else h.float()).half()
    tensors.update({n: t.half().contiguous() for n, t in p.others.items()})
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    qc = {"quant_method": "gptq", "bits": 4, "group_size": spec.group_size, "desc_act": False, "sym": spec.symmetric,
          "checkpoint_format": "gptq", "static_groups": False, "true_sequential": True, "lm_head": False,
          "damp_percent": 0.01, "pack_dtype": "int32", "quantizer": ["slimcart"]}
    cfg = {**p.config, "quantization_config": qc, "torch_dtype": "float16", "dtype": "float16"}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return qc


def read_gptq(folder: Path) -> PackedLLM:
    """The PackedLLM of a GPTQ folder (4-bit, groups of consecutive columns, checkpoint_format gptq)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text())
        t = load_file(str(inside(folder, WEIGHTS, "weights")))
    except Exception as e:
        raise SlimcartError(f"cannot read GPTQ folder {folder}: {str(e).splitlines()[0]}") from None
    qc = cfg.pop("quantization_config", None) or {}
    if qc.get("quant_method") != "gptq" or qc.get("bits") != 4 or qc.get("checkpoint_format", "gptq") != "gptq":
        raise SlimcartError(f"{folder}: slimcart reads 4-bit GPTQ (checkpoint_format gptq) folders, got {qc}")
    spec = WeightSpec(bits=4, group_size=int(qc["group_size"]), symmetric=bool(qc.get("sym")))
    linears = {}
    for key in [k for k in t if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        g_idx = t[f"{name}.g_idx"]
        codes = torch.from_numpy(unpack_rows8(t[key].numpy()).T.copy())
        if not torch.equal(g_idx, torch.arange(codes.shape[1], dtype=g_idx.dtype) // spec.group_size):
            raise SlimcartError(f"{folder}: {name} uses act-order group indices (desc_act), which slimcart does not read")
        zero = torch.from_numpy((unpack_rows8(t[f"{name}.qzeros"].numpy().T.copy()).astype(np.int16) + 1).astype(np.uint8))
        scale = t[f"{name}.scales"].t().contiguous()
        linears[name] = QuantizedWeight(codes, scale, None if spec.symmetric else zero, spec)
    embed = t["model.embed_tokens.weight"]
    head = t.get("lm_head.weight")
    skip = {k for k in t if k.rsplit(".", 1)[0] in linears} | {"model.embed_tokens.weight", "lm_head.weight"}
    others = {k: v.float() for k, v in t.items() if k not in skip}
    return PackedLLM(cfg, linears, embed, head, others, {"format": FORMAT, "quantization_config": qc})


@register_artifact
class GPTQFolder(Artifact):
    """A Hugging Face GPTQ checkpoint (see the module docstring); slimcart runs it on ONNX Runtime MatMulNBits."""

    format = FORMAT
    runtime = "onnxruntime-matmulnbits"

    def __init__(self, packed: PackedLLM, method: str):
        self.packed, self.method = packed, method

    def save(self, folder: Path, workload, bundle: ModelBundle) -> None:
        qc = write_gptq(folder, self.packed)
        workload.save_companions(bundle, folder)
        write_format(folder, FORMAT, method=self.method, quantization_config=qc)

    @classmethod
    def load(cls, folder: Path, meta: dict, workload, threads: int):
        from .llm_kernels import make_runner

        bundle = workload.load_companions(folder)
        runner = make_runner(read_gptq(folder), threads, pad_token_id=getattr(bundle.tokenizer, "eos_token_id", None))
        bundle.extra["gptq"] = meta
        return runner, bundle

    def describe(self) -> str:
        return "Hugging Face GPTQ folder"
