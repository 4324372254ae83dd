"""OpenVINO execution: a Runner for ONNX or OpenVINO IR models, the `openvino-ir` artifact format, and a
step that hands the current ONNX model to OpenVINO (for QDQ int8 graphs its CPU plugin runs real int8
MatMuls; everything else stays fp32 unless `precision` says otherwise)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..bench import default_threads
from ..errors import SlimcartError
from ..formats import register_format, write_format
from ..recipe import Step, register_step

FORMAT = "openvino-ir"


class OpenVinoRunner:
    """Runs an ONNX or IR (.xml) model on OpenVINO's CPU plugin with a fixed thread count, one stream."""

    runtime = "openvino"

    def __init__(self, path: Path, threads: int | None = None, precision: str = "f32"):
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": threads or default_threads(), "PERFORMANCE_HINT": "LATENCY",
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


def save_openvino(src: Path | Any, folder: Path) -> Path:
    """Convert an ONNX file (or take an ov.Model) and write folder/model.xml + model.bin with the
    `openvino-ir` format marker. Weights keep their stored precision (int8 stays int8; no fp16 cast)."""
    import openvino as ov

    folder.mkdir(parents=True, exist_ok=True)
    model = ov.convert_model(str(src)) if isinstance(src, (str, Path)) else src
    xml = folder / "model.xml"
    ov.save_model(model, str(xml), compress_to_fp16=False)
    write_format(folder, FORMAT, model="model.xml")
    return xml


@register_format(FORMAT)
def load_openvino_dir(workload, folder: Path, meta: dict):
    """(OpenVinoRunner, bundle with the tokenizer saved next to it) for an `openvino-ir` folder."""
    from ..workloads.base import ModelBundle

    xml = folder / meta.get("model", "model.xml")
    if not xml.exists():
        raise SlimcartError(f"{folder} says it holds an OpenVINO model but {xml.name} is missing")
    tok = None
    if (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
    return OpenVinoRunner(xml), ModelBundle(name=str(folder), module=None, source=folder, tokenizer=tok)


@register_step
class ToOpenVino(Step):
    """Run the current ONNX model (e.g. after export_onnx / an int8 step) on OpenVINO instead of ONNX Runtime."""

    kind: Literal["to_openvino"] = "to_openvino"

    def apply(self, state, ctx):
        if state.onnx_path is None:
            raise SlimcartError("to_openvino needs an ONNX model: put an 'export_onnx' or int8 step before it")
        ov_dir = ctx.workdir / "openvino"
        state.openvino_path = save_openvino(state.onnx_path, ov_dir)
        state.runtime, state.onnx_path = "openvino", None
        state.saver = lambda folder, src=ov_dir: _copy_tree(src, folder)
        state.kernels.append("OpenVINO CPU plugin")
        return state


def _copy_tree(src: Path, dest: Path) -> None:
    import shutil

    shutil.copytree(src, dest, dirs_exist_ok=True)
