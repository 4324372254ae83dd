"""What flows between recipe steps: the current model, where it lives (torch or an exported file),
and notes on which kernels really ran."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..workloads.base import ModelBundle, Workload


@dataclass
class StepContext:
    """What a step may use besides the model: the workload (for calibration data), scratch space, progress."""

    workload: Workload
    data: Any
    workdir: Path
    progress: Callable[[str], None] = lambda msg: None
    later_steps: tuple[str, ...] | None = None  # kinds of the recipe's remaining steps; None = not known

    def later(self, *kinds: str) -> bool:
        """Whether a step of one of these kinds may still follow (True when the rest is unknown)."""
        return self.later_steps is None or any(k in self.later_steps for k in kinds)

    def calibration(self, bundle: ModelBundle, n: int) -> list[Any]:
        batches = self.workload.calibration_batches(bundle, self.data, n)
        if not batches:
            from ..errors import SlimcartError

            raise SlimcartError("calibration data is empty")
        return batches


@dataclass
class ModelState:
    """The model as the recipe has shaped it so far.

    `runtime` says what executes it: "torch" (bundle.module), "onnxruntime" (onnx_path) or
    "openvino" (openvino_path). `kernels` records what real low-precision kernels run, and
    `size_only` techniques (e.g. sparsity with no sparse kernel) are listed so reports say so.
    """

    bundle: ModelBundle
    runtime: str = "torch"
    onnx_path: Path | None = None
    openvino_path: Path | None = None
    kernels: list[str] = field(default_factory=list)
    size_only: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    # A step whose result is neither plain PyTorch nor ONNX (e.g. packed int4 weights) sets a saver; the
    # folder it writes must hold `slimcart-format.json` naming a loader registered in slimcart.formats.
    saver: Callable[[Path], None] | None = None
