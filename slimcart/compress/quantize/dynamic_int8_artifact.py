"""Saved format "torch-dynamic-int8": a model whose GRU / LSTM / Linear layers run PyTorch's dynamic
int8 kernels (dynamic_int8.py), without pickling a quantized module, and the `torch_dynamic_int8`
step that produces it.

    folder/
      slimcart-format.json        {"format": "torch-dynamic-int8", "modules": {name: description},
                                   "stand_ins": [{"file", "key", "shape"}], "model_dir": "model"}
      dynamic_int8.safetensors    each module's int8 codes, scales, zero points and float biases,
                                  keyed "<module name>/<tensor name>"
      model/                      what the model was before this step would save as (the workload's
                                  folder, or an earlier step's format, e.g. embeddings-compressed),
                                  less the quantized layers' weights

Saving: each int8 module is swapped for an all-zero float module of its shape while the inner format
(or `workload.save_model`) writes model/, then those zero tensors are removed from model/'s
safetensors files, so the folder holds the int8 bytes only. Loading: the zeros are put back in a
temporary copy, the inner format loads it (`contracts.load_saved`), and the int8 modules, rebuilt from
their tensors, replace the float ones. Like embeddings-compressed, this assumes the inner folder keeps
tensors in safetensors files keyed by module path; anything else is refused with one clear error.
"""
from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Literal

from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn

from ...arch import LayerSelect
from ...contracts import Artifact, inside, load_saved, register_artifact, write_format
from ...errors import SlimcartError
from ...outputs import copy_files
from ...recipe import Step, register_step
from .. import stand_ins as stand_in_files
from .dynamic_int8 import (
    FLOAT_TYPES,
    float_stand_in,
    kind_of,
    module_from_state,
    module_state,
    quantize_module,
)

QUANT_FILE = "dynamic_int8.safetensors"


