"""GGUF export of weight-only quantized Llama-style decoders, and llama.cpp as their runtime.

Block layouts (32 weights per block along `in`, GGML's little-endian structs):
  Q4_0  float16 d, 16 bytes: byte j = code[j] | code[j + 16] << 4;       w = (code - 8) * d
  Q4_1  float16 d, float16 m, the same 16 bytes;                         w = code * d + m
  Q8_0  float16 d, 32 int8 q;                                            w = q * d
slimcart's own codes land in these blocks exactly wherever its groups are whole blocks (group size a
multiple of 32, or per output channel with `in` a multiple of 32): every 32-block takes its group's
scale. Symmetric 4-bit == Q4_0 (slimcart's implied zero point is 8) and symmetric 8-bit == Q8_0
(zero 128) bit for bit; asymmetric 4-bit == Q4_1 with m = offset, exact for float offsets and up to
float16 rounding of m = -zero * scale for integer zero points. Anything else (2/3-bit, k-means,
groups that are not whole blocks) is requantized from slimcart's dequantized weights by the `gguf`
package's reference quantizer into `requantize` (Q8_0 by default) and reported as such.

Writing the blocks is hand-written on purpose: the `gguf` package only quantizes floats itself, which
would throw away GPTQ/AWQ's choice of codes. Tests check every block against `gguf.quants.dequantize`.

Tensor names follow llama.cpp's Llama loader (through `gguf.get_tensor_name_map`); q/k rows are
reordered from Hugging Face's rotate-half rotary layout to GGML's adjacent-pair layout (row 2j+t of a
head <- row t * D/2 + j), a row permutation that carries each row's scales along. The tokenizer
(GPT-2 style byte-level BPE) is written from the Hugging Face tokenizer's own tokenizer.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..contracts import Artifact, ModelBundle, inside, register_artifact, write_format
from ..errors import SlimcartError
from .packed_llm import PackedLLM, QuantizedWeight

QK = 32
GGUF_FILE = "model.gguf"
FORMAT = "gguf"


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float16).numpy().view(np.uint8).reshape(*x.shape, 2)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """[rows, nb, 32] codes 0..15 -> [rows, nb, 16] bytes: code j low nibble, code j+16 high nibble."""
    return (codes[..., :16] & 0xF) | ((codes[..., 16:] & 0xF) << 4)


def _per_block(q: QuantizedWeight, t: torch.Tensor) -> torch.Tensor:
    """A per-(row, group) tensor repeated for each 32-block of its group: [rows, in / 32]."""
    return q.per_column(t)[:, ::QK]


def exact_type(q: QuantizedWeight) -> str | None:
    """The GGML type holding `q`'s codes and scales exactly (see the module docstring), or None."""
    n_in = q.codes.shape[1]
    if q.codebook is not None or n_in % QK:
        return None
    if any((s % QK) for s, _ in q.spec.groups(n_in)):
        return None
    if q.spec.bits == 4:
        return "Q4_0" if q.spec.symmetric else "Q4_1"
    if q.spec.bits == 8 and q.spec.symmetric:
        return "Q8_0"
    return None


