"""Export steps for weight-only quantized LLMs: the codes a weight-only step chose (RTN, GPTQ, AWQ...)
written in a format other runtimes load, instead of slimcart's own packed folder.

  export_gguf   one GGUF file for llama.cpp: slimcart's codes copied into Q4_0 / Q4_1 / Q8_0 blocks
                where its groups are whole 32-blocks (exact), requantized otherwise only if allowed
  export_gptq   a Hugging Face folder in the GPTQ layout (transformers + gptqmodel, vLLM)

Both follow a `weight_only_*` step and take its hand-over (the packed Linears, the embedding), so the
calibration work is not redone and GPTQ/AWQ's rounding choices survive the export bit for bit.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from ...errors import SlimcartError
from ...recipe import Step, register_step
from ...runtime.gguf_llm import GGUFModel, exact_type
from ...runtime.gptq_hf import GPTQFolder, check_gptq
from ...runtime.llm_kernels import PackedLLMFolder
from ...runtime.packed_llm import QuantizedWeight, pack_model


def _packed(state, kind: str):
    art = state.artifact
    if not isinstance(art, PackedLLMFolder):
        raise SlimcartError(f"'{kind}' exports the result of a weight-only step (weight_only_rtn / gptq / awq / kmeans); "
                            "put one before it")
    return art, pack_model(art.lm, art.qweights, art.embedding_bits, art.embed_q)


def _drop_ort(state) -> None:
    state.kernels = [k for k in state.kernels if not k.startswith("onnxruntime MatMulNBits")]


@register_step
class ExportGGUF(Step):
    """Write the quantized decoder as a GGUF that llama.cpp runs (see runtime/gguf_llm.py)."""

    workloads: ClassVar[tuple[str, ...] | None] = ("llm",)
    kind: Literal["export_gguf"] = "export_gguf"
    # Tensors whose codes fit no GGML block exactly: "never" refuses them; else requantized into this type
    requantize: Literal["never", "Q8_0", "Q4_0", "Q4_1", "F16"] = "never"
    tokenizer_pre: str | None = None  # llama.cpp pre-tokenizer; None: the source GGUF's, else "default"

    def apply(self, state, ctx):
        art, packed = _packed(state, self.kind)
        tensors = {**packed.linears, "embedding": packed.embed}
        if packed.lm_head is not None:
            tensors["lm_head"] = packed.lm_head
        inexact = [n for n, q in tensors.items() if isinstance(q, QuantizedWeight) and exact_type(q) is None]
        if inexact and self.requantize == "never":
            raise SlimcartError(f"{len(inexact)} tensors (e.g. {inexact[0]}) fit no GGUF block exactly (GGUF needs 4-bit or "
                                "symmetric 8-bit codes in groups that are multiples of 32); use group_size 32/64/128 or "
                                "set requantize: Q8_0 / Q4_0 on export_gguf")
        state.artifact = GGUFModel(packed, art.method, "Q8_0" if self.requantize == "never" else self.requantize,
                                   self.tokenizer_pre)
        _drop_ort(state)
        types = sorted({exact_type(q) or self.requantize for q in tensors.values() if isinstance(q, QuantizedWeight)})
        state.kernels.append(f"llama.cpp GGUF {'/'.join(types)} blocks")
        state.notes.append(f"export_gguf: {len(tensors) - len(inexact)} tensors copied into GGUF blocks bit for bit"
                           + (f", {len(inexact)} requantized to {self.requantize}" if inexact else ""))
        return state


@register_step
class ExportGPTQ(Step):
    """Write the quantized decoder as a Hugging Face GPTQ checkpoint (see runtime/gptq_hf.py)."""

    workloads: ClassVar[tuple[str, ...] | None] = ("llm",)
    kind: Literal["export_gptq"] = "export_gptq"

    def apply(self, state, ctx):
        art, packed = _packed(state, self.kind)
        for name, q in packed.linears.items():
            check_gptq(name, q)
        state.artifact = GPTQFolder(packed, art.method)
        state.notes.append("export_gptq: Hugging Face GPTQ layout (qweight/qzeros/scales/g_idx, checkpoint_format gptq); "
                           "embedding and lm_head float16")
        return state
