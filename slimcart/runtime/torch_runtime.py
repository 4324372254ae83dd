"""PyTorch eager: the runners workloads wrap their torch modules in, the workload-folder format, and
steps that stay in PyTorch (bf16 weights)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..arch import output_tensor
from ..contracts import Artifact, ModelBundle, register_artifact
from ..recipe import Step, register_step


class TorchRunner:
    """Runs `module(**batch)` under inference mode; batch values are numpy arrays or tensors.
    Keys that are not model inputs (`labels`) are left out."""

    runtime = "torch"

    def __init__(self, module: torch.nn.Module, autocast_bf16: bool = False):
        self.module = module.eval()
        self.autocast_bf16 = autocast_bf16
        if autocast_bf16:
            self.runtime = "torch-bf16"

    def __call__(self, batch: dict[str, Any]) -> np.ndarray:
        feeds = {k: torch.as_tensor(v) for k, v in batch.items() if k != "labels"}
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast_bf16):
            return output_tensor(self.module(**feeds)).detach().float().numpy()


class CausalLMRunner:
    """A causal LM (`module.model` a Hugging Face *ForCausalLM): logits for plain batches, greedy
    KV-cached decoding when the batch asks for `max_new_tokens`."""

    runtime = "torch"

    def __init__(self, module: torch.nn.Module, pad_token_id: int | None = None):
        self.module = module.eval()
        self.pad_token_id = pad_token_id

    def __call__(self, batch: dict[str, Any]) -> np.ndarray:
        ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
        with torch.inference_mode():
            if "max_new_tokens" not in batch:
                return self.module(ids).detach().float().numpy()
            n = int(batch["max_new_tokens"])
            # min_new_tokens = max_new_tokens: EOS cannot end a request early, so every request
            # decodes exactly n tokens and tokens/s counts real work.
            out = self.module.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=n, min_new_tokens=n, pad_token_id=self.pad_token_id,
            )
            return out[:, ids.shape[1]:].numpy()


@register_artifact
class WorkloadFolder(Artifact):
    """The workload's own folder of the in-memory torch model (an HF / safetensors folder): what a
    model is saved as when no step turned it into another format."""

    format = ""
    in_torch = True

    def save(self, folder: Path, workload, bundle: ModelBundle) -> None:
        workload.save_model(bundle, folder)

    @classmethod
    def load(cls, folder: Path, meta: dict, workload, threads: int):
        bundle = workload.load_model(str(folder))
        return workload.torch_runner(bundle), bundle


@register_step
class TorchBf16(Step):
    """Cast weights to bfloat16 (oneDNN runs bf16 Linear with AVX512-BF16/AMX where present)."""

    kind: Literal["torch_bf16"] = "torch_bf16"

    def apply(self, state, ctx):
        state.bundle.module = state.torch_module(self.kind).to(torch.bfloat16)
        state.kernels.append("torch bf16 (oneDNN)")
        return state