def ggml_blocks(q: QuantizedWeight) -> tuple[np.ndarray, str]:
    """(bytes [rows, in / 32 * block bytes], type) of `q` in its exact GGML type."""
    kind = exact_type(q)
    rows, n_in = q.codes.shape
    codes = q.codes.numpy().reshape(rows, n_in // QK, QK)
    d = _f16_bytes(_per_block(q, q.scale.float()))
    if kind == "Q4_0":
        body = [d, _nibbles(codes)]
    elif kind == "Q4_1":
        m = _f16_bytes(_per_block(q, q.offsets()))
        body = [d, m, _nibbles(codes)]
    elif kind == "Q8_0":
        body = [d, (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
    else:
        raise SlimcartError(f"no exact GGML block type for {q.spec.bits}-bit {q.spec} weights")
    return np.concatenate(body, axis=-1).reshape(rows, -1), kind


def gguf_tensor(w, requantize: str = "Q8_0") -> tuple[np.ndarray, str, bool]:
    """(data, GGML type, exact) for one weight: exact blocks where they exist, else requantized."""
    import gguf

    if isinstance(w, QuantizedWeight) and exact_type(w):
        data, kind = ggml_blocks(w)
        return data, kind, True
    dense = (w.dequantize() if isinstance(w, QuantizedWeight) else w).float().numpy()
    if dense.shape[-1] % QK and requantize not in ("F16", "F32"):
        requantize = "F16"  # GGML blocks need whole rows of 32
    if requantize == "F32":
        return dense, "F32", not isinstance(w, QuantizedWeight)
    if requantize == "F16":
        return dense.astype(np.float16), "F16", isinstance(w, torch.Tensor) and w.dtype == torch.float16
    return gguf.quants.quantize(dense, gguf.GGMLQuantizationType[requantize]), requantize, False


def rope_rows(n_rows: int, heads: int) -> torch.Tensor:
    """Row order taking Hugging Face's rotate-half q/k rows to GGML's adjacent pairs, per head."""
    d = n_rows // heads
    j = torch.arange(d // 2)
    within = torch.stack([j, j + d // 2], 1).reshape(-1)  # new 2j + t <- old t * d/2 + j
    return (torch.arange(heads)[:, None] * d + within[None]).reshape(-1)


def permute_rows(w, order: torch.Tensor):
    if isinstance(w, torch.Tensor):
        return w[order]
    pick = lambda t: None if t is None else t[order]  # noqa: E731
    return QuantizedWeight(w.codes[order], w.scale[order], pick(w.zero), w.spec, pick(w.offset), pick(w.codebook))


# ---------------------------------------------------------------- tokenizer

def tokenizer_fields(tokenizer, vocab_size: int) -> dict:
    """tokens / token types / merges of a byte-level BPE Hugging Face tokenizer, padded to `vocab_size`."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise SlimcartError("GGUF export needs a fast (tokenizers) byte-level BPE tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise SlimcartError(f"GGUF export supports byte-level BPE tokenizers, not {model.get('type')}")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    if max(vocab.values()) >= vocab_size:
        raise SlimcartError(f"tokenizer has ids up to {max(vocab.values())} but the model's vocabulary is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [5] * vocab_size  # UNUSED until a token claims the id
    for text, i in vocab.items():
        tokens[i] = text
        t = added.get(text)
        types[i] = 1 if t is None else (3 if t.get("special") else 4)  # NORMAL, CONTROL, USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def source_gguf_pre(bundle: ModelBundle | None) -> str:
    """llama.cpp's pre-tokenizer name: the source GGUF's when the model came from one, else 'default'
    (llama.cpp's generic byte-level split; token ids given directly are unaffected)."""
    try:
        import gguf

        path = Path(bundle.source) / bundle.extra["gguf_file"]
        field = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.pre")
        return str(field.contents()) if field is not None else "default"
    except Exception:  # no source GGUF (a Hugging Face folder): the generic pre-tokenizer
        return "default"


# ---------------------------------------------------------------- the file

def write_gguf(path: Path, p: PackedLLM, tokenizer, name: str = "slimcart", pre: str = "default",
               requantize: str = "Q8_0", float_type: str = "F16") -> dict:
    """Write `p` as a llama.cpp-loadable GGUF; returns {tensor: {"type", "exact"}}. Float matrices
    (Linears left unquantized) are written as `float_type`; 1-D tensors (norms) as F32."""
    import gguf

    c = p.config
    if c.get("model_type") not in ("llama", "mistral") or c.get("rope_scaling") or c.get("attention_bias") or c.get("mlp_bias"):
        raise SlimcartError(f"GGUF export supports plain Llama-style decoders, not {c.get('model_type')} with these options")
    H, nh, kvh, L = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["num_hidden_layers"]
    D = c.get("head_dim") or H // nh
    theta = float((c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 10000.0)))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(int(c.get("max_position_embeddings", 2048)))
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(kvh)
    w.add_rope_dimension_count(D)
    w.add_key_length(D)
    w.add_value_length(D)
    w.add_layer_norm_rms_eps(float(c["rms_norm_eps"]))
    w.add_rope_freq_base(theta)
    w.add_vocab_size(c["vocab_size"])
    tok = tokenizer_fields(tokenizer, c["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for key, adder in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                       ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        tid = getattr(tokenizer, key, None)
        if isinstance(tid, int) and 0 <= tid < c["vocab_size"]:
            adder(tid)
    w.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        w.add_chat_template(tokenizer.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, L)
    tensors = {"model.embed_tokens.weight": p.embed, **{f"{k}.weight": v for k, v in p.linears.items()},
               **{k: v for k, v in p.others.items() if v.dim() == 2}}
    if p.lm_head is not None:
        tensors["lm_head.weight"] = p.lm_head
    report, kinds = {}, []
    for hf_name, t in tensors.items():
        if ".self_attn.q_proj." in hf_name or ".self_attn.k_proj." in hf_name:
            t = permute_rows(t, rope_rows(t.shape[0] if isinstance(t, torch.Tensor) else t.codes.shape[0],
                                          nh if ".q_proj." in hf_name else kvh))
        data, kind, exact = gguf_tensor(t, float_type if isinstance(t, torch.Tensor) else requantize)
        target = names.get_name(hf_name, try_suffixes=(".weight",))
        if target is None:
            raise SlimcartError(f"no llama.cpp tensor name for {hf_name}")
        w.add_tensor(target, data, raw_dtype=gguf.GGMLQuantizationType[kind])
        report[target] = {"type": kind, "exact": exact}
        if "blk." in target:
            kinds.append(kind)
    for hf_name, t in ((k, v) for k, v in p.others.items() if v.dim() != 2):
        target = names.get_name(hf_name, try_suffixes=(".weight",))
        if target is None:
            raise SlimcartError(f"no llama.cpp tensor name for {hf_name}")
        w.add_tensor(target, t.float().numpy())
        report[target] = {"type": "F32", "exact": True}
    ftype = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "F16": 1, "F32": 0}  # general.file_type: the blocks' commonest type
    w.add_file_type(ftype[max(set(kinds), key=kinds.count)] if kinds else 0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return report


# ---------------------------------------------------------------- llama.cpp as a runner

class LlamaCppRunner:
    """A GGUF on llama.cpp (llama-cpp-python): logits for `{"input_ids"}` (every position, one
    sequence at a time) and greedy decoding of exactly `max_new_tokens` for decode requests."""

    runtime = "llama.cpp"

    def __init__(self, path: Path, threads: int, n_ctx: int = 512):
        try:
            import llama_cpp
        except ImportError:
            raise SlimcartError("running a GGUF model needs llama-cpp-python (pip install llama-cpp-python)") from None
        self.lc = llama_cpp
        try:
            # llama-cpp-python's defaults (context and batch of 512) but with every thread setting explicit
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                                       n_threads_batch=threads, logits_all=False, verbose=False)
        except Exception as e:
            raise SlimcartError(f"llama.cpp could not load {path}: {str(e).splitlines()[0]}") from None
        self.n_ctx, self.n_vocab = n_ctx, self.llm.n_vocab()
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)

    def __del__(self):
        if getattr(self, "batch", None) is not None:
            self.lc.llama_batch_free(self.batch)

    def _decode(self, tokens, pos0: int, all_logits: bool) -> None:
        b = self.batch
        b.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = int(t), pos0 + i, 1, all_logits
            b.seq_id[i][0] = 0
        b.logits[len(tokens) - 1] = True
        if self.lc.llama_decode(self.llm.ctx, b) != 0:
            raise SlimcartError("llama.cpp failed to decode a batch")

    def _reset(self) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.llm.ctx), True)

    def _last_logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))

    def __call__(self, batch: dict) -> np.ndarray:
        ids = np.asarray(batch["input_ids"], dtype=np.int64)
        n_new = batch.get("max_new_tokens")
        if ids.shape[1] + int(n_new or 0) > self.n_ctx:
            raise SlimcartError(f"sequence of {ids.shape[1]} tokens (+{n_new or 0} new) exceeds the llama.cpp context of {self.n_ctx}")
        if n_new is None:
            out = np.empty((*ids.shape, self.n_vocab), np.float32)
            for r, row in enumerate(ids):
                self._reset()
                self._decode(row, 0, True)
                out[r] = np.ctypeslib.as_array(self.lc.llama_get_logits(self.llm.ctx), shape=(len(row), self.n_vocab))
            return out
        new = np.empty((ids.shape[0], int(n_new)), np.int64)
        for r, row in enumerate(ids):
            self._reset()
            self._decode(row, 0, False)
            for step in range(int(n_new)):
                new[r, step] = int(np.argmax(self._last_logits()))
                if step + 1 < n_new:
                    self._decode([new[r, step]], len(row) + step, False)
        return new


@register_artifact
class GGUFModel(Artifact):
    """A weight-only quantized decoder as one GGUF file (model.gguf) that llama.cpp loads and runs."""

    format = FORMAT
    runtime = "llama.cpp"

    def __init__(self, packed: PackedLLM, method: str, requantize: str = "Q8_0", pre: str | None = None):
        self.packed, self.method, self.requantize, self.pre = packed, method, requantize, pre
        self.report: dict = {}

    def save(self, folder: Path, workload, bundle: ModelBundle) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        pre = self.pre or source_gguf_pre(bundle)
        self.report = write_gguf(folder / GGUF_FILE, self.packed, bundle.tokenizer, name=f"{bundle.name} {self.method}",
                                 pre=pre, requantize=self.requantize)
        workload.save_companions(bundle, folder)
        types = sorted({r["type"] for r in self.report.values()})
        inexact = sorted(k for k, r in self.report.items() if not r["exact"])
        write_format(folder, FORMAT, file=GGUF_FILE, method=self.method, tokenizer_pre=pre, tensor_types=types,
                     requantized=inexact)

    @classmethod
    def load(cls, folder: Path, meta: dict, workload, threads: int):
        bundle = workload.load_companions(folder)
        runner = LlamaCppRunner(inside(folder, meta.get("file", GGUF_FILE), "GGUF file"), threads)
        bundle.extra["gguf"] = meta
        return runner, bundle

    def describe(self) -> str:
        return "GGUF (llama.cpp)"
