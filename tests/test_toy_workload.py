"""docs/architecture.md's "add a workload" checklist, proved: a workload defined here, in the test, with
no file under slimcart/ touched, is compressed by a built-in recipe through the public API."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from slimcart import api
from slimcart.contracts import BenchInputs, DataInfo, EvalResult, ModelBundle
from slimcart.errors import SlimcartError
from slimcart.runtime.torch_runtime import TorchRunner

pytestmark = pytest.mark.usefixtures("one_thread")

FEATURES, CLASSES, TOKENS = 16, 4, 6


class BagClassifier(nn.Module):
    """A product-attribute classifier: token features (batch, tokens, features) -> class logits."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.inp, self.out = nn.Linear(FEATURES, hidden), nn.Linear(hidden, CLASSES)

    def forward(self, x):
        return self.out(torch.relu(self.inp(x)).mean(1))


class ToyWorkload:
    name = "toy"
    quality_keys = ("accuracy",)
    higher_is_better = {"accuracy": True}
    primary_metric = "accuracy"

    def load_model(self, spec: str) -> ModelBundle:
        from safetensors.torch import load_model

        folder = Path(spec)
        if not (folder / "model.safetensors").is_file():
            raise SlimcartError(f"{folder} holds no model.safetensors")
        model = BagClassifier(json.loads((folder / "config.json").read_text())["hidden"])
        load_model(model, str(folder / "model.safetensors"))
        return ModelBundle(name=spec, module=model.eval(), source=folder)

    def save_model(self, bundle, folder):
        from safetensors.torch import save_model

        save_model(bundle.module, str(folder / "model.safetensors"))
        self.save_companions(bundle, folder)

    def save_companions(self, bundle, folder):
        (folder / "config.json").write_text(json.dumps({"hidden": 64}))

    def load_companions(self, folder):
        return ModelBundle(name=str(folder), module=None, source=folder)

    def torch_runner(self, bundle):
        return TorchRunner(bundle.module)

    def load_data(self, data):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(512, TOKENS, FEATURES)).astype(np.float32)
        y = (x.mean(1)[:, :CLASSES]).argmax(1)  # a learnable rule
        return {"x": x, "y": y}

    def data_info(self, data):
        return DataInfo(name="toy", synthetic=True, split="all", n=len(data["y"]))

    def evaluate(self, runner, bundle, data, reference=None):
        logits = np.concatenate([runner({"x": data["x"][i:i + 64]}) for i in range(0, len(data["y"]), 64)])
        return EvalResult({"accuracy": float((logits.argmax(1) == data["y"]).mean())}, logits)

    def bench_inputs(self, bundle, data):
        return BenchInputs(single=[{"x": data["x"][i:i + 1]} for i in range(8)],
                           serving=[{"x": data["x"][i:i + 32]} for i in range(0, 128, 32)], items_per_serving_batch=32,
                           unit="items")

    def calibration_batches(self, bundle, data, n):
        return [{"x": data["x"][i:i + 32]} for i in range(256, 512, 32)][:n]

    def example_batch(self, bundle):
        return {"x": np.zeros((2, TOKENS, FEATURES), np.float32)}

    def export_spec(self, bundle):
        return {"example": self.example_batch(bundle), "dynamic_axes": {"x": {0: "batch"}, "logits": {0: "batch"}},
                "output_name": "logits", "model_type": None}

    def task_loss(self, bundle):
        return None

    def distill_task(self, teacher, student, bundle, data, options):
        raise SlimcartError("the toy workload has no distillation task")


@pytest.fixture
def trained(tmp_path) -> Path:
    wl = ToyWorkload()
    data = wl.load_data(None)
    torch.manual_seed(0)
    model = BagClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss = nn.functional.cross_entropy(model(torch.from_numpy(data["x"])), torch.from_numpy(data["y"]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = tmp_path / "toy-model"
    folder.mkdir()
    wl.save_model(ModelBundle("toy", model.eval(), None), folder)
    return folder


def test_a_workload_defined_outside_slimcart_compresses_with_a_builtin_recipe(tmp_path, trained):
    wl = ToyWorkload()
    m = api.compress(wl, str(trained), "int8-dynamic", tmp_path / "out", repeats=1, measure_rss=False)
    base, comp = m["baseline"]["quality"]["accuracy"], m["compressed"]["quality"]["accuracy"]
    assert base > 0.8  # the rule was learned
    assert abs(comp - base) < 0.05 and m["compressed"]["runtime"] == "onnxruntime"
    assert any("dynamic int8" in k for k in m["kernels"])
    runner, bundle = api.load(wl, tmp_path / "out", threads=1)  # reloads through the registered ONNX format
    again = wl.evaluate(runner, bundle, wl.load_data(None)).quality["accuracy"]
    assert again == pytest.approx(comp, abs=1e-9)


def test_recipes_for_other_workloads_are_refused_by_name(tmp_path, trained):
    with pytest.raises(SlimcartError, match="does not apply to workload 'toy'"):
        api.compress(ToyWorkload(), str(trained), "w4-gptq", tmp_path / "out", repeats=1, measure_rss=False)
    assert not (tmp_path / "out").exists()
