"""Quantization: schemes (uniform / k-means / log levels, any granularity), observers, fake-quant,
SmoothQuant, static int8 on real kernels, sensitivity-guided mixed precision, QAT, and (part B)
weight-only int4 for LLMs."""
from .schemes import (
    QuantParams,
    QuantScheme,
    compute_params,
    dequantize,
    fake_quantize,
    pack_int4,
    quantize,
    quantize_with,
    unpack_int4,
)

__all__ = [
    "QuantParams",
    "QuantScheme",
    "compute_params",
    "dequantize",
    "fake_quantize",
    "pack_int4",
    "quantize",
    "quantize_with",
    "unpack_int4",
]
