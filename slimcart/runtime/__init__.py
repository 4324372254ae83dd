"""Runtimes that execute a model: PyTorch eager, ONNX Runtime (and OpenVINO where measured faster)."""
