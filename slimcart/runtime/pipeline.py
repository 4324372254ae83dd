"""Model parallelism: a Llama-style decoder split by layers across two processes (pipeline stages) on
torch.distributed (gloo on CPU), for a model larger than one worker's memory budget.

Stage 0 (this process) holds the token embedding and layers [0, k); stage 1 (a child process) holds
layers [k, L), the final norm and the LM head. Each stage reads only its own tensors from the
safetensors files and keeps its own KV cache, so a stage needs its share of the layers plus the
embedding table. Per forward, stage 0 sends its hidden states [b, t, H] to stage 1, which returns
logits (scoring) or the greedy next token (decoding: then one token's hidden state per step crosses).

When it pays: only when the model does not fit one worker. A model that fits is faster as data-parallel
replicas (no per-token hop between processes, each replica decodes on its own); see docs/parallelism.md.
"""
from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import hf
from ..errors import SlimcartError

HEADER = 4  # [mode (0 logits, 1 generate, -1 stop), batch, tokens, new tokens]


def load_stage(folder: Path, start: int, end: int, first: bool, last: bool) -> torch.nn.Module:
    """A *ForCausalLM holding decoder layers [start, end) of the model in `folder` (renumbered from 0),
    with the embedding on the first stage and the final norm + LM head on the last. Only this stage's
    tensors are read from disk."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    cfg = hf.load("AutoConfig", folder)
    total = cfg.num_hidden_layers
    if not 0 <= start < end <= total:
        raise SlimcartError(f"stage layers [{start}, {end}) do not fit a {total}-layer model")
    cfg.num_hidden_layers = end - start
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[start:end]
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    layer = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
    state = {}
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise SlimcartError(f"{folder} has no safetensors weights to split into pipeline stages")
    for f in files:
        with safe_open(str(f), "pt") as sf:
            for key in sf.keys():
                m = layer.match(key)
                if m and start <= int(m[1]) < end:
                    state[f"model.layers.{int(m[1]) - start}.{m[2]}"] = sf.get_tensor(key)
                elif key.startswith("model.embed_tokens.") and (first or (last and tied)):
                    state[key] = sf.get_tensor(key)
                elif last and (key.startswith("model.norm.") or key.startswith("lm_head.")):
                    state[key] = sf.get_tensor(key)
    missing, _ = model.load_state_dict(state, strict=False)
    needed = [k for k in missing if k.startswith("model.layers.") or (first and "embed_tokens" in k)
              or (last and (k.startswith("model.norm.") or (k.startswith("lm_head.") and not tied)))]
    if needed:
        raise SlimcartError(f"{folder}: weights missing for pipeline stage [{start}, {end}): {needed[:3]}")
    if last and tied:
        model.tie_weights()
    if not last:
        model.model.norm = torch.nn.Identity()  # stage 0 hands on the residual stream, not normalized states
    return model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stage1(folder: str, split: int, total: int, port: int, threads: int) -> None:
    """Child process: the last stage, serving requests from stage 0 until told to stop."""
    import torch.distributed as dist
    from transformers import DynamicCache

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=1, world_size=2)
    model = load_stage(Path(folder), split, total, first=False, last=True)
    hidden = model.config.hidden_size
    try:
        while True:
            head = torch.zeros(HEADER, dtype=torch.long)
            dist.recv(head, src=0)
            mode, b, t, n = head.tolist()
            if mode < 0:
                return
            cache = DynamicCache()
            with torch.inference_mode():
                for step in range(max(n, 1)):
                    h = torch.zeros(b, t if step == 0 else 1, hidden)
                    dist.recv(h, src=0)
                    logits = model(inputs_embeds=h, cache=cache, use_cache=True).logits.float()
                    if mode == 0:
                        dist.send(logits.contiguous(), dst=0)
                    else:
                        dist.send(logits[:, -1].argmax(-1).contiguous(), dst=0)
    finally:
        dist.destroy_process_group()


class PipelineRunner:
    """Runner over two pipeline stages: logits for `{"input_ids"}`, greedy decoding with `max_new_tokens`
    (the same request interface as the single-process causal-LM runner)."""

    runtime = "torch-pipeline-2"

    def __init__(self, folder: Path, threads: int, split: int | None = None):
        import torch.distributed as dist
        import torch.multiprocessing as mp

        if dist.is_initialized():
            raise SlimcartError("a torch.distributed group is already running in this process")
        cfg = json.loads((Path(folder) / "config.json").read_text())
        self.total, self.vocab = int(cfg["num_hidden_layers"]), int(cfg["vocab_size"])
        self.split = split if split is not None else self.total // 2
        port = _free_port()
        self.child = mp.get_context("spawn").Process(target=_stage1, args=(str(folder), self.split, self.total, port, threads),
                                                     daemon=True)
        self.child.start()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2)
        self.stage0 = load_stage(Path(folder), 0, self.split, first=True, last=False)
        self.dist = dist

    def _stage0(self, ids: torch.Tensor, cache) -> torch.Tensor:
        return self.stage0.model(input_ids=ids, cache=cache, use_cache=True).last_hidden_state.float().contiguous()

    def __call__(self, batch: dict[str, Any]) -> np.ndarray:
        from transformers import DynamicCache

        ids = torch.as_tensor(np.asarray(batch["input_ids"]), dtype=torch.long)
        n = int(batch.get("max_new_tokens", 0))
        b, t = ids.shape
        self.dist.send(torch.tensor([1 if n else 0, b, t, n]), dst=1)
        cache = DynamicCache()
        with torch.inference_mode():
            self.dist.send(self._stage0(ids, cache), dst=1)
            if not n:
                logits = torch.zeros(b, t, self.vocab)
                self.dist.recv(logits, src=1)
                return logits.numpy()
            out = []
            for step in range(n):
                nxt = torch.zeros(b, dtype=torch.long)
                self.dist.recv(nxt, src=1)
                out.append(nxt[:, None])
                if step + 1 < n:
                    self.dist.send(self._stage0(nxt[:, None], cache), dst=1)
        return torch.cat(out, 1).numpy()

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.send(torch.tensor([-1, 0, 0, 0]), dst=1)
            self.child.join(timeout=30)
            self.dist.destroy_process_group()

    def __del__(self):  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
