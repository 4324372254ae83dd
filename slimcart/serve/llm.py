"""Small LLM over HTTP: `POST /generate` (prompt -> greedy continuation), streamed token by token
as server-sent events when `"stream": true`.

Decoding is greedy like the llm workload's runner. With the PyTorch model at hand, each step feeds
one token and reuses the KV cache (`KVCacheDecoder`); a model that only exposes a logits runner
(e.g. an exported graph) is decoded by recomputing the whole sequence each step
(`RecomputeDecoder`: same tokens, quadratic cost, said so in /ready).
"""
from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import Field, StringConstraints, create_model

from .servable import Endpoint, Limits, Prepared, RequestError, Servable, Strict, register_servable


class KVCacheDecoder:
    kind = "kv-cache"

    def __init__(self, hf_model: Any, tokenizer: Any):
        import inspect

        self.model, self.tokenizer = hf_model.eval(), tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        params = inspect.signature(hf_model.forward).parameters
        # transformers 5 renamed `past_key_values` to `cache`; older releases only know the first.
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        # Only the last position's logits are needed: skips a (prompt x vocab) matrix at prefill.
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def _forward(self, ids: list[int], cache: Any) -> tuple[Any, int]:
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=True,
                             **{self.cache_arg: cache}, **self.extra)
        return getattr(out, self.cache_arg), int(out.logits[0, -1].argmax())

    def start(self, prompt_ids: list[int]) -> tuple[Any, int]:
        return self._forward(prompt_ids, None)

    def step(self, cache: Any, token: int) -> tuple[Any, int]:
        return self._forward([token], cache)

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
