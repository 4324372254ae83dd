"""PyTorch eager runner, plus steps that stay in PyTorch (bf16 weights)."""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from ..recipe import Step, register_step


def _to_numpy(out: Any) -> np.ndarray:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if hasattr(out, "logits"):
        out = out.logits
    return out.detach().float().numpy()


class TorchRunner:
    """Runs `module(**batch)` under inference mode; batch values are numpy arrays or tensors."""

    runtime = "torch"

    def __init__(self, module: torch.nn.Module, autocast_bf16: bool = False):
        self.module = module.eval()
        self.autocast_bf16 = autocast_bf16
        if autocast_bf16:
            self.runtime = "torch-bf16"

    def __call__(self, batch: dict[str, Any]) -> np.ndarray:
        feeds = {k: torch.as_tensor(v) for k, v in batch.items()}
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast_bf16):
            return _to_numpy(self.module(**feeds))


@register_step
class TorchBf16(Step):
    """Cast weights to bfloat16 (oneDNN runs bf16 Linear with AVX512-BF16/AMX where present)."""

    kind: Literal["torch_bf16"] = "torch_bf16"

    def apply(self, state, ctx):
        state.bundle.module = state.bundle.module.to(torch.bfloat16)
        state.kernels.append("torch bf16 (oneDNN)")
        return state
