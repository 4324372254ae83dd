"""torch.compile (Inductor) with optional bf16 autocast: a no-quantization speed baseline for the int8
recipes. The weights are saved fp32 (the workload's folder); the model is compiled when it is loaded,
so the first calls of a session pay the compile time (the timing harness's warm-up absorbs it)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from ..arch import output_tensor
from ..contracts import (
    ARTIFACTS,
    Artifact,
    ModelBundle,
    read_format,
    register_artifact,
    write_format,
)
from ..errors import SlimcartError
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
    """The model saved as the step before left it (the workload's folder, or an in-torch format such as
    a structurally pruned folder whose shapes only slimcart restores), marked to run under torch.compile."""

    format = "torch-compile"
    in_torch = True

    def __init__(self, bf16: bool, inner: Artifact | None = None):
        self.bf16, self.inner = bf16, inner
        self.runtime = "torch-compile-bf16" if bf16 else "torch-compile"

    def save(self, folder: Path, workload, bundle: ModelBundle) -> None:
        if self.inner is None:
            workload.save_model(bundle, folder)
            write_format(folder, self.format, bf16=self.bf16)
            return
        self.inner.save(folder, workload, bundle)
        write_format(folder, self.format, bf16=self.bf16, inner=read_format(folder))

    @classmethod
    def load(cls, folder: Path, meta: dict, workload, threads: int):
        inner = meta.get("inner")
        if inner is None:
            bundle = workload.load_model(str(folder))
        else:
            inner_cls = ARTIFACTS.get(inner.get("format")) if isinstance(inner, dict) else None
            if inner_cls is None or not inner_cls.in_torch or inner_cls is cls:
                raise SlimcartError(f"{folder}: 'inner' in the torch-compile format file must name a PyTorch format")
            _, bundle = inner_cls.load(Path(folder), inner, workload, threads)
        return CompiledTorchRunner(bundle.module, bool(meta.get("bf16", True))), bundle


@register_step
class TorchCompile(Step):
    """Mark the model to run under torch.compile (bf16 autocast by default) when loaded."""

    kind: Literal["torch_compile"] = "torch_compile"
    workloads = ("search",)  # the compiled runner runs plain forwards; decoding requests would bypass it
    bf16: bool = True

    def apply(self, state, ctx):
        state.torch_module(self.kind)  # refuses a model already exported
        inner = state.artifact.inner if isinstance(state.artifact, CompiledFolder) else state.artifact
        state.artifact = CompiledFolder(self.bf16, inner)
        state.kernels.append("torch.compile (Inductor)" + (" with bf16 autocast (AVX512-BF16)" if self.bf16 else ""))
        return state
