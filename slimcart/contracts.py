"""The contracts every floor shares. Imports nothing of slimcart but `errors`.

    workload  --(ModelBundle, batches)-->  recipe steps  --(ModelState.artifact)-->  runtime
        ^                                                                              |
        +------------------------- Runner: batch -> outputs <--------------------------+

- A **workload** (model family + data + metric + realistic inputs) never knows which technique ran:
  it evaluates and times a `Runner`.
- A **step** (technique) never knows which workload it runs on: it sees modules, calibration
  batches (`StepContext.calibration`) and the typed hand-over fields of `ModelState`.
- An **artifact** is one saved-model format: `save(folder)` writes it, `load(folder)` gives a Runner.
  Formats register themselves by name; `slimcart-format.json` in a folder names its format.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

from .errors import SlimcartError

Progress = Callable[[str], None]
LossFn = Callable[[Any, Any], Any]  # (module, batch) -> scalar loss tensor


def no_progress(msg: str) -> None:
    """The default progress callback: say nothing."""


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
    source: Path | None = None  # the file or folder read (None for generated data): part of a run's identity
    extra_sources: tuple[Path, ...] = ()  # further files read (e.g. a guard task's data)

    def as_dict(self) -> dict:
        return {"name": self.name, "synthetic": self.synthetic, "split": self.split, "n": self.n}


@dataclass
class ModelBundle:
    """A loaded model: the torch module (None for a model that only runs on another runtime) plus
    what is needed to feed and save it (tokenizer, config)."""

    name: str  # alias or path as the user gave it
    module: Any  # torch.nn.Module or None
    source: Path | None  # folder/file it came from (never written to)
    tokenizer: Any = None
    extra: dict = field(default_factory=dict)


@dataclass
class EvalResult:
    """Quality figures plus the raw outputs, so a candidate can be compared with the baseline's."""

    quality: dict[str, float]
    outputs: Any = None
    # The primary metric per evaluation unit (query, user, session, photo) where the primary metric is
    # their mean, in a fixed unit order: paired intervals of a candidate against the baseline resample
    # these units (the planner's quality bound). None where the metric is not a mean (AUC, perplexity).
    per_unit: Any = None


@dataclass
class BenchInputs:
    """Realistic inputs for timing: single requests (latency) and serving-size batches (throughput)."""

    single: list[Any]
    serving: list[Any]
    items_per_serving_batch: int
    unit: str  # what throughput counts: "texts", "tokens", "users"
    # Further throughput figures timed the same interleaved way, e.g. {"prefill_tokens": (batches, tokens per batch)}
    extra: dict[str, tuple[list[Any], int]] = field(default_factory=dict)
    label: str = ""  # what one throughput call is, for reports (default "batch N"), e.g. "decode, batch 1"


@dataclass
class DistillOptions:
    """What the `distill` step asks of a workload's distillation task: loss weights (None = the
    workload's defaults), temperatures, the seed, and the transfer-data settings (each workload reads
    those it knows: extra_titles, windows, window_tokens, kd_positions...)."""

    losses: dict[str, float] | None = None
    temperature: float = 1.0
    score_temperature: float = 0.05
    seed: int = 0
    transfer: dict[str, Any] = field(default_factory=dict)
    progress: Progress = no_progress


class DistillTask(Protocol):
    """What the distillation trainer needs from a workload's teacher/student set-up."""

    def trainable(self) -> Any: ...  # student plus any loss-only heads (projections)

    def student(self) -> Any: ...

    def set_student(self, student: Any) -> None: ...

    def n_examples(self) -> int: ...

    def loss(self, idx: Any) -> tuple[Any, dict[str, float]]: ...  # mean over the examples idx

    def validate(self) -> float: ...  # higher is better; held-out transfer data, never the test split

    def score_undistilled(self, student: Any) -> float: ...  # cheap closeness to the teacher (layer choice)

    def fingerprint(self) -> dict: ...  # identifies teacher, student init, data and losses (for resume)


