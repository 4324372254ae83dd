"""Dynamic int8 Linear layers in PyTorch (FBGEMM's `quantized::linear_dynamic`), composable with
anything else that stays in PyTorch (e.g. compressed embedding tables).

    W_c ~= s_c q_c,  q_c = round(W_c / s_c) in [-127, 127],  s_c = max_j |W_cj| / 127   (per output channel)
    y = x W^T + b:   per call x is quantized to uint8 with its own min/max (dynamic: no calibration),
                     the int8 x int8 -> int32 GEMM runs in FBGEMM (AVX2 / AVX-512 VNNI), then rescaled.

`reduce_range` quantizes activations to 7 bits, as PyTorch's own x86 dynamic config does: without
VNNI, FBGEMM's u8 x s8 multiply-add can saturate at 16 bits.

Saved format "torch-dynamic-int8": the previous form of the model (its artifact, or the workload's own
folder) saved under `inner/` with zero float weights standing in for the int8 layers, those zero
tensors then removed from its safetensors files, and the int8 weights + scales in `linear_int8.safetensors`.
Loading restores the zero tensors in a temporary copy, loads `inner/` by its own format, and swaps the
int8 layers back in. Why this route rather than ONNX Runtime for a DIN's MLP: the row-wise int4 tables
run on FBGEMM's fused lookups inside PyTorch; the MLP's int8 kernel here joins them in the same
module without a second runtime or rewriting the tables as ONNX graph nodes.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ...arch import LayerSelect
from ...contracts import (
    Artifact,
    inside,
    load_saved,
    register_artifact,
    saved_format,
    write_format,
)
from ...errors import SlimcartError
from ...outputs import copy_files
from ...recipe import Step, register_step

INT8_FILE = "linear_int8.safetensors"


class DynamicInt8Linear(nn.Module):
    """nn.Linear with int8 per-channel weights, run by FBGEMM's dynamic int8 GEMM."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, reduce_range: bool = True):
        super().__init__()
        if q.dtype != torch.int8 or q.dim() != 2 or scales.shape != (q.shape[0],):
            raise SlimcartError("int8 linear: weights must be int8 [out, in] with one scale per output")
        self.out_features, self.in_features = q.shape
        self.reduce_range = bool(reduce_range)
        with warnings.catch_warnings():  # torch 2.13 marks quantized-tensor creation deprecated (pytorch#184982);
            warnings.simplefilter("ignore", UserWarning)  # the prepack op still needs one, and the kernel is current
            qw = torch._make_per_channel_quantized_tensor(q, scales.double(), torch.zeros(len(scales), dtype=torch.long), 0)
        # The prepacked weights are the only copy kept (FBGEMM's blocked layout); saving unpacks them.
        self._packed = torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.float().contiguous())

    @classmethod
    def from_linear(cls, lin: nn.Linear, reduce_range: bool = True) -> DynamicInt8Linear:
        w = lin.weight.detach().float()
        scales = (w.abs().amax(1) / 127).clamp_min(1e-12)
        q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(q, scales, None if lin.bias is None else lin.bias.detach(), reduce_range)

    def int8_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(int8 weights, per-channel scales float32, bias or None)."""
        qw, bias = torch.ops.quantized.linear_unpack(self._packed)
        return qw.int_repr(), qw.q_per_channel_scales().float(), bias

    def nbytes(self) -> int:
        q, s, b = self.int8_state()
        return q.numel() + 4 * s.numel() + (0 if b is None else 4 * b.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self._packed, self.reduce_range)

    def __deepcopy__(self, memo) -> DynamicInt8Linear:  # the packed weights are an opaque kernel object
        q, scales, bias = self.int8_state()
        return DynamicInt8Linear(q.clone(), scales.clone(), None if bias is None else bias.clone(), self.reduce_range)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel, reduce_range={self.reduce_range}"


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def int8_linears(model: nn.Module) -> dict[str, DynamicInt8Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DynamicInt8Linear)}


@register_step
class TorchDynamicInt8(LayerSelect, Step):
    """nn.Linear layers to FBGEMM dynamic int8 (per-channel weights), the model staying in PyTorch."""

    kind: Literal["torch_dynamic_int8"] = "torch_dynamic_int8"
    reduce_range: bool = True
    min_features: int = Field(1, ge=1)  # layers with fewer outputs stay float (a 1-output head gains nothing)

    def apply(self, state, ctx):
        module = state.torch_module(self.kind)
        chosen = {n: m for n, m in self.pick(module).items() if m.out_features >= self.min_features}
        if not chosen:
            raise SlimcartError("torch_dynamic_int8: no nn.Linear layer matches targets / exclude")
        state.keep_teacher(ctx)
        for name, lin in chosen.items():
            _swap(module, name, DynamicInt8Linear.from_linear(lin, self.reduce_range))
        state.kernels.append(f"FBGEMM dynamic int8 linear (quantized::linear_dynamic) on {len(chosen)} layers")
        state.notes.append(f"dynamic int8 Linear layers (per-channel weights, activations per call): {', '.join(chosen)}")
        state.reports[self.kind] = {"layers": list(chosen), "reduce_range": self.reduce_range}
        state.artifact = TorchInt8Linears(state.artifact)
        return state


@register_artifact
class TorchInt8Linears(Artifact):
    """The model's previous saved form under inner/, plus its int8 Linear layers."""

    format = "torch-dynamic-int8"
    in_torch = True
    runtime = "torch"

    def __init__(self, inner: Artifact | None = None):
        self.inner = inner

    def save(self, folder: Path, workload, bundle) -> None:
        folder = Path(folder)
        layers = int8_linears(bundle.module)
        if not layers:
            raise SlimcartError("torch-dynamic-int8: the model has no int8 Linear layer")
        inner, tensors, described = folder / "inner", {}, {}
        try:
            for name, lin in layers.items():
                q, scales, bias = lin.int8_state()
                tensors[f"{name}/weight_int8"], tensors[f"{name}/scales"] = q.contiguous(), scales.contiguous()
                stand_in = nn.Linear(lin.in_features, lin.out_features, bias=bias is not None)
                with torch.no_grad():
                    stand_in.weight.zero_()
                    if bias is not None:
                        stand_in.bias.copy_(bias)
                _swap(bundle.module, name, stand_in)
                described[name] = {"in": lin.in_features, "out": lin.out_features, "reduce_range": lin.reduce_range}
            if self.inner is None:
                workload.save_model(bundle, inner)
            else:
                inner.mkdir(parents=True, exist_ok=True)
                self.inner.save(inner, workload, bundle)
        finally:
            for name, lin in layers.items():
                _swap(bundle.module, name, lin)
        stand_ins = _strip(inner, {f"{n}.weight": (d["out"], d["in"]) for n, d in described.items()})
        save_file(tensors, str(folder / INT8_FILE))
        write_format(folder, self.format, layers=described, stand_ins=stand_ins, inner="inner")

    @classmethod
    def load(cls, folder: Path, meta: dict, workload, threads: int):
        folder = Path(folder)
        layers, stand_ins = meta.get("layers"), meta.get("stand_ins")
        if not isinstance(layers, dict) or not layers or not isinstance(stand_ins, list):
            raise SlimcartError(f"{folder}: torch-dynamic-int8 format file lacks its layers or stand-ins")
        inner = inside(folder, meta.get("inner", "inner"), "inner model folder")
        saved = load_file(str(inside(folder, INT8_FILE, "int8 weights file")))
        with tempfile.TemporaryDirectory(prefix="slimcart-int8-load-") as tmp:
            work = Path(tmp) / "inner"
            copy_files(inner, work)  # regular files only: links are never followed
            _restore(work, stand_ins, layers, folder)
            saved_format(work)  # a folder of an unknown format fails here, with its name
            _, bundle = load_saved(work, workload, threads)
        for name, d in layers.items():
            old = bundle.module.get_submodule(name)
            q, scales = saved.get(f"{name}/weight_int8"), saved.get(f"{name}/scales")
            if not isinstance(old, nn.Linear) or q is None or scales is None or tuple(q.shape) != (d["out"], d["in"]):
                raise SlimcartError(f"{folder}: int8 layer '{name}' does not match the saved model")
            _swap(bundle.module, name, DynamicInt8Linear(q, scales, None if old.bias is None else old.bias.detach(),
                                                         bool(d.get("reduce_range", True))))
        bundle = replace(bundle, source=folder, name=str(folder))
        return workload.torch_runner(bundle), bundle

    def describe(self) -> str:
        return "int8 Linear layers + " + (self.inner.describe() if self.inner is not None else "workload folder")


