"""On-disk format of weight-only quantized LLMs ("slimcart-wq"): bytes reflect the bits.

slimcart-wq.safetensors holds, per quantized Linear NAME:
  NAME.qweight  uint8 [out, ceil(in * bits / 8)]  codes bit-packed along `in` (4-bit: two per byte,
                element 2i in the low nibble = pack_int4 / MatMulNBits order; 2/3-bit: little-endian
                bit stream per row; 8-bit: one per byte)
  NAME.scales   float16 [out, n_groups]
  NAME.qzeros   uint8 [out, ceil(n_groups * bits / 8)], packed the same way (integer zero points), or
  NAME.offsets  float16 [out, n_groups] (float zero points: W = q * scale + offset); neither if symmetric
  NAME.kmeans_codebook float16 [out, 2**bits] for k-means (non-uniform) Linears instead of scales
The token embedding (tied to lm_head in SmolLM2, stored once) is stored the same way under `embed`
(8-bit symmetric per row by default, or 4-bit groups: `embedding_bits`), or as float16 `embed.weight`;
an untied lm_head as 8-bit per row under `lm_head`; every other tensor (RMSNorm weights) in float32.
slimcart-format.json records the method, the per-Linear specs (and the embedding's) and the Hugging
Face config (`hf_config`).

No other runtime can read these codes, so the folder must not look loadable: its config.json names
`model_type: "slimcart-wq"` (transformers' Auto classes refuse an unknown model type) and the weights
file is not called model.safetensors (a concrete class such as LlamaForCausalLM finds no weights and
refuses too), so nothing ever runs it with randomly initialised layers. Other runtimes get their own
exports: GGUF (gguf_llm.py) and the Hugging Face GPTQ layout (gptq_hf.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, model_validator

from ..contracts import FORMAT_FILE, inside, read_format, write_format
from ..errors import SlimcartError

SUPPORTED_BITS = (2, 3, 4, 8)


class WeightSpec(BaseModel):
    """Bits and grouping of weight-only quantization."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    bits: int = 4
    group_size: int | None = 128  # None: per output channel
    symmetric: bool = False
    zero_point: Literal["int", "float"] = "int"  # asymmetric only
    partial_last_group: bool = False

    @model_validator(mode="before")
    @classmethod
    def _check(cls, v):
        if isinstance(v, dict):
            bits, g = v.get("bits", 4), v.get("group_size", 128)
            if bits not in SUPPORTED_BITS or isinstance(bits, bool):
                raise SlimcartError(f"weight-only bits must be one of {SUPPORTED_BITS}, got {bits!r}")
            if g is not None and (not isinstance(g, int) or g < 16 or g & (g - 1)):
                raise SlimcartError(f"group_size must be a power of two >= 16 (or null for per-channel), got {g!r}")
        return v

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int, name: str = "weight") -> list[tuple[int, int]]:
        """[(start, end)] column ranges of the groups of a row of `in_features` columns."""
        g = self.group_size or in_features
        if in_features % g and not self.partial_last_group:
            raise SlimcartError(
                f"group_size {g} does not divide in_features {in_features} of {name} "
                "(set partial_last_group: true to allow a shorter last group)")
        return [(s, min(s + g, in_features)) for s in range(0, in_features, g)]