class Workload(Protocol):
    """Model family + data + quality metric + realistic benchmark inputs. See docs/architecture.md."""

    name: str
    quality_keys: tuple[str, ...]
    higher_is_better: dict[str, bool]
    primary_metric: str  # the figure a quality budget is stated in

    def load_model(self, spec: str) -> ModelBundle: ...  # alias or folder (also a saved HF folder)

    def load_companions(self, folder: Path) -> ModelBundle: ...  # tokenizer/config beside a non-torch model

    def save_model(self, bundle: ModelBundle, folder: Path) -> None: ...  # the family's own folder

    def save_companions(self, bundle: ModelBundle, folder: Path) -> None: ...  # what load_companions reads

    def torch_runner(self, bundle: ModelBundle) -> Runner: ...

    def load_data(self, data: str | None) -> Any: ...

    def data_info(self, data: Any) -> DataInfo: ...

    def evaluate(self, runner: Runner, bundle: ModelBundle, data: Any, reference: Any = None) -> EvalResult: ...

    def bench_inputs(self, bundle: ModelBundle, data: Any) -> BenchInputs: ...

    def calibration_batches(self, bundle: ModelBundle, data: Any, n: int) -> list[Any]: ...  # never the test split

    def example_batch(self, bundle: ModelBundle) -> Any: ...

    def export_spec(self, bundle: ModelBundle) -> dict: ...  # ONNX export: example, dynamic_axes, output_name

    def task_loss(self, bundle: ModelBundle) -> LossFn | None: ...  # the training objective, None if unlabeled

    def distill_task(self, teacher: Any, student: Any, bundle: ModelBundle, data: Any,
                     options: DistillOptions) -> DistillTask: ...


# ---------------------------------------------------------------- saved-model formats
FORMAT_FILE = "slimcart-format.json"
MAX_FORMAT_BYTES = 4 << 20  # a format file is a few KB; refuse anything that could exhaust memory


class Artifact:
    """One saved-model format. A step that leaves the model in a new form sets `ModelState.artifact`.

    `save(folder, workload, bundle)` writes the folder (with `slimcart-format.json` naming `format`,
    except for the workload's plain folder); `load(folder, meta, workload, threads)` returns
    `(runner, bundle)`. `in_torch`: the artifact saves the in-memory torch module, so later steps
    may still change it; exported artifacts (ONNX, OpenVINO, packed weights) are final files.
    """

    format: ClassVar[str] = ""
    in_torch: ClassVar[bool] = False
    runtime: str = "torch"

    def save(self, folder: Path, workload: Workload, bundle: ModelBundle) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def load(cls, folder: Path, meta: dict, workload: Workload, threads: int) -> tuple[Runner, ModelBundle]:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def reference(cls, workload: Workload, bundle: ModelBundle, workdir: Path, threads: int) -> Runner | None:
        """The uncompressed model (`bundle`) on this format's runtime, timed beside the baseline so a
        report separates what the runtime buys from what compression buys; None on PyTorch itself."""
        return None

    def describe(self) -> str:
        return self.format or "workload folder"


ARTIFACTS: dict[str, type[Artifact]] = {}


def register_artifact(cls: type[Artifact]) -> type[Artifact]:
    """Class decorator: make a format loadable by name (one class per name)."""
    old = ARTIFACTS.get(cls.format)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(f"saved format '{cls.format}' is defined twice: {old.__module__}.{old.__qualname__} and "
                        f"{cls.__module__}.{cls.__qualname__}")
    ARTIFACTS[cls.format] = cls
    return cls


def write_format(folder: Path, name: str, **meta) -> None:
    (Path(folder) / FORMAT_FILE).write_text(json.dumps({"format": name, **meta}, indent=2))


def read_format(folder: Path) -> dict | None:
    """The folder's format file as a dict (None when there is none); a bad one is one clear error."""
    f = Path(folder) / FORMAT_FILE
    if not f.exists():
        return None
    if f.is_symlink() or not f.is_file() or f.stat().st_size > MAX_FORMAT_BYTES:
        raise SlimcartError(f"{f} is not a regular file of a sensible size")
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SlimcartError(f"{f} is not valid JSON") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), str):
        raise SlimcartError(f"{f} must be a JSON object with a string 'format'")
    return meta


