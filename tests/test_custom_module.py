"""Issue 15's "any model through the Python API": docs/custom-models.md's example runs as written, on the
real PriceRunner titles, and what it saved reloads to the figures its metrics.json reports."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from slimcart import api
from slimcart.errors import SlimcartError
from slimcart.workloads.custom import MODULE, ModuleWorkload, resize_to

DOC = Path(__file__).resolve().parents[1] / "docs" / "custom-models.md"
pytestmark = pytest.mark.usefixtures("one_thread")


def _doc_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


@pytest.mark.slow
def test_docs_example_compresses_a_user_model_end_to_end(real_data, monkeypatch, capsys):
    monkeypatch.setenv("SLIMCART_DATA", str(real_data))
    scope: dict = {"__name__": "docs_example"}
    exec(compile(_doc_example(), str(DOC), "exec"), scope)
    results, wl, out = scope["results"], scope["wl"], scope["out"]
    assert set(results) == {"int8-dynamic", "title-cnn-prune-half"}
    for name, m in results.items():
        base, comp = m["baseline"]["quality"], m["compressed"]["quality"]
        assert base["accuracy"] > 0.8, base  # the user's model learned the task
        assert comp["accuracy"] > base["accuracy"] - 0.05, (name, base, comp)
        assert m["data"]["synthetic"] is False and m["ratios"]["throughput"] > 0 and len(m["ratio_detail"]["throughput"]["rounds"]) == 5
        runner, bundle = api.load(wl, out / name, threads=1)  # the reloaded output scores what metrics.json says
        again = wl.evaluate(runner, bundle, wl.load_data(None)).quality
        assert again["accuracy"] == pytest.approx(comp["accuracy"], abs=1e-9), name
    assert results["int8-dynamic"]["compressed"]["runtime"] == "onnxruntime"
    pruned = api.load(wl, out / "title-cnn-prune-half", threads=1)[1].module
    assert pruned.conv.out_channels == 64 and pruned.head.in_features == 64  # physically narrower, consumers follow
    assert results["title-cnn-prune-half"]["ratios"]["size"] < 1.0  # the conv shrank; the word table (most bytes) did not
    assert "reloaded conv channels: 64" in capsys.readouterr().out
    assert scope["model"].conv.out_channels == 128  # the user's module was never modified


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(3, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x, extra):
        return self.out(torch.relu(self.a(x) + self.b(extra)))


def _workload(model, **kw):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)) for _ in range(4)]

    def evaluate(predict):  # mean output of the first class: any function of the model works as a metric
        return {"mean0": float(np.mean(np.concatenate([predict(b)[:, 0] for b in batches])))}

    return ModuleWorkload(model, calibration=batches[:3], test=batches, evaluate=evaluate, **kw), batches


def test_tuple_batches_map_onto_forward_arguments_and_onnx_matches_torch(tmp_path):
    torch.manual_seed(0)
    model = TwoInputs().eval()
    wl, batches = _workload(model)
    assert wl.input_names == ["x", "extra"] and wl.quality_keys == ("mean0",)
    m = api.compress(wl, MODULE, "int8-dynamic", tmp_path / "o", repeats=3, threads=1, measure_rss=False)
    with torch.no_grad():
        want = float(torch.cat([model(*b)[:, 0] for b in batches]).mean())
    assert m["baseline"]["quality"]["mean0"] == pytest.approx(want, abs=1e-6)
    assert m["compressed"]["quality"]["mean0"] == pytest.approx(want, abs=0.05)
    runner, bundle = api.load(wl, tmp_path / "o", threads=1)
    assert wl.evaluate(runner, bundle, wl.load_data(None)).quality["mean0"] == pytest.approx(m["compressed"]["quality"]["mean0"])


def test_bad_parts_are_refused_before_any_build():
    model = TwoInputs()
    with pytest.raises(SlimcartError, match="torch.nn.Module"):
        ModuleWorkload(object(), calibration=[1], test=[1], evaluate=lambda p: {"a": 1.0})
    with pytest.raises(SlimcartError, match="non-empty dict"):
        _workload(model, primary_metric=None)[0].__class__(model, calibration=[(torch.zeros(1, 6), torch.zeros(1, 3))],
                                                          test=[(torch.zeros(1, 6), torch.zeros(1, 3))], evaluate=lambda p: 3)
    with pytest.raises(SlimcartError, match="not arguments of the model's forward"):
        ModuleWorkload(model, calibration=[{"y": torch.zeros(1, 6)}], test=[{"x": torch.zeros(1, 6)}], evaluate=lambda p: {"a": 1.0})
    with pytest.raises(SlimcartError, match="3 tensors for a forward of 2"):
        ModuleWorkload(model, calibration=[(torch.zeros(1, 6),) * 3], test=[(torch.zeros(1, 6),)], evaluate=lambda p: {"a": 1.0})


def test_resize_rebuilds_pruned_layers_and_refuses_what_it_cannot():
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.Flatten(), nn.Linear(16, 4))
    small = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 4))
    resize_to(net, small.state_dict())
    net.load_state_dict(small.state_dict(), strict=True)
    x = torch.randn(2, 3, 3, 3)
    assert torch.equal(net.eval()(x), small.eval()(x))
    odd = nn.Sequential(nn.GRU(4, 8))
    with pytest.raises(SlimcartError, match="template"):
        resize_to(nn.Sequential(nn.PReLU(4)), {"0.weight": torch.zeros(2)})
    assert odd  # a layer resize_to does not know keeps its template shape (strict load reports any mismatch)
