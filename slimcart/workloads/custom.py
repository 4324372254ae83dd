"""A user's own torch module as a workload: no file of slimcart's to write, no architecture to register.

    wl = ModuleWorkload(model, calibration=train_batches, test=test_batches, evaluate=my_metrics)
    metrics = api.compress(wl, MODULE, recipe, "out/")        # MODULE: the in-memory model
    runner, bundle = api.load(wl, "out/", threads=1)          # the saved output, reloaded

What the user gives:
- `model`: an nn.Module whose forward takes tensors (positional or named); never modified.
- `calibration`: batches of inputs for calibration, pruning statistics and distillation transfer data
  (never the test data). A batch is a tensor, a tuple of tensors (forward's positional arguments) or
  a dict of tensors (forward's named arguments); labels may ride along under the key `labels`.
- `test`: the batches `evaluate` scores and the timing uses.
- `evaluate(predict) -> {metric: value}`: the user's metric; `predict(batch) -> np.ndarray` runs the
  model being measured (PyTorch, ONNX Runtime or OpenVINO) on one batch of `test`.
- optional `loss(module, batch) -> scalar tensor` (a training objective: enables `recover` with the
  task loss and Taylor channel importance) and `students={"name": module}` (distillation students,
  chosen in a recipe by `student: {type: model, path: name}`).

Techniques that need no knowledge of the architecture apply: int8 static/dynamic (ONNX Runtime /
OpenVINO through the ONNX export), unstructured and N:M pruning, channel pruning through
Torch-Pruning's dependency graph, low-rank factorization of Linear layers, distillation (output
matching: KL of softmax outputs or MSE) into the pruned model or a user-given student. What knows
transformer blocks (head pruning, layer dropping, GPTQ on decoder layers) refuses by name.

Saved folder: model.safetensors + config.json {"model_type": "slimcart-module", "template": ...}.
Loading rebuilds the module from the template the workload holds (the user's model or a named
student; never code read from the folder) and resizes Conv/Linear/BatchNorm/LayerNorm/Embedding
layers whose saved weights are smaller (physically pruned channels) before a strict state-dict load.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..contracts import BenchInputs, DataInfo, DistillOptions, EvalResult, ModelBundle
from ..errors import SlimcartError
from ..training import TeacherStudentTask

MODULE = "module"  # the model spec naming the in-memory model the workload was built with
MODEL_TYPE = "slimcart-module"
WEIGHTS = "model.safetensors"
LATENCY_ROWS = 32


class ModuleWorkload:
    """Workload (slimcart.contracts) around a user's module, batches and metric. See the module docstring."""

    def __init__(self, model: nn.Module, *, calibration: Iterable[Any], test: Iterable[Any],
                 evaluate: Callable[[Callable[[Any], np.ndarray]], dict[str, float]],
                 loss: Callable[[nn.Module, Any], torch.Tensor] | None = None, students: dict[str, nn.Module] | None = None,
                 name: str = "custom", data_name: str = "user data", higher_is_better: dict[str, bool] | None = None,
                 primary_metric: str | None = None, distill_loss: str = "kl"):
        if not isinstance(model, nn.Module):
            raise SlimcartError(f"ModuleWorkload needs a torch.nn.Module, got {type(model).__name__}")
        if distill_loss not in ("kl", "mse"):
            raise SlimcartError(f"distill_loss must be 'kl' (softmax outputs) or 'mse', got {distill_loss!r}")
        self.name, self.data_name, self.distill_loss = name, data_name, distill_loss
        self.templates = {MODULE: model, **(students or {})}
        for key, m in self.templates.items():
            if not isinstance(m, nn.Module):
                raise SlimcartError(f"student '{key}' is not a torch.nn.Module")
        self.input_names = _input_names(model)
        self.calibration = [self._as_dict(b) for b in calibration]
        self.test = [self._as_dict(b) for b in test]
        if not self.calibration or not self.test:
            raise SlimcartError("ModuleWorkload needs at least one calibration batch and one test batch")
        self._evaluate, self._loss = evaluate, loss
        probe = evaluate(lambda batch: self._predict_torch(model, batch))
        if not isinstance(probe, dict) or not probe or not all(isinstance(v, (int, float)) for v in probe.values()):
            raise SlimcartError("evaluate(predict) must return a non-empty dict of metric name -> number")
        self.quality_keys = tuple(probe)
        self.higher_is_better = {k: True for k in probe} | dict(higher_is_better or {})
        self.primary_metric = primary_metric or self.quality_keys[0]
        if self.primary_metric not in probe:
            raise SlimcartError(f"primary_metric '{self.primary_metric}' is not one of evaluate's metrics {list(probe)}")

    # ---------------------------------------------------------------- batches
    def _as_dict(self, batch: Any) -> dict[str, np.ndarray]:
        """A tensor / tuple / dict batch as forward's named inputs (numpy), `labels` kept aside."""
        if isinstance(batch, dict):
            unknown = set(batch) - set(self.input_names) - {"labels"}
            if unknown:
                raise SlimcartError(f"batch keys {sorted(unknown)} are not arguments of the model's forward {self.input_names}")
            items = batch.items()
        else:
            parts = batch if isinstance(batch, (tuple, list)) else (batch,)
            if len(parts) > len(self.input_names):
                raise SlimcartError(f"a batch of {len(parts)} tensors for a forward of {len(self.input_names)} argument(s)")
            items = zip(self.input_names, parts)
        out = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in items}
        if not any(k != "labels" for k in out):
            raise SlimcartError("a batch holds no model input")
        return out

    @staticmethod
    def _rows(batch: dict) -> int:
        return int(next(v for k, v in batch.items() if k != "labels").shape[0])

    def _predict_torch(self, module: nn.Module, batch: Any) -> np.ndarray:
        from ..runtime.torch_runtime import TorchRunner

        return TorchRunner(module)(self._as_dict(batch))

    # ---------------------------------------------------------------- models
    def load_model(self, spec: str) -> ModelBundle:
        if spec in self.templates:
            module = copy.deepcopy(self.templates[spec]).eval()
            return ModelBundle(name=spec, module=module, source=None,
                               extra={"template": spec, "weights_digest": _digest(module.state_dict().values())})
        folder = Path(spec)
        cfg = self._config(folder)
        template = cfg.get("template")
        if template not in self.templates:
            raise SlimcartError(f"{folder}: saved from template {template!r}, which this workload does not hold "
                                f"(it has: {', '.join(self.templates)})")
        from safetensors.torch import load_file

        weights = folder / WEIGHTS
        if not weights.is_file():
            raise SlimcartError(f"{folder} holds no {WEIGHTS}")
        state = load_file(str(weights))
        module = copy.deepcopy(self.templates[template])
        resize_to(module, state)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise SlimcartError(f"{folder}: the saved weights do not fit template '{template}': "
                                f"{str(e).splitlines()[0]}") from None
        return ModelBundle(name=str(folder), module=module.eval(), source=folder, extra={"template": template})

    @staticmethod
    def _config(folder: Path) -> dict:
        try:
            cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise SlimcartError(f"{folder} is not a saved custom model (no readable config.json)") from None
        if not isinstance(cfg, dict) or cfg.get("model_type") != MODEL_TYPE:
            raise SlimcartError(f"{folder}: config.json is not a slimcart custom-module config")
        return cfg

    def save_model(self, bundle: ModelBundle, folder: Path) -> None:
        from safetensors.torch import save_model

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_model(bundle.module, str(folder / WEIGHTS))  # tied weights handled; never a pickle
        self.save_companions(bundle, folder)

    def save_companions(self, bundle: ModelBundle, folder: Path) -> None:
        template = bundle.extra.get("template", MODULE)
        (Path(folder) / "config.json").write_text(json.dumps(
            {"model_type": MODEL_TYPE, "template": template, "class": type(self.templates[template]).__qualname__,
             "inputs": self.input_names}, indent=2))

    def load_companions(self, folder: Path) -> ModelBundle:
        cfg = self._config(folder)
        return ModelBundle(name=str(folder), module=None, source=Path(folder), extra={"template": cfg.get("template", MODULE)})

    def torch_runner(self, bundle: ModelBundle):
        from ..runtime.torch_runtime import TorchRunner

        return TorchRunner(bundle.module)

    # ---------------------------------------------------------------- data and quality
    def load_data(self, data: str | None) -> dict:
        if data is not None:
            raise SlimcartError("a ModuleWorkload's data are the batches it was built with; pass no --data")
        return {"calibration": self.calibration, "test": self.test}

    def data_info(self, data: dict) -> DataInfo:
        digest = _digest(v for b in data["calibration"] + data["test"] for v in b.values())  # part of a resume's identity
        return DataInfo(name=f"{self.data_name} ({digest})", synthetic=False, split="test batches given by the user",
                        n=sum(self._rows(b) for b in data["test"]))

    def evaluate(self, runner, bundle: ModelBundle, data: dict, reference: Any = None) -> EvalResult:
        def predict(batch: Any) -> np.ndarray:
            return np.asarray(runner({k: v for k, v in self._as_dict(batch).items() if k != "labels"}))

        quality = self._evaluate(predict)
        return EvalResult({k: float(v) for k, v in quality.items()}, None)

    def bench_inputs(self, bundle: ModelBundle, data: dict) -> BenchInputs:
        inputs = [{k: v for k, v in b.items() if k != "labels"} for b in data["test"]]
        single = [{k: v[i:i + 1] for k, v in b.items()} for b in inputs for i in range(self._rows(b))][:LATENCY_ROWS]
        size = self._rows(inputs[0])
        serving = [b for b in inputs if self._rows(b) == size]
        return BenchInputs(single=single, serving=serving, items_per_serving_batch=size, unit="items")

    def calibration_batches(self, bundle: ModelBundle, data: dict, n: int) -> list[dict]:
        return [{k: v for k, v in b.items() if k != "labels"} for b in data["calibration"][:n]]

    def example_batch(self, bundle: ModelBundle) -> dict:
        return {k: v[:2] for k, v in self.calibration[0].items() if k != "labels"}

    def export_spec(self, bundle: ModelBundle) -> dict:
        example = self.example_batch(bundle)
        axes = {k: {0: "batch"} for k in example}
        axes["output"] = {0: "batch"}
        return {"example": example, "dynamic_axes": axes, "output_name": "output", "model_type": None}

    def task_loss(self, bundle: ModelBundle):
        if self._loss is None:
            return None
        user = self._loss

        def loss(module: nn.Module, batch: dict) -> torch.Tensor:
            return user(module, {k: torch.as_tensor(v) for k, v in batch.items()})

        return loss

    def distill_task(self, teacher, student, bundle: ModelBundle, data: dict, options: DistillOptions):
        return OutputMatchingTask(teacher, student, data["calibration"], self.input_names, self.distill_loss, options)


