"""Small LLM over HTTP: `POST /generate` (prompt -> greedy continuation), streamed token by token
as server-sent events when `"stream": true`.

Decoding is greedy like the llm workload's runner. With the PyTorch model at hand, each step feeds
one token per stream and reuses the KV cache, the steps of concurrent streams batched into one
forward pass (`KVCacheDecoder`); a model that only exposes a logits runner
(e.g. an exported graph) is decoded by recomputing the whole sequence each step
(`RecomputeDecoder`: same tokens, quadratic cost, said so in /ready).
"""
from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import Field, StringConstraints, create_model

from .servable import (
    Endpoint,
    Limits,
    Prepared,
    RequestError,
    Servable,
    Strict,
    register_servable,
)


def _layers(cache: Any) -> list[tuple[Any, Any]]:
    """[(keys, values)] per layer from a transformers cache object (5.x layers, 4.x lists) or tuple."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v in cache]


def _cache(layers: list[tuple[Any, Any]]) -> Any:
    from transformers import DynamicCache

    if hasattr(DynamicCache, "from_legacy_cache"):  # transformers 4.x
        return DynamicCache.from_legacy_cache(tuple(layers))
    return DynamicCache(ddp_cache_data=layers)


class KVCacheDecoder:
    """Greedy decoding with the KV cache. A stream's state is its cache as [(keys, values)] per layer,
    each (1, kv_heads, length, head_dim), so streams stay independent of each other.

    `step_many` advances several streams in ONE forward pass: their caches are left-padded to the
    longest, the attention mask hides the padding and `position_ids` give each stream its own
    position, so every stream computes what it would alone (up to float rounding of the larger
    matmuls). A decode step of a small model on a CPU mostly streams the weights from memory, so
    B streams in one pass cost far less than B passes.
    """

    kind = "kv-cache, decode steps of concurrent streams batched"

    def __init__(self, hf_model: Any, tokenizer: Any):
        import inspect

        self.model, self.tokenizer = hf_model.eval(), tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        params = inspect.signature(hf_model.forward).parameters
        # transformers 5 renamed `past_key_values` to `cache`; older releases only know the first.
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        # Only the last position's logits are needed: skips a (prompt x vocab) matrix at prefill.
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def _forward(self, input_ids, cache, **kw):
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=input_ids, use_cache=True, **{self.cache_arg: cache}, **kw, **self.extra)
        return _layers(getattr(out, self.cache_arg)), out.logits[:, -1].argmax(-1).tolist()

    def start(self, prompt_ids: list[int]) -> tuple[Any, int]:
        import torch

        layers, nxt = self._forward(torch.tensor([prompt_ids], dtype=torch.long), None)
        return layers, nxt[0]

    def step(self, state: Any, token: int) -> tuple[Any, int]:
        states, tokens = self.step_many([state], [token])
        return states[0], tokens[0]

    def step_many(self, states: list[Any], tokens: list[int]) -> tuple[list[Any], list[int]]:
        import torch

        ids = torch.tensor(tokens, dtype=torch.long).unsqueeze(1)
        if len(states) == 1:
            layers, nxt = self._forward(ids, _cache(states[0]))
            return [layers], nxt
        lens = [st[0][0].shape[2] for st in states]
        B, L = len(states), max(lens)
        padded = []
        for li in range(len(states[0])):
            k0, v0 = states[0][li]
            k = k0.new_zeros((B, k0.shape[1], L, k0.shape[3]))
            v = v0.new_zeros((B, v0.shape[1], L, v0.shape[3]))
            for b, st in enumerate(states):
                k[b, :, L - lens[b]:] = st[li][0][0]
                v[b, :, L - lens[b]:] = st[li][1][0]
            padded.append((k, v))
        mask = torch.zeros(B, L + 1, dtype=torch.long)
        for b, n in enumerate(lens):
            mask[b, L - n:] = 1
        position_ids = torch.tensor(lens, dtype=torch.long).unsqueeze(1)
        layers, nxt = self._forward(ids, _cache(padded), attention_mask=mask, position_ids=position_ids)
        return [[(k[b:b + 1, :, L - n:], v[b:b + 1, :, L - n:]) for k, v in layers] for b, n in enumerate(lens)], nxt

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class RecomputeDecoder:
    kind = "recompute (no KV cache)"

    def __init__(self, runner: Any, tokenizer: Any):
        self.runner, self.tokenizer = runner, tokenizer
        self.eos_token_id = tokenizer.eos_token_id

    def _next(self, ids: list[int]) -> int:
        logits = np.asarray(self.runner({"input_ids": np.asarray([ids], np.int64)}))
        return int(logits[0, -1].argmax())

    def start(self, prompt_ids: list[int]) -> tuple[Any, int]:
        return list(prompt_ids), self._next(prompt_ids)

    def step(self, ids: list[int], token: int) -> tuple[Any, int]:
        ids = ids + [token]
        return ids, self._next(ids)

    def step_many(self, states: list[Any], tokens: list[int]) -> tuple[list[Any], list[int]]:
        pairs = [self.step(st, t) for st, t in zip(states, tokens)]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def decoder_for(runner: Any, bundle: Any):
    hf = getattr(bundle.module, "model", None)
    if hf is not None and hasattr(hf, "generate"):
        return KVCacheDecoder(hf, bundle.tokenizer)
    return RecomputeDecoder(runner, bundle.tokenizer)


@register_servable("llm")
class LlmServable(Servable):
    workload = "llm"
    batched = False

    def __init__(self, runner: Any, bundle: Any, limits: Limits, wl: Any = None, **_):
        super().__init__(limits)
        self.runner, self.bundle, self.tokenizer = runner, bundle, bundle.tokenizer
        self.decoder = decoder_for(runner, bundle)
        prompt = Annotated[str, StringConstraints(min_length=1, max_length=limits.max_chars * 4)]
        self.GenerateRequest = create_model(
            "GenerateRequest", __base__=Strict, prompt=(prompt, ...),
            max_new_tokens=(int, Field(32, ge=1, le=limits.max_new_tokens)),
            stream=(bool, False), stop_at_eos=(bool, True),
        )
        self.endpoints.append(Endpoint("/generate", self.GenerateRequest, self._prepare, streamed=True,
                                       summary="prompt -> greedy continuation (server-sent events with stream=true)"))

    def _prepare(self, req) -> Prepared:
        if not req.prompt.strip():
            raise RequestError("prompt is empty or only whitespace")
        ids = self.tokenizer.encode(req.prompt, add_special_tokens=False)
        if not ids:
            raise RequestError("prompt has no tokens")
        if len(ids) > self.limits.max_prompt_tokens:
            raise RequestError(f"prompt has {len(ids)} tokens; the limit is {self.limits.max_prompt_tokens}", 413)
        return Prepared({"ids": ids, "max_new_tokens": req.max_new_tokens, "stream": req.stream,
                         "stop_at_eos": req.stop_at_eos}, size=1)

    def warmup(self, max_batch: int) -> tuple[float, float]:
        import time

        ids = self.tokenizer.encode("This blender is loud, but it crushes ice in seconds.", add_special_tokens=False)
        t = time.perf_counter()
        state, tok = self.decoder.start(ids)
        for _ in range(3):
            state, tok = self.decoder.step(state, tok)
        dt = time.perf_counter() - t
        return dt, dt

    def info(self) -> dict:
        return {"workload": self.workload, "model": str(self.bundle.name), "runtime": getattr(self.runner, "runtime", "?"),
                "decoder": self.decoder.kind}
