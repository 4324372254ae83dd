"""OpenVINO execution: a Runner for ONNX or OpenVINO IR models, the `openvino-ir` format, and a step
that hands the current ONNX model to OpenVINO (for QDQ int8 graphs its CPU plugin runs real int8
MatMuls; everything else stays fp32 unless `precision` says otherwise)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..contracts import Artifact, ModelBundle, inside, register_artifact, write_format
from ..errors import SlimcartError
from ..recipe import Step, register_step
from .onnx_runtime import export_model, onnx_path_of, postprocess_of


class OpenVinoRunner:
    """Runs an ONNX or IR (.xml) model on OpenVINO's CPU plugin with a fixed thread count, one stream."""

    runtime = "openvino"

    def __init__(self, path: Path, threads: int, precision: str = "f32", postprocess=None):
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": precision}
        try:
            self.compiled = core.compile_model(str(path), "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError subclasses for bad files
            raise SlimcartError(f"cannot load OpenVINO model {path}: {str(e).splitlines()[0]}") from None
        self.input_names = [p.get_any_name() for p in self.compiled.inputs]
        self.request = self.compiled.create_infer_request()
        self.path, self.postprocess = Path(path), postprocess

    def __call__(self, batch: dict[str, Any]) -> np.ndarray:
        feeds = {k: np.asarray(v) for k, v in batch.items() if k in self.input_names}
        result = self.request.infer(feeds)
        out = np.array(result[self.compiled.outputs[0]])
        return out if self.postprocess is None else self.postprocess(batch, out)


@register_artifact
class OpenVinoIR(Artifact):
    """An IR (.xml + .bin) converted from an ONNX file at `saved_as` inside the folder (the workload's
    layout, by default model.xml), with the workload's companions. Weights keep their stored precision
    (int8 stays int8; no fp16 cast)."""

    format = "openvino-ir"
    runtime = "openvino"

    def __init__(self, source: Path | Any, saved_as: str = "model.xml"):
        self.source, self.saved_as = source, saved_as  # an ONNX file, or an openvino.Model

    def save(self, folder: Path, workload, bundle: ModelBundle) -> None:
        save_openvino(self.source, folder, self.saved_as)
        workload.save_companions(bundle, folder)

    @classmethod
    def load(cls, folder: Path, meta: dict, workload, threads: int):
        xml = inside(folder, meta.get("model", "model.xml"), "model")
        if not xml.is_file():
            raise SlimcartError(f"{folder} says it holds an OpenVINO model but {xml.name} is missing")
        bundle = workload.load_companions(folder)
        return OpenVinoRunner(xml, threads, postprocess=bundle.extra.get("postprocess")), bundle

    @classmethod
    def reference(cls, workload, bundle: ModelBundle, workdir: Path, threads: int):
        """The uncompressed model (plain ONNX export) on OpenVINO in fp32."""
        Path(workdir).mkdir(parents=True, exist_ok=True)
        runner = OpenVinoRunner(export_model(workload, bundle, bundle.module, workdir, optimize=False)[0], threads,
                                postprocess=postprocess_of(workload, bundle))
        runner.runtime = "openvino-fp32"
        return runner


@register_step
class ToOpenVino(Step):
    """Run the current ONNX model (e.g. after export_onnx / an int8 step) on OpenVINO instead of ONNX Runtime."""

    kind: Literal["to_openvino"] = "to_openvino"

    def apply(self, state, ctx):
        layout = ctx.workload.export_spec(state.bundle).get("layout", {})
        state.artifact = OpenVinoIR(onnx_path_of(state, self.kind), layout.get("openvino", "model.xml"))
        state.kernels.append("OpenVINO CPU plugin")
        return state


def save_openvino(source: Path | Any, folder: Path, saved_as: str = "model.xml") -> Path:
    """Write the IR (from an ONNX file or an openvino.Model) at folder/saved_as, and the format file."""
    import openvino as ov

    xml = inside(folder, saved_as, "model")
    xml.parent.mkdir(parents=True, exist_ok=True)
    model = ov.convert_model(str(source)) if isinstance(source, (str, Path)) else source
    ov.save_model(model, str(xml), compress_to_fp16=False)
    write_format(folder, OpenVinoIR.format, model=saved_as)
    return xml
