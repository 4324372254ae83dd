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
from .onnx_runtime import export_model, onnx_path_of


class OpenVinoRunner:
    """Runs an ONNX or IR (.xml) model on OpenVINO's CPU plugin with a fixed thread count, one stream."""

    runtime = "openvino"

    def __init__(self, path: Path, threads: int, precision: str = "f32"):
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
        self.path = Path(path)

    def __call__(self, batch: dict[str, Any]) -> np.ndarray:
        feeds = {k: np.asarray(v) for k, v in batch.items() if k in self.input_names}
        result = self.request.infer(feeds)
        return np.array(result[self.compiled.outputs[0]])


@register_artifact
class OpenVinoIR(Artifact):
    """model.xml + model.bin converted from an ONNX file, with the workload's companions. Weights keep
    their stored precision (int8 stays int8; no fp16 cast)."""

    format = "openvino-ir"
    runtime = "openvino"

    def __init__(self, source: Path | Any):
        self.source = source  # an ONNX file, or an openvino.Model

    def save(self, folder: Path, workload, bundle: ModelBundle) -> None:
        save_openvino(self.source, folder)
        workload.save_companions(bundle, folder)

    @classmethod
    def load(cls, folder: Path, meta: dict, workload, threads: int):
        xml = inside(folder, meta.get("model", "model.xml"), "model")
        if not xml.is_file():
            raise SlimcartError(f"{folder} says it holds an OpenVINO model but {xml.name} is missing")
        return OpenVinoRunner(xml, threads), workload.load_companions(folder)

    @classmethod
    def reference(cls, workload, bundle: ModelBundle, workdir: Path, threads: int):
        """The uncompressed model (plain ONNX export) on OpenVINO in fp32."""
        Path(workdir).mkdir(parents=True, exist_ok=True)
        runner = OpenVinoRunner(export_model(workload, bundle, bundle.module, workdir, optimize=False)[0], threads)
        runner.runtime = "openvino-fp32"
        return runner


@register_step
class ToOpenVino(Step):
    """Run the current ONNX model (e.g. after export_onnx / an int8 step) on OpenVINO instead of ONNX Runtime."""

    kind: Literal["to_openvino"] = "to_openvino"

    def apply(self, state, ctx):
        state.artifact = OpenVinoIR(onnx_path_of(state, self.kind))
        state.kernels.append("OpenVINO CPU plugin")
        return state


def save_openvino(source: Path | Any, folder: Path) -> Path:
    """Write folder/model.xml + model.bin (from an ONNX file or an openvino.Model) and the format file."""
    import openvino as ov

    folder.mkdir(parents=True, exist_ok=True)
    model = ov.convert_model(str(source)) if isinstance(source, (str, Path)) else source
    ov.save_model(model, str(folder / "model.xml"), compress_to_fp16=False)
    write_format(folder, OpenVinoIR.format, model="model.xml")
    return folder / "model.xml"