@dataclass
class QuantizedWeight:
    """Codes [out, in] uint8; scale [out, n_groups] float16; zero [out, n_groups] uint8 (zero_point int)
    or offset [out, n_groups] float16 (zero_point float); neither when symmetric."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: WeightSpec
    offset: torch.Tensor | None = None
    codebook: torch.Tensor | None = None  # [out, 2**bits] float16: k-means levels (codes index them)

    def offsets(self) -> torch.Tensor:
        """m per (row, group) in float32: W = codes * scale + m."""
        if self.offset is not None:
            return self.offset.float()
        z = self.zero.float() if self.zero is not None else torch.full_like(self.scale, 2 ** (self.spec.bits - 1), dtype=torch.float32)
        return -z * self.scale.float()

    def per_column(self, t: torch.Tensor) -> torch.Tensor:
        """Expand a per-(row, group) tensor to [out, in]."""
        idx = torch.cat([torch.full((e - s,), i) for i, (s, e) in enumerate(self.spec.groups(self.codes.shape[1]))])
        return t[:, idx]

    def dequantize(self) -> torch.Tensor:
        """The float32 weight the kernels compute with."""
        if self.codebook is not None:
            return torch.gather(self.codebook.float(), 1, self.codes.long())
        return self.codes.float() * self.per_column(self.scale.float()) + self.per_column(self.offsets())



def pack_int4(codes: torch.Tensor | np.ndarray, signed: bool = False) -> torch.Tensor:
    """Pack 4-bit codes two per byte along the last dim: element 2i in the low nibble, 2i+1 in the high
    nibble (the ONNX Runtime MatMulNBits / GGUF order). Codes are 0..15, or -8..7 with `signed`."""
    c = torch.as_tensor(codes)
    if c.dtype.is_floating_point or c.dtype == torch.bool:
        raise SlimcartError(f"pack_int4 needs integer codes, got {c.dtype}")
    if c.dim() == 0 or c.shape[-1] % 2:
        raise SlimcartError(f"pack_int4 needs an even last dimension, got shape {tuple(c.shape)}")
    c = c.to(torch.int16)
    lo_ok, hi_ok = (-8, 7) if signed else (0, 15)
    if c.numel() and (int(c.min()) < lo_ok or int(c.max()) > hi_ok):
        raise SlimcartError(f"int4 codes must lie in [{lo_ok}, {hi_ok}], got [{int(c.min())}, {int(c.max())}]")
    u = (c & 0xF).to(torch.uint8)  # two's complement nibble for signed codes
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor | np.ndarray, signed: bool = False) -> torch.Tensor:
    """Inverse of `pack_int4`: [..., n] uint8 -> [..., 2n] codes (uint8, or int8 with `signed`)."""
    p = torch.as_tensor(packed)
    if p.dtype != torch.uint8:
        raise SlimcartError(f"unpack_int4 needs uint8 bytes, got {p.dtype}")
    lo, hi = p & 0xF, p >> 4
    out = torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    if signed:
        out = out.to(torch.int8)
        out = torch.where(out > 7, out - 16, out)
    return out


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


def quantize_embedding(w: torch.Tensor) -> QuantizedWeight:
    """Symmetric int8 per row (per token) as an 8-bit QuantizedWeight: codes = round(w / s) + 128,
    s = max|w_row| / 127 (float16), so W = (codes - 128) * s (GGUF Q8_0 blocks hold exactly these)."""
    scale = (w.abs().amax(1) / 127).clamp_min(1e-8).half()
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127)
    spec = WeightSpec(bits=8, group_size=None, symmetric=True)
    return QuantizedWeight((q + 128).to(torch.uint8), scale[:, None].contiguous(), None, spec)


def embedding_rows(e: QuantizedWeight | torch.Tensor, ids: np.ndarray) -> np.ndarray:
    """float32 rows of an embedding table for token ids (any shape): dequantizes only those rows, so no
    float copy of the table is ever made."""
    idx = torch.from_numpy(np.asarray(ids).reshape(-1))
    if isinstance(e, torch.Tensor):
        rows = e[idx].float()
    else:
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        rows = QuantizedWeight(e.codes[idx], e.scale[idx], pick(e.zero), e.spec, pick(e.offset)).dequantize()
    return rows.numpy().reshape(*np.shape(ids), -1)


WEIGHTS_FILE = "slimcart-wq.safetensors"
REFUSE_CONFIG = {"model_type": FORMAT, "architectures": ["SlimcartWeightOnlyPacked"],
                 "slimcart": "weight-only quantized codes only slimcart reads (slimcart.api.load); "
                             "export to GGUF or the GPTQ layout for other runtimes"}


@dataclass
class PackedLLM:
    """Everything a runtime needs: the HF config, quantized Linears, the (tied) embedding table, the rest."""

    config: dict
    linears: dict[str, QuantizedWeight | torch.Tensor]  # or a float weight
    embed: QuantizedWeight | torch.Tensor  # [V, H]: quantized, or float (float16 / float32)
    lm_head: QuantizedWeight | torch.Tensor | None  # None: tied to the embedding
    others: dict[str, torch.Tensor]
    meta: dict

    def embedding_rows(self, ids: np.ndarray) -> np.ndarray:
        return embedding_rows(self.embed, ids)

    def embedding_f32(self) -> torch.Tensor:
        return self.embed.float() if isinstance(self.embed, torch.Tensor) else self.embed.dequantize()


def _put(tensors: dict, name: str, q: QuantizedWeight) -> dict:
    """Store one QuantizedWeight under `name` (see the module docstring); returns its spec record."""
    tensors[f"{name}.qweight"] = pack_bits(q.codes, q.spec.bits)
    if q.codebook is not None:
        tensors[f"{name}.kmeans_codebook"] = q.codebook.half().contiguous()
    else:
        tensors[f"{name}.scales"] = q.scale.half().contiguous()
        if q.zero is not None:
            tensors[f"{name}.qzeros"] = pack_bits(q.zero, q.spec.bits)
        if q.offset is not None:
            tensors[f"{name}.offsets"] = q.offset.contiguous()
    return {**q.spec.model_dump(), "in_features": int(q.codes.shape[1])}


def _get(t: dict, name: str, sp: dict) -> QuantizedWeight:
    sp = dict(sp)
    n = int(sp.pop("in_features"))
    spec = WeightSpec(**sp)
    codes = unpack_bits(t[f"{name}.qweight"], spec.bits, n)
    if f"{name}.kmeans_codebook" in t:
        cb = t[f"{name}.kmeans_codebook"]
        return QuantizedWeight(codes, torch.ones(cb.shape[0], 1, dtype=torch.float16), None, spec, codebook=cb)
    scales = t[f"{name}.scales"]
    zero = unpack_bits(t[f"{name}.qzeros"], spec.bits, scales.shape[1]) if f"{name}.qzeros" in t else None
    return QuantizedWeight(codes, scales, zero, spec, t.get(f"{name}.offsets"))


def pack_model(lm, qweights: dict, embedding_bits: int = 8, embed_q: QuantizedWeight | None = None, meta: dict | None = None) -> PackedLLM:
    """The in-memory PackedLLM of a Hugging Face causal LM whose Linears `qweights` quantized.
    `embed_q`: the embedding already quantized by the step (e.g. 4-bit groups); else `embedding_bits`
    8 = int8 per row, 16 = float16, 32 = float32 (kept as is). An untied lm_head is int8 per row."""
    emb = lm.get_input_embeddings().weight.detach().float()
    tied = lm.get_output_embeddings() is not None and lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    if embed_q is None:
        embed_q = quantize_embedding(emb) if embedding_bits == 8 else emb.half() if embedding_bits == 16 else emb
    head = None if tied else quantize_embedding(lm.get_output_embeddings().weight.detach().float())
    skip = {f"{n}.weight" for n in qweights} | {"model.embed_tokens.weight", "lm_head.weight"}
    others = {n: p.detach().float().contiguous() for n, p in lm.state_dict().items() if n not in skip}
    cfg = lm.config.to_dict()
    cfg.pop("quantization_config", None)  # the GGUF loader's marker: this is no longer a GGUF model
    return PackedLLM(json.loads(json.dumps(cfg, default=str)), dict(qweights), embed_q, head, others, dict(meta or {}))


def save_packed(folder: Path, lm, qweights: dict, method: str, embedding_bits: int, tokenizer=None,
                compute: str = "int8", embed_q: QuantizedWeight | None = None) -> None:
    """Write slimcart-wq.safetensors + the refusing config.json + tokenizer + slimcart-format.json
    (see the module docstring and `pack_model`)."""
    write_packed(folder, pack_model(lm, qweights, embedding_bits, embed_q), method, tokenizer, compute)


def write_packed(folder: Path, p: PackedLLM, method: str, tokenizer=None, compute: str = "int8") -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    specs = {name: _put(tensors, name, q) for name, q in p.linears.items()}
    if isinstance(p.embed, QuantizedWeight):
        embed_spec, bits = _put(tensors, "embed", p.embed), p.embed.spec.bits
    else:
        tensors["embed.weight"], embed_spec, bits = p.embed.half(), None, 16
    head_spec = _put(tensors, "lm_head", p.lm_head) if p.lm_head is not None else None
    tensors.update({f"other.{n}": t for n, t in p.others.items()})
    save_file(tensors, str(folder / WEIGHTS_FILE))
    (folder / "config.json").write_text(json.dumps(REFUSE_CONFIG, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    write_format(folder, FORMAT, method=method, embedding_bits=bits, tied_embedding=p.lm_head is None, compute=compute,
                 weights=WEIGHTS_FILE, hf_config=p.config, embedding=embed_spec, lm_head=head_spec, linears=specs)


def load_packed(folder: Path) -> PackedLLM:
    """Read a slimcart-wq folder back (bit-exact codes, scales and zeros). Also reads the layout of
    earlier versions (model.safetensors + a plain config.json, int8 embedding with 1-D scales)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_format(folder) or {}
    if not isinstance(meta.get("linears"), dict):
        raise SlimcartError(f"{folder / FORMAT_FILE} has no 'linears' table of quantized layers")
    try:
        t = load_file(str(inside(folder, meta.get("weights", "model.safetensors"), "weights")))
        config = meta.get("hf_config") or json.loads((folder / "config.json").read_text())
    except SlimcartError:
        raise
    except Exception as e:
        raise SlimcartError(f"cannot read packed model in {folder}: {str(e).splitlines()[0]}") from None
    if not isinstance(config, dict) or config.get("model_type") in (None, FORMAT):
        raise SlimcartError(f"{folder}: no Hugging Face config in {FORMAT_FILE} ('hf_config')")
    try:
        linears: dict = {name: _get(t, name, sp) for name, sp in meta["linears"].items()}
        if isinstance(meta.get("embedding"), dict):
            embed = _get(t, "embed", meta["embedding"])
        elif "embed.qweight" in t:  # earlier layout: int8 codes, 1-D float16 scales
            spec = WeightSpec(bits=8, group_size=None, symmetric=True)
            embed = QuantizedWeight((t["embed.qweight"].to(torch.int16) + 128).to(torch.uint8), t["embed.scales"][:, None], None, spec)
        else:
            embed = t["embed.weight"]
        lm_head = None
        if isinstance(meta.get("lm_head"), dict):
            lm_head = _get(t, "lm_head", meta["lm_head"])
        elif "lm_head.qweight" in t:
            spec = WeightSpec(bits=8, group_size=None, symmetric=True)
            lm_head = QuantizedWeight((t["lm_head.qweight"].to(torch.int16) + 128).to(torch.uint8), t["lm_head.scales"][:, None], None, spec)
    except (KeyError, TypeError, ValueError) as e:
        raise SlimcartError(f"{folder}: the packed weights do not match {FORMAT_FILE} ({type(e).__name__}: {e})") from None
    others = {k[len("other."):]: v for k, v in t.items() if k.startswith("other.")}
    return PackedLLM(config, linears, embed, lm_head, others, meta)


def to_torch(packed: PackedLLM) -> torch.nn.Module:
    """A Hugging Face causal LM with the dequantized weights (float32; for checks and the torch path)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**packed.config)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    sd = dict(packed.others)
    for name, q in packed.linears.items():
        sd[f"{name}.weight"] = q.dequantize() if isinstance(q, QuantizedWeight) else q
    sd["model.embed_tokens.weight"] = packed.embedding_f32()
    if packed.lm_head is not None:
        h = packed.lm_head
        sd["lm_head.weight"] = h.dequantize() if isinstance(h, QuantizedWeight) else h.float()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise SlimcartError(f"packed model does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model