def inside(folder: Path, rel: Any, what: str = "file") -> Path:
    """`folder / rel` for a name read from a file in `folder`, refused unless it stays inside the folder
    (no absolute paths, no '..', no symlink leading out)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise SlimcartError(f"{folder}: {what} name {rel!r} in {FORMAT_FILE} is not a file name")
    root = Path(folder).resolve()
    path = (root / rel).resolve()
    if Path(rel).is_absolute() or (path != root and root not in path.parents):
        raise SlimcartError(f"{folder}: {what} '{rel}' in {FORMAT_FILE} points outside the model folder")
    return path


def saved_format(folder: Path) -> tuple[type[Artifact], dict]:
    """The registered format class of a saved folder and its format-file contents; a folder without a
    format file is ONNX (model.onnx) or the workload's own format. Formats register on import of their
    modules (`slimcart.recipe.load_plugins()` imports them all)."""
    folder = Path(folder)
    meta = read_format(folder)
    if meta is None:
        meta = {"format": "onnx" if (folder / "model.onnx").exists() else ""}
    cls = ARTIFACTS.get(meta["format"])
    if cls is None:
        raise SlimcartError(f"unknown slimcart model format '{meta['format']}' in {folder}")
    return cls, meta


def load_saved(folder: Path, workload: Workload, threads: int) -> tuple[Runner, ModelBundle]:
    """(runner, bundle) for a folder any registered format wrote (see `saved_format`)."""
    cls, meta = saved_format(folder)
    return cls.load(Path(folder), meta, workload, threads)


# ---------------------------------------------------------------- what flows between recipe steps
@dataclass
class StepContext:
    """What a step may use besides the model: the workload (only through this contract), the data,
    scratch space, the thread budget and progress."""

    workload: Workload
    data: Any
    workdir: Path
    threads: int
    progress: Progress = no_progress
    later_steps: tuple[str, ...] | None = None  # kinds of the recipe's remaining steps; None = not known

    def later(self, *kinds: str) -> bool:
        """Whether a step of one of these kinds may still follow (True when the rest is unknown)."""
        return self.later_steps is None or any(k in self.later_steps for k in kinds)

    def calibration(self, bundle: ModelBundle, n: int) -> list[Any]:
        """Up to `n` input batches of the workload's calibration split (never the evaluation split)."""
        if n < 1:
            raise SlimcartError(f"calibration_batches must be at least 1, got {n}")
        batches = self.workload.calibration_batches(bundle, self.data, n)
        if not batches:
            raise SlimcartError("calibration data is empty")
        return batches


@dataclass
class ModelState:
    """The model as the recipe has shaped it so far.

    `bundle.module` is the in-memory torch model while steps run; `artifact` is what saving would
    write now (None: the workload's own folder of `bundle.module`). `kernels` lists the real
    low-precision kernels that run, `size_only` the techniques no kernel here turns into speed.

    Hand-over fields, each written by one kind of step for later ones:
      teacher    frozen copy of the model before the first lossy step (kept only if recover/distill follows)
      layer_map  student block i <-> teacher block layer_map[i] (after layers were dropped)
      keep_fp32  layer names later int8 steps leave in float (mixed precision's choice)
      act_ranges learned activation ranges per layer (QAT) for the int8 export
      masks      sparsity masks that training must keep (module name -> 0/1 tensor)
      reports    what each step measured, by step kind (written to the notes and metrics)
    """

    bundle: ModelBundle
    artifact: Artifact | None = None
    kernels: list[str] = field(default_factory=list)
    size_only: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    teacher: Any = None
    layer_map: list[int] | None = None
    keep_fp32: list[str] = field(default_factory=list)
    act_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    masks: dict[str, Any] = field(default_factory=dict)
    reports: dict[str, Any] = field(default_factory=dict)

    @property
    def runtime(self) -> str:
        return self.artifact.runtime if self.artifact is not None else "torch"

    def torch_module(self, kind: str) -> Any:
        """The in-memory model for a step that changes it; refused once the model was exported."""
        if (self.artifact is not None and not self.artifact.in_torch) or self.bundle.module is None:
            raise SlimcartError(f"'{kind}' works on the PyTorch model: put it before export/quantization steps "
                                f"(the model is already {self.artifact.describe() if self.artifact else 'gone'})")
        return self.bundle.module

    def keep_teacher(self, ctx: StepContext, always: bool = False) -> None:
        """Keep a frozen copy of the model as it is now as the teacher of a later `recover` / `distill`
        step: once (the first lossy step's input is the teacher), and only when such a step may follow
        (or `always`, for a step that trains against it itself): a copy of a 135M-parameter LLM is 0.5 GB."""
        if self.teacher is None and (always or ctx.later("recover", "distill")):
            self.teacher = copy.deepcopy(self.bundle.module).eval()

    def save(self, folder: Path, workload: Workload) -> None:
        """Write the current model: its artifact, or the workload's own folder."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        if self.artifact is None:
            workload.save_model(self.bundle, Path(folder))
        else:
            self.artifact.save(Path(folder), workload, self.bundle)
