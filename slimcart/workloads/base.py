"""The workload contract: model + data + quality metric + realistic benchmark inputs.

A workload never knows which technique ran; it only sees a `Runner` (anything that maps a
batch of model inputs to outputs). Techniques never know which workload they run on; they see
modules and calibration batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable


@runtime_checkable
class Runner(Protocol):
    """A model on one runtime. `__call__` maps one batch of inputs (workload-specific) to outputs."""

    runtime: str

    def __call__(self, batch: Any) -> Any: ...


@dataclass
class DataInfo:
    """Where the evaluation data came from; `synthetic=True` is printed loudly everywhere."""

    name: str
    synthetic: bool
    split: str
    n: int

    def as_dict(self) -> dict:
        return {"name": self.name, "synthetic": self.synthetic, "split": self.split, "n": self.n}


@dataclass
class ModelBundle:
    """A loaded model: the torch module plus everything needed to feed and save it."""

    name: str  # alias or path as the user gave it
    module: Any  # torch.nn.Module
    source: Path | None  # folder/file it came from (never written to)
    tokenizer: Any = None
    extra: dict = field(default_factory=dict)


@dataclass
class EvalResult:
    """Quality figures plus the raw outputs, so a candidate can be compared with the baseline's."""

    quality: dict[str, float]
    outputs: Any = None


@dataclass
class BenchInputs:
    """Realistic inputs for timing: single requests (latency) and serving-size batches (throughput)."""

    single: list[Any]
    serving: list[Any]
    items_per_serving_batch: int
    unit: str  # what throughput counts: "texts", "tokens", "users"
    # Further throughput figures timed the same interleaved way, e.g. {"prefill_tokens": (batches, tokens per batch)}
    extra: dict[str, tuple[list[Any], int]] = field(default_factory=dict)


class Workload(Protocol):
    name: str
    quality_keys: tuple[str, ...]
    higher_is_better: dict[str, bool]

    def load_model(self, spec: str) -> ModelBundle: ...

    def load_data(self, data: str | None) -> Any: ...

    def data_info(self, data: Any) -> DataInfo: ...

    def torch_runner(self, bundle: ModelBundle) -> Runner: ...

    def evaluate(self, runner: Runner, bundle: ModelBundle, data: Any, reference: Any = None) -> "EvalResult": ...

    def save_model(self, bundle: ModelBundle, folder: Path) -> None: ...

    def load_artifact(self, folder: Path) -> tuple[Runner, ModelBundle | None]: ...

    def onnx_spec(self, bundle: ModelBundle) -> dict: ...

    def bench_inputs(self, bundle: ModelBundle, data: Any) -> BenchInputs: ...

    def calibration_batches(self, bundle: ModelBundle, data: Any, n: int) -> list[Any]: ...

    def example_batch(self, bundle: ModelBundle) -> Any: ...


WorkloadFactory = Callable[[], Workload]
