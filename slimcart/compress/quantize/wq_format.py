"""On-disk format of weight-only quantized LLMs ("slimcart-wq"): bytes reflect the bits.

model.safetensors holds, per quantized Linear NAME:
  NAME.qweight  uint8 [out, ceil(in * bits / 8)]  codes bit-packed along `in` (4-bit: two per byte,
                element 2i in the low nibble = pack_int4 / MatMulNBits order; 2/3-bit: little-endian
                bit stream per row; 8-bit: one per byte)
  NAME.scales   float16 [out, n_groups]
  NAME.qzeros   uint8 [out, ceil(n_groups * bits / 8)], packed the same way (integer zero points), or
  NAME.offsets  float16 [out, n_groups] (float zero points: W = q * scale + offset); neither if symmetric
  NAME.kmeans_codebook float16 [out, 2**bits] for k-means (non-uniform) Linears instead of scales
the token embedding (tied to lm_head in SmolLM2, stored once) as int8 per row + float16 row scales
(`embedding_bits: 8`) or float16, and every other tensor (RMSNorm weights) in float32.
slimcart-format.json records the method, the per-Linear specs and the Hugging Face config.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import SlimcartError
from ...formats import register_format, write_format
from .schemes import pack_int4, unpack_int4
from .weight_only import QuantizedWeight, WeightSpec

FORMAT = "slimcart-wq"


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [rows, n] (< 2**bits) -> packed bytes [rows, ceil(n * bits / 8)]."""
    c = codes.to(torch.uint8)
    if bits == 8:
        return c.contiguous()
    if bits == 4:
        return pack_int4(c if c.shape[1] % 2 == 0 else torch.nn.functional.pad(c, (0, 1)))
    planes = (c.numpy()[..., None] >> np.arange(bits, dtype=np.uint8)) & 1  # [rows, n, bits]
    return torch.from_numpy(np.packbits(planes.reshape(c.shape[0], -1), axis=1, bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: [rows, bytes] -> uint8 codes [rows, n]."""
    if bits == 8:
        return packed[:, :n].clone()
    if bits == 4:
        return unpack_int4(packed)[:, :n].contiguous()
    planes = np.unpackbits(packed.numpy(), axis=1, bitorder="little")[:, : n * bits].reshape(packed.shape[0], n, bits)
    return torch.from_numpy((planes << np.arange(bits, dtype=np.uint8)).sum(-1).astype(np.uint8))


def quantize_embedding(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (per token): (codes int8 [V, H], scales float16 [V])."""
    scale = (w.abs().amax(1) / 127).clamp_min(1e-8).half()
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


@dataclass
class PackedLLM:
    """Everything a runtime needs: the HF config, quantized Linears, dequantizable embedding, the rest."""

    config: dict
    linears: dict[str, QuantizedWeight | torch.Tensor]  # or a float weight
    embedding: torch.Tensor  # float32 [V, H] as the kernels see it (int8 * scale, or float16)
    embed_int8: tuple[torch.Tensor, torch.Tensor] | None
    lm_head: torch.Tensor | None  # float32 weight when not tied to the embedding
    others: dict[str, torch.Tensor]
    meta: dict


def save_packed(folder: Path, lm, qweights: dict, method: str, embedding_bits: int, tokenizer=None,
                compute: str = "int8") -> None:
    """Write model.safetensors + config.json + tokenizer + slimcart-format.json (see module docstring)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    specs = {}
    for name, q in qweights.items():
        tensors[f"{name}.qweight"] = pack_bits(q.codes, q.spec.bits)
        if q.codebook is not None:
            tensors[f"{name}.kmeans_codebook"] = q.codebook.half().contiguous()
        else:
            tensors[f"{name}.scales"] = q.scale.contiguous()
            if q.zero is not None:
                tensors[f"{name}.qzeros"] = pack_bits(q.zero, q.spec.bits)
            if q.offset is not None:
                tensors[f"{name}.offsets"] = q.offset.contiguous()
        specs[name] = {**q.spec.model_dump(), "in_features": int(q.codes.shape[1])}
    emb = lm.get_input_embeddings().weight.detach().float()
    tied = lm.get_output_embeddings() is not None and lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    if embedding_bits == 8:
        tensors["embed.qweight"], tensors["embed.scales"] = quantize_embedding(emb)
    else:
        tensors["embed.weight"] = emb.half()
    if not tied:
        tensors["lm_head.qweight"], tensors["lm_head.scales"] = quantize_embedding(lm.get_output_embeddings().weight.detach().float())
    skip = {f"{n}.weight" for n in qweights} | {"model.embed_tokens.weight", "lm_head.weight"}
    for n, p in lm.state_dict().items():
        if n not in skip:
            tensors[f"other.{n}"] = p.detach().float().contiguous()
    save_file(tensors, str(folder / "model.safetensors"))
    cfg = lm.config.to_dict()
    cfg.pop("quantization_config", None)  # the GGUF loader's marker: this is no longer a GGUF model
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    write_format(folder, FORMAT, method=method, embedding_bits=embedding_bits, tied_embedding=tied, compute=compute,
                 linears=specs)


def load_packed(folder: Path) -> PackedLLM:
    """Read a slimcart-wq folder back (bit-exact codes, scales and zeros)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / "slimcart-format.json").read_text())
    try:
        t = load_file(str(folder / "model.safetensors"))
        config = json.loads((folder / "config.json").read_text())
    except Exception as e:
        raise SlimcartError(f"cannot read packed model in {folder}: {str(e).splitlines()[0]}") from None
    linears: dict = {}
    for name, sp in meta["linears"].items():
        n = sp.pop("in_features")
        spec = WeightSpec(**sp)
        codes = unpack_bits(t[f"{name}.qweight"], spec.bits, n)
        if f"{name}.kmeans_codebook" in t:
            cb = t[f"{name}.kmeans_codebook"]
            linears[name] = QuantizedWeight(codes, torch.ones(cb.shape[0], 1, dtype=torch.float16), None, spec, codebook=cb)
            continue
        scales = t[f"{name}.scales"]
        zero = unpack_bits(t[f"{name}.qzeros"], spec.bits, scales.shape[1]) if f"{name}.qzeros" in t else None
        linears[name] = QuantizedWeight(codes, scales, zero, spec, t.get(f"{name}.offsets"))
    embed_int8 = None
    if "embed.qweight" in t:
        embed_int8 = (t["embed.qweight"], t["embed.scales"])
        emb = t["embed.qweight"].float() * t["embed.scales"].float()[:, None]
    else:
        emb = t["embed.weight"].float()
    lm_head = t["lm_head.qweight"].float() * t["lm_head.scales"].float()[:, None] if "lm_head.qweight" in t else None
    others = {k[len("other."):]: v for k, v in t.items() if k.startswith("other.")}
    return PackedLLM(config, linears, emb, embed_int8, lm_head, others, meta)


def to_torch(packed: PackedLLM) -> torch.nn.Module:
    """A Hugging Face causal LM with the dequantized weights (float32; for checks and the torch path)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**packed.config)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    sd = dict(packed.others)
    for name, q in packed.linears.items():
        sd[f"{name}.weight"] = q.dequantize() if isinstance(q, QuantizedWeight) else q
    sd["model.embed_tokens.weight"] = packed.embedding
    if packed.lm_head is not None:
        sd["lm_head.weight"] = packed.lm_head
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise SlimcartError(f"packed model does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model


@register_format(FORMAT)
def _load(workload, folder: Path, meta: dict):
    """Loader for `slimcart compress`/`evaluate`: the ONNX Runtime MatMulNBits runner (or torch)."""
    from transformers import AutoTokenizer

    from ...workloads.base import ModelBundle
    from .int4_kernels import make_runner

    folder = Path(folder)
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    packed = load_packed(folder)
    runner = make_runner(packed, meta.get("runtime", "onnxruntime"), pad_token_id=tok.eos_token_id,
                         compute=meta.get("compute", "int8"))
    return runner, ModelBundle(name=str(folder), module=None, source=folder, tokenizer=tok, extra={"packed": meta})