class OutputMatchingTask(TeacherStudentTask):
    """Distillation by matching outputs on the calibration batches: KL(softmax(z_t/T) || softmax(z_s/T))
    T^2 for classifier-like outputs (`kl`), or mean squared error (`mse`). The last calibration batch
    (when there are several) is held out for validation: the negative loss there (higher is better)."""

    LOSSES, DEFAULTS, what = ("outputs",), {"outputs": 1.0}, "output-matching distillation"

    def __init__(self, teacher: nn.Module, student: nn.Module, batches: list[dict], names: list[str], kind: str,
                 options: DistillOptions):
        self.setup(teacher, options.losses)
        self.kind, self.T = kind, float(options.temperature)
        feeds = [{k: torch.as_tensor(v) for k, v in b.items() if k != "labels"} for b in batches]
        self.val = feeds[-1:] if len(feeds) > 1 else feeds
        self.train_feeds = feeds[:-1] if len(feeds) > 1 else feeds
        self.rows = [(i, r) for i, f in enumerate(self.train_feeds) for r in range(next(iter(f.values())).shape[0])]
        self.set_student(student)
        self._fp = {"what": "output matching", "kind": kind, "T": self.T, "n": len(self.rows), "seed": options.seed,
                    "digest": _digest(v for f in feeds for v in f.values())}

    def set_student(self, student: nn.Module) -> None:
        self.attach(student)

    def n_examples(self) -> int:
        return len(self.rows)

    def _gap(self, z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        if z_s.shape != z_t.shape:
            raise SlimcartError(f"student output {tuple(z_s.shape)} and teacher output {tuple(z_t.shape)} differ")
        if self.kind == "mse":
            return F.mse_loss(z_s, z_t)
        from .. import losses as L

        return L.soft_kl(z_s.reshape(-1, z_s.shape[-1]), z_t.reshape(-1, z_t.shape[-1]), self.T)

    def loss(self, idx) -> tuple[torch.Tensor, dict[str, float]]:
        by_batch: dict[int, list[int]] = {}
        for j in np.asarray(idx):
            b, r = self.rows[int(j)]
            by_batch.setdefault(b, []).append(r)
        parts = []
        for b, rows in by_batch.items():
            feed = {k: v[rows] for k, v in self.train_feeds[b].items()}
            with torch.no_grad():
                z_t = _out(self.teacher(**feed))
            parts.append(self._gap(_out(self.student()(**feed)), z_t) * len(rows))
        return self.combine({"outputs": sum(parts) / len(idx)})

    @torch.no_grad()
    def _held_out(self, student: nn.Module) -> float:
        training = student.training
        student.eval()
        try:
            return float(np.mean([float(self._gap(_out(student(**f)), _out(self.teacher(**f)))) for f in self.val]))
        finally:
            student.train(training)

    def validate(self) -> float:
        return -self._held_out(self.student())

    def score_undistilled(self, student: nn.Module) -> float:
        return -self._held_out(student)


def _digest(arrays: Iterable[Any]) -> str:
    h = hashlib.sha1()
    for a in arrays:
        a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        h.update(str((a.dtype, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _out(y: Any) -> torch.Tensor:
    from ..arch import output_tensor

    return output_tensor(y)


def _input_names(model: nn.Module) -> list[str]:
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not params:
        raise SlimcartError(f"{type(model).__name__}.forward takes no named tensor argument")
    return [p.name for p in params]


def resize_to(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Rebuild the layers whose saved weight is smaller than the template's (channels removed by
    pruning) with the saved sizes, so a strict load fits. Only plain layer types are rebuilt."""
    for name, module in list(model.named_modules()):
        w = state.get(f"{name}.weight" if name else "weight")
        if w is None or getattr(module, "weight", None) is None or tuple(module.weight.shape) == tuple(w.shape):
            continue
        if isinstance(module, nn.modules.conv._ConvNd) and w.dim() == module.weight.dim():
            groups = module.groups if module.groups == 1 else w.shape[0]  # depthwise layers stay depthwise
            new = type(module)(w.shape[1] * groups, w.shape[0], module.kernel_size, module.stride, module.padding,
                               module.dilation, groups, module.bias is not None, module.padding_mode)
        elif isinstance(module, nn.Linear) and w.dim() == 2:
            new = nn.Linear(w.shape[1], w.shape[0], bias=module.bias is not None)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and w.dim() == 1:
            new = type(module)(w.shape[0], module.eps, module.momentum, module.affine, module.track_running_stats)
        elif isinstance(module, nn.LayerNorm) and w.dim() >= 1:
            new = nn.LayerNorm(tuple(w.shape), module.eps, module.elementwise_affine)
        elif isinstance(module, nn.Embedding) and w.dim() == 2:
            new = nn.Embedding(w.shape[0], w.shape[1], module.padding_idx)
        else:
            raise SlimcartError(f"saved layer '{name}' has shape {tuple(w.shape)} where the template's "
                                f"{type(module).__name__} has {tuple(module.weight.shape)}")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