def _strip(folder: Path, shapes: dict[str, tuple[int, int]]) -> list[dict]:
    """Remove the zero stand-in weights (keys ending in '<layer>.weight' of the layer's shape) from every
    safetensors file under `folder`; returns where each one was."""
    found, left = [], set(shapes)
    for f in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            meta = sf.metadata()
            drop = {k: n for k in sf.keys() for n in shapes if (k == n or k.endswith("." + n))
                    and tuple(sf.get_slice(k).get_shape()) == shapes[n]}
        if not drop:
            continue
        kept = load_file(str(f))
        for k, n in drop.items():
            if bool(kept[k].any()):
                raise SlimcartError(f"{f.name}: '{k}' is not the zero stand-in of an int8 layer")
            found.append({"file": str(f.relative_to(folder)), "key": k, "shape": list(kept.pop(k).shape)})
            left.discard(n)
        save_file({k: v.contiguous() for k, v in kept.items()}, str(f.with_suffix(".tmp")), metadata=meta)
        os.replace(f.with_suffix(".tmp"), f)
    if left:
        raise SlimcartError(f"the saved model keeps {sorted(left)} where the torch-dynamic-int8 format cannot find them "
                            "(it needs safetensors keyed by module name)")
    return found


def _restore(work: Path, stand_ins: list, layers: dict, folder: Path) -> None:
    """Put the zero stand-ins back into the copied files so the inner format loads as saved."""
    by_file: dict[str, list[dict]] = {}
    for s in stand_ins:
        if not isinstance(s, dict) or not isinstance(s.get("key"), str) or not isinstance(s.get("shape"), list):
            raise SlimcartError(f"{folder}: a stand-in entry in the format file is malformed")
        layer = next((n for n in layers if s["key"] == f"{n}.weight" or s["key"].endswith(f".{n}.weight")), None)
        if layer is None or [int(x) for x in s["shape"]] != [layers[layer]["out"], layers[layer]["in"]]:
            raise SlimcartError(f"{folder}: stand-in {s['key']} does not match an int8 layer's shape")
        by_file.setdefault(s.get("file"), []).append(s)
    for rel, entries in by_file.items():
        f = inside(work, rel, "stand-in file")
        with safe_open(str(f), "pt") as sf:
            meta = sf.metadata()
        state = load_file(str(f))
        state.update({s["key"]: torch.zeros(*[int(x) for x in s["shape"]]) for s in entries})
        save_file(state, str(f.with_suffix(".tmp")), metadata=meta)
        os.replace(f.with_suffix(".tmp"), f)