def _swap(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    for name, m in modules.items():
        model.set_submodule(name, m)


@register_artifact
class DynamicInt8Artifact(Artifact):
    """The model with dynamic int8 layers: the inner format's folder plus the int8 layers' tensors.
    Not `in_torch`: later steps cannot train or export int8 modules, so the step must come last."""

    format = "torch-dynamic-int8"
    in_torch = False
    runtime = "torch"

    def __init__(self, inner: Artifact | None = None):
        self.inner = inner

    def save(self, folder: Path, workload, bundle) -> None:
        folder = Path(folder)
        quant = {n: m for n, m in bundle.module.named_modules() if kind_of(m)}
        if not quant:
            raise SlimcartError("torch-dynamic-int8: the model has no dynamic int8 layer")
        stand = {n: float_stand_in(m) for n, m in quant.items()}
        try:
            _swap(bundle.module, stand)
            if self.inner is None:
                workload.save_model(bundle, folder / "model")
            else:
                self.inner.save(folder / "model", workload, bundle)
        finally:
            _swap(bundle.module, quant)
        shapes = {n: {p: tuple(t.shape) for p, t in m.named_parameters()} for n, m in stand.items()}
        stand_ins = stand_in_files.strip(folder / "model", shapes, "an int8 layer")
        tensors, described = {}, {}
        for name, m in quant.items():
            ts, meta = module_state(m)
            tensors.update({f"{name}/{k}": v for k, v in ts.items()})
            described[name] = meta
        save_file(tensors, str(folder / QUANT_FILE))
        write_format(folder, self.format, modules=described, stand_ins=stand_ins, model_dir="model")

    @classmethod
    def load(cls, folder: Path, meta: dict, workload, threads: int):
        folder = Path(folder)
        modules, stand_ins = meta.get("modules"), meta.get("stand_ins")
        if not isinstance(modules, dict) or not modules or not isinstance(stand_ins, list):
            raise SlimcartError(f"{folder}: torch-dynamic-int8 format file lacks its modules or stand-ins")
        model_dir = inside(folder, meta.get("model_dir", "model"), "model folder")
        if not model_dir.is_dir():
            raise SlimcartError(f"{folder}: no model folder '{model_dir.name}'")
        saved = load_file(str(inside(folder, QUANT_FILE, "int8 tensors file")))
        built = {name: module_from_state({k[len(name) + 1:]: v for k, v in saved.items() if k.startswith(name + "/")}, desc)
                 for name, desc in modules.items()}
        shapes = {n: {p: tuple(t.shape) for p, t in float_stand_in(m).named_parameters()} for n, m in built.items()}
        with tempfile.TemporaryDirectory(prefix="slimcart-int8-load-") as tmp:
            work = Path(tmp) / "model"
            copy_files(model_dir, work)  # regular files only: links in a model folder are never followed
            stand_in_files.restore(work, stand_ins, shapes, folder, "an int8 layer")
            _, bundle = load_saved(work, workload, threads)
        for name, m in built.items():
            try:
                old = bundle.module.get_submodule(name)
            except AttributeError:
                raise SlimcartError(f"{folder}: the model has no layer '{name}' to hold int8 weights") from None
            if type(old) is not type(float_stand_in(m)):
                raise SlimcartError(f"{folder}: layer '{name}' is a {type(old).__name__}, the int8 weights are a {modules[name]['type']}")
            bundle.module.set_submodule(name, m)
        bundle.module.eval()
        bundle = replace(bundle, source=folder, name=str(folder))
        return workload.torch_runner(bundle), bundle

    def describe(self) -> str:
        return "torch dynamic int8 layers" + (f" + {self.inner.describe()}" if self.inner is not None else "")


# ---------------------------------------------------------------- the step
@register_step
class TorchDynamicInt8(LayerSelect, Step):
    """int8 GRU / LSTM (and optionally Linear) layers on PyTorch's dynamic quantized kernels (FBGEMM);
    weights int8 per output row, activations quantized per call. Must be the recipe's last step."""

    kind: Literal["torch_dynamic_int8"] = "torch_dynamic_int8"
    layers: list[Literal["gru", "lstm", "linear"]] = Field(default_factory=lambda: ["gru", "lstm"])
    per_channel: bool = True  # one scale per output row (False: one per weight matrix)
    min_features: int = Field(1, ge=1)  # Linear layers with fewer outputs stay float (a 1-output head gains nothing)

    def apply(self, state, ctx):
        module = state.torch_module(self.kind)
        if ctx.later_steps:
            raise SlimcartError(f"torch_dynamic_int8 must be the recipe's last step (found {', '.join(ctx.later_steps)} "
                                "after it): its int8 modules can no longer be trained, pruned or exported")
        chosen = {n: m for n, m in self.pick(module, tuple(FLOAT_TYPES[k] for k in self.layers)).items()
                  if not isinstance(m, nn.Linear) or m.out_features >= self.min_features}
        if not chosen:
            raise SlimcartError(f"torch_dynamic_int8: no {'/'.join(self.layers)} layer matches targets {self.targets} "
                                f"(exclude {self.exclude})")
        built = {name: quantize_module(m, self.per_channel) for name, m in chosen.items()}  # all built before any swap
        before = sum(p.numel() * p.element_size() for m in chosen.values() for p in m.parameters())
        for name, q in built.items():
            module.set_submodule(name, q)
        after = sum(t.numel() * t.element_size() for q in built.values() for t in module_state(q)[0].values())
        kinds = sorted({kind_of(q) for q in built.values()})
        state.kernels.append(f"torch dynamic int8 {'/'.join(kinds).upper()} (FBGEMM int8 GEMM, activations quantized "
                             f"per call, weights per {'row' if self.per_channel else 'tensor'})")
        state.notes.append(f"dynamic int8: {len(built)} layer(s) ({', '.join(built)}): {before / 1e6:.3f} -> "
                           f"{after / 1e6:.3f} MB of weights")
        state.reports[self.kind] = {"layers": list(built), "bytes_before": before, "bytes_after": after}
        state.artifact = DynamicInt8Artifact(state.artifact)
        return state
