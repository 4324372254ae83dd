"""NNCF as the quantizer behind `static_int8` (`engine: nncf`): OpenVINO + NNCF post-training int8.

Why offer it: on MiniLM NNCF's graph ran ~4% more batch-32 throughput than slimcart's own static int8
on OpenVINO at a larger nDCG@10 loss (docs/bench-int8-vs-nncf.md); a user who wants that trade gets it
from the same recipe step, on the same exported graph and calibration batches. NNCF's transformer
preset applies its own SmoothQuant and bias correction; layers the step does not select (targets /
exclude, or `keep_fp32` from mixed precision) go to NNCF's ignored scope, so they stay float.
"""
from __future__ import annotations

from pathlib import Path

from ...errors import SlimcartError


def nncf_quantize(fp32_onnx: Path, batches: list[dict], keep_float_nodes: list[str]):
    """An int8 openvino.Model quantized by NNCF on `batches` (each batch one calibration item)."""
    try:
        import nncf
    except ImportError:
        raise SlimcartError("static_int8 engine 'nncf' needs the nncf package (pip install 'slimcart[openvino]')") from None
    import openvino as ov

    model = ov.convert_model(str(fp32_onnx))
    ignored = nncf.IgnoredScope(names=keep_float_nodes, validate=False) if keep_float_nodes else None
    subset = sum(int(b["input_ids"].shape[0]) if "input_ids" in b else 1 for b in batches)
    kwargs = {"ignored_scope": ignored} if ignored is not None else {}
    return nncf.quantize(model, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER, subset_size=subset,
                         **kwargs), nncf.__version__
