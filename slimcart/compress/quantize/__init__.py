"""Quantization: schemes (uniform / k-means / log levels, any granularity), observers, fake-quant,
SmoothQuant, static int8 on real kernels, sensitivity-guided mixed precision, QAT, and weight-only
int4/int8 for LLMs (RTN, GPTQ, AWQ, k-means)."""
