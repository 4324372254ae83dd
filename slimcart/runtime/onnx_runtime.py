"""ONNX export and ONNX Runtime execution, and the ORT int8 steps.

Export uses the TorchScript-based exporter (`dynamo=False`) with eager attention because ORT's
transformer fusions (Attention, SkipLayerNorm, BiasGelu) only recognise that graph shape.

A workload's `export_spec` may name the module to export (`module`, e.g. the bare transformer whose
`last_hidden_state` the ecosystem's loaders expect) and where the saved file goes (`layout`, e.g.
{"onnx": "onnx/model.onnx"}, the sentence-transformers / Optimum place); its `load_companions` may
put a `postprocess(batch, outputs)` into `bundle.extra` (e.g. pooling token states into embeddings),
which the runner applies so that timing includes it.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from pydantic import field_validator

from ..contracts import Artifact, ModelBundle, inside, register_artifact, write_format
from ..errors import SlimcartError
from ..recipe import Step, register_step


class OnnxRunner:
    """Runs an ONNX model with ONNX Runtime on CPU with a fixed thread count and full graph optimisation."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: int, postprocess=None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # No spin-waiting between calls: spinning threads would steal the cores of whatever runs next
        # (the baseline, in an interleaved measurement), flattering ONNX Runtime's ratio.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for corrupt files
            raise SlimcartError(f"cannot load ONNX model {path}: {str(e).splitlines()[0]}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.path, self.postprocess = Path(path), postprocess

    def __call__(self, batch: dict[str, Any]) -> np.ndarray:
        feeds = {k: np.asarray(v) for k, v in batch.items() if k in self.input_names}
        out = self.session.run(None, feeds)[0]
        return out if self.postprocess is None else self.postprocess(batch, out)


def export_onnx(module: torch.nn.Module, example: dict[str, Any], path: Path, dynamic_axes: dict, output_name: str) -> Path:
    """Export `module(**example)` to ONNX with the given dynamic axes; weights in one file.

    The example goes in as keyword arguments, so a model whose forward has optional inputs (DIN's
    `hist` and `dense`) gets each one in its own parameter; graph inputs are ordered as forward()
    declares them, not as the tokenizer returned them."""
    import inspect

    module = module.eval()
    params = list(inspect.signature(module.forward).parameters)
    names = sorted(example, key=lambda k: params.index(k) if k in params else len(params))
    kwargs = {k: torch.as_tensor(example[k]) for k in names}
    with torch.inference_mode():
        torch.onnx.export(
            module,
            (),
            str(path),
            kwargs=kwargs,
            input_names=names,
            output_names=[output_name],
            dynamic_axes=dynamic_axes,
            opset_version=17,
            do_constant_folding=True,
            dynamo=False,
        )
    return path


@register_step
class ExportOnnx(Step):
    """Export the current PyTorch model to ONNX; `optimize` applies ORT's transformer fusions offline."""

    kind: Literal["export_onnx"] = "export_onnx"
    optimize: bool = True

    def apply(self, state, ctx):
        path, fused = export_model(ctx.workload, state.bundle, state.torch_module(self.kind), ctx.workdir, self.optimize,
                                   ctx.progress)
        if fused:
            state.notes.append("ONNX graph fused by onnxruntime.transformers (Attention/SkipLayerNorm/Gelu): "
                               "com.microsoft ops, runs on ONNX Runtime only")
        layout = ctx.workload.export_spec(state.bundle).get("layout", {})
        state.artifact = OnnxFile(path, layout.get("onnx", "model.onnx"))
        return state


def export_model(workload, bundle: ModelBundle, module: torch.nn.Module, workdir: Path, optimize: bool = True,
                 progress=lambda m: None) -> tuple[Path, bool]:
    """workdir/model.onnx of `module` with the workload's export spec; with `optimize`, ONNX Runtime's
    transformer fusions applied offline where the workload names a transformer type. (path, fused)."""
    spec = workload.export_spec(bundle)
    path = Path(workdir) / "model.onnx"
    progress("exporting to ONNX")
    # a workload may export another view of the model (search: the token states, pooled by the runner)
    export_onnx(spec.get("module", module), spec["example"], path,
                spec["dynamic_axes"], spec["output_name"])
    if not (optimize and spec.get("model_type")):
        return path, False
    from onnxruntime.transformers import optimizer

    progress("fusing transformer ops (ORT optimizer)")
    opt = optimizer.optimize_model(str(path), model_type=spec["model_type"], num_heads=spec["num_heads"],
                                   hidden_size=spec["hidden_size"], opt_level=1)
    fused = Path(workdir) / "model.fused.onnx"
    opt.save_model_to_file(str(fused))
    path.unlink()
    fused.rename(path)
    return path, True


@register_step
class OrtDynamicInt8(Step):
    """ONNX Runtime dynamic int8: int8 weights, activations quantized per batch at run time (MatMulInteger)."""

    kind: Literal["ort_dynamic_int8"] = "ort_dynamic_int8"
    per_channel: bool = False
    reduce_range: bool = False
    op_types: list[str] = ["MatMul", "Attention", "EmbedLayerNormalization", "Gather"]

    @field_validator("op_types")
    @classmethod
    def _known_ops(cls, v: list[str]) -> list[str]:
        from onnxruntime.quantization.registry import IntegerOpsRegistry

        unknown = sorted(set(v) - set(IntegerOpsRegistry))
        if unknown or not v:
            raise SlimcartError(f"ort_dynamic_int8: op_types {unknown or v} are not ops ONNX Runtime quantizes dynamically "
                                f"(it does: {', '.join(sorted(IntegerOpsRegistry))})")
        return v

    def apply(self, state, ctx):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        src = onnx_path_of(state, self.kind)
        out = ctx.workdir / "model.int8.onnx"
        ctx.progress("quantizing to dynamic int8 (ONNX Runtime)")
        quantize_dynamic(
            str(src), str(out), weight_type=QuantType.QInt8, per_channel=self.per_channel,
            reduce_range=self.reduce_range, op_types_to_quantize=self.op_types,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        src.unlink()
        out.rename(src)
        quantized = [n.op_type for n in onnx.load(str(src), load_external_data=False).graph.node
                     if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "QAttention", "DynamicQuantizeLinear")]
        if not quantized:
            raise SlimcartError(f"ort_dynamic_int8 quantized nothing: the graph has no {'/'.join(self.op_types)} node ONNX "
                                "Runtime could quantize (the result would be the fp32 model under an int8 label)")
        state.kernels.append("onnxruntime dynamic int8 (MatMulInteger / QAttention, VNNI)")
        return state


def onnx_path_of(state, kind: str) -> Path:
    """The ONNX file a step works on: the current model must have been exported already."""
    if not isinstance(state.artifact, OnnxFile):
        raise SlimcartError(f"'{kind}' needs an ONNX model: put an 'export_onnx' step before it")
    return state.artifact.path


@register_artifact
class OnnxFile(Artifact):
    """An ONNX graph (plus external-data files) at `saved_as` inside the folder (the workload's layout,
    by default `model.onnx`), with the workload's companions (tokenizer, config). The format file says
    where the graph is and which runtimes read it: a graph with ONNX Runtime's own com.microsoft ops
    (the fused Attention, QAttention, ...) is marked ONNX-Runtime-only (OpenVINO rejects some of them)."""

    format = "onnx"
    runtime = "onnxruntime"

    def __init__(self, path: Path, saved_as: str = "model.onnx"):
        self.path, self.saved_as = Path(path), saved_as

    def save(self, folder: Path, workload, bundle: ModelBundle) -> None:
        dest = inside(folder, self.saved_as, "model")
        copy_onnx(self.path, dest.parent, dest.name)
        workload.save_companions(bundle, folder)
        ms_ops = ort_only_ops(self.path)
        write_format(folder, self.format, model=self.saved_as, ort_only_ops=ms_ops,
                     runs_on=["onnxruntime"] if ms_ops else ["onnxruntime", "openvino"])

    @classmethod
    def load(cls, folder: Path, meta: dict, workload, threads: int):
        path = inside(folder, meta.get("model", "model.onnx"), "model")
        if not path.is_file():
            raise SlimcartError(f"{folder} says it holds an ONNX model but {path.name} is missing")
        bundle = workload.load_companions(folder)
        return OnnxRunner(path, threads, bundle.extra.get("postprocess")), bundle

    @classmethod
    def reference(cls, workload, bundle: ModelBundle, workdir: Path, threads: int):
        """The uncompressed model exported the same way (fused graph), on ONNX Runtime fp32."""
        Path(workdir).mkdir(parents=True, exist_ok=True)
        runner = OnnxRunner(export_model(workload, bundle, bundle.module, workdir)[0], threads, postprocess_of(workload, bundle))
        runner.runtime = "onnxruntime-fp32"
        return runner


def postprocess_of(workload, bundle: ModelBundle):
    """What a runner applies to the graph's output for this model (e.g. pooling), read from its folder."""
    return workload.load_companions(bundle.source).extra.get("postprocess") if bundle.source is not None else None


def ort_only_ops(path: Path) -> list[str]:
    """Op types of ONNX Runtime's own com.microsoft domain in a graph (empty: standard ONNX only)."""
    model = onnx.load(str(path), load_external_data=False)
    return sorted({n.op_type for n in model.graph.node if n.domain == "com.microsoft"})


def copy_onnx(src: Path, dest_dir: Path, name: str = "model.onnx") -> Path:
    """Copy an ONNX model (and any external-data files next to it) into dest_dir as `name`."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src), load_external_data=False)
    externals = {
        e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"
    }
    for ext in externals:
        shutil.copy2(src.parent / ext, dest_dir / ext)
    shutil.copy2(src, dest_dir / name)
    return dest_dir / name
