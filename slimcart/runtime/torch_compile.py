"""torch.compile (Inductor) with optional bf16 autocast: a no-quantization speed baseline for the int8
recipes. The weights are saved fp32 (the workload's folder); the model is compiled when it is loaded,
so the first calls of a session pay the compile time (the timing harness's warm-up absorbs it)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from ..arch import output_tensor
from ..contracts import Artifact, ModelBundle, register_artifact, write_format
from ..recipe import Step, register_step


class CompiledTorchRunner:
    """`torch.compile(module, dynamic=True)` under inference mode, optionally in bf16 autocast."""

    def __init__(self, module: torch.nn.Module, bf16: bool = True):
        self.module, self.bf16 = module.eval(), bf16
        self.runtime = "torch-compile-bf16" if bf16 else "torch-compile"
        self.compiled = torch.compile(self.module, dynamic=True)

    def __call__(self, batch: dict[str, Any]):
        feeds = {k: torch.as_tensor(v) for k, v in batch.items() if k != "labels"}
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return output_tensor(self.compiled(**feeds)).detach().float().numpy()


@register_artifact
class CompiledFolder(Artifact):
    """The workload's folder, marked to run under torch.compile when loaded."""

    format = "torch-compile"
    in_torch = True

    def __init__(self, bf16: bool):
        self.bf16 = bf16
        self.runtime = "torch-compile-bf16" if bf16 else "torch-compile"

    def save(self, folder: Path, workload, bundle: ModelBundle) -> None:
        workload.save_model(bundle, folder)
        write_format(folder, self.format, bf16=self.bf16)

    @classmethod
    def load(cls, folder: Path, meta: dict, workload, threads: int):
        bundle = workload.load_model(str(folder))
        return CompiledTorchRunner(bundle.module, bool(meta.get("bf16", True))), bundle


@register_step
class TorchCompile(Step):
    """Mark the model to run under torch.compile (bf16 autocast by default) when loaded."""

    kind: Literal["torch_compile"] = "torch_compile"
    workloads = ("search",)  # the compiled runner runs plain forwards; decoding requests would bypass it
    bf16: bool = True

    def apply(self, state, ctx):
        state.torch_module(self.kind)
        state.artifact = CompiledFolder(self.bf16)
        state.kernels.append("torch.compile (Inductor)" + (" with bf16 autocast (AVX512-BF16)" if self.bf16 else ""))
        return state
