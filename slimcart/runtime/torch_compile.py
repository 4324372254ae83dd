"""torch.compile (Inductor) with optional bf16 autocast: a no-quantization speed baseline for the int8
recipes. The weights are saved fp32 (an HF folder); the model is compiled when it is loaded, so the
first calls of a session pay the compile time (the timing harness's warm-up absorbs it)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import SlimcartError
from ..formats import register_format, write_format
from ..recipe import Step, register_step
from .torch_runtime import _to_numpy

FORMAT = "torch-compile"


class CompiledTorchRunner:
    """`torch.compile(module, dynamic=True)` under inference mode, optionally in bf16 autocast."""

    def __init__(self, module: torch.nn.Module, bf16: bool = True):
        self.module, self.bf16 = module.eval(), bf16
        self.runtime = "torch-compile-bf16" if bf16 else "torch-compile"
        self.compiled = torch.compile(self.module, dynamic=True)

    def __call__(self, batch: dict[str, Any]):
        feeds = {k: torch.as_tensor(v) for k, v in batch.items()}
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return _to_numpy(self.compiled(**feeds))


@register_step
class TorchCompile(Step):
    """Mark the model to run under torch.compile (bf16 autocast by default) when loaded."""

    kind: Literal["torch_compile"] = "torch_compile"
    workloads = ("search",)
    bf16: bool = True

    def apply(self, state, ctx):
        if state.runtime != "torch":
            raise SlimcartError("torch_compile runs the PyTorch model: it cannot follow an ONNX / OpenVINO step")
        wl, bundle, bf16 = ctx.workload, state.bundle, self.bf16

        def saver(folder: Path) -> None:
            wl.save_model(bundle, folder)
            write_format(folder, FORMAT, bf16=bf16)

        state.saver = saver
        state.runtime = "torch-compile-bf16" if bf16 else "torch-compile"
        state.kernels.append("torch.compile (Inductor)" + (" with bf16 autocast (AVX512-BF16)" if bf16 else ""))
        return state


@register_format(FORMAT)
def load_compiled(workload, folder: Path, meta: dict):
    """Reload the HF folder with the workload's own loader and wrap it in a compiled runner."""
    bundle = workload.load_model(str(folder))
    return CompiledTorchRunner(bundle.module, bool(meta.get("bf16", True))), bundle
