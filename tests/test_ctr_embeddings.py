"""The ctr workload under the embedding recipes: every emb-* recipe compresses a DIN's tables through
api.build (frequencies from the checkpoint's saved counts), recovery after the trainable techniques
trains on the BCE task loss, and the saved folder reloads (api.load) to the in-memory model's logits
without its float tables; ctr-int8 runs the MLP on torch's dynamic int8 kernel and reloads."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from slimcart import api
from slimcart.models.ctr import DIN, DINConfig, save_din
from slimcart.recipe import load_recipe
from slimcart.workloads import get_workload
from slimcart.workloads.ctr_data import behaviour_data

pytestmark = pytest.mark.usefixtures("one_thread")
RECIPES = ["emb-int8", "emb-int4", "emb-int2-mixed", "emb-qr", "emb-mixed-dim", "emb-tt", "emb-pq"]


@pytest.fixture(scope="module")
def data():
    """A behaviour log big enough for 256-centroid codebooks: 320 users over 420 items."""
    rng = np.random.default_rng(0)
    popularity = rng.zipf(1.5, 420).astype(float)
    histories = [rng.choice(np.arange(1, 421), rng.integers(5, 14), replace=False, p=popularity / popularity.sum())
                 for _ in range(320)]
    return behaviour_data(histories, 420, "test-log", synthetic=True)


@pytest.fixture(scope="module")
def din_folder(data, tmp_path_factory):
    torch.manual_seed(0)
    model = DIN(DINConfig(tables=data.tables, fields=data.fields, dim=16, history_table="item", target_field=1,
                          attention_hidden=[8], mlp_hidden=[16, 8], max_len=12)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if name.startswith("emb_") else 0.5)
    folder = tmp_path_factory.mktemp("din")
    save_din(model, folder, {"dataset": "test-log"}, data.frequencies)
    return folder


def small(recipe: str):
    """The recipe with its recovery cut to a few steps and its row threshold off (test tables are small)."""
    rec = load_recipe(recipe)
    steps = []
    for s in rec.steps:
        if s.kind == "recover":
            s = s.model_copy(update={"steps": 12, "calibration_batches": 3})
        if s.kind == "compress_embeddings":
            s = s.model_copy(update={"min_rows": 0})
        steps.append(s)
    return rec.model_copy(update={"steps": steps})


@pytest.mark.parametrize("recipe", RECIPES)
def test_emb_recipes_compress_din_and_reload(recipe, data, din_folder, tmp_path):
    wl = get_workload("ctr")
    bundle = wl.load_model(str(din_folder))
    built = api.build(wl, str(din_folder), small(recipe), threads=1, loaded=(bundle, data), workdir=tmp_path / "w")
    rep = built.state.reports["compress_embeddings"]
    assert set(rep["tables"]) == {"emb_user", "emb_item"} and rep["bytes_after"] < rep["bytes_before"]
    assert rep["bytes_before"] == 4 * 16 * (data.tables["user"] + data.tables["item"])
    assert ("recover" in built.state.reports) == (recipe in ("emb-qr", "emb-mixed-dim", "emb-tt"))
    if "recover" in built.state.reports:  # the trainable tables were fine-tuned on the BCE task loss
        rec = built.state.reports["recover"]
        assert rec["steps"] == 12 and rec["loss_last_10pct"] < rec["loss_first_10pct"]
    built.state.save(tmp_path / "out", wl)
    with safe_open(str(tmp_path / "out" / "model" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("emb_")]  # no float table left on disk
    runner, loaded = api.load(wl, tmp_path / "out", threads=1)
    batch = data.batch(data.test, np.arange(len(data.test)), 12)
    want = wl.torch_runner(built.state.bundle)(batch)
    np.testing.assert_allclose(runner(batch), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(want, wl.torch_runner(bundle)(batch), atol=1e-4)  # the tables really changed
    q = wl.evaluate(runner, loaded, data).quality
    assert set(q) == set(wl.quality_keys)


def test_table_frequencies_come_from_the_saved_counts(data, din_folder):
    wl = get_workload("ctr")
    bundle = wl.load_model(str(din_folder))
    counts = wl.table_frequencies(bundle, data)
    assert set(counts) == {"emb_user", "emb_item"}
    assert counts["emb_item"].tolist() == data.frequencies["emb_item"].tolist()
    other = behaviour_data([np.array([1, 2, 3, 4, 5])] * 320, 420, "other", synthetic=True)  # same shapes, other counts
    assert wl.table_frequencies(bundle, other)["emb_item"].tolist() == counts["emb_item"].tolist()  # the checkpoint's


def _int8_linears(model):
    import torch.ao.nn.quantized.dynamic as nnqd

    return {n: m for n, m in model.named_modules() if type(m) is nnqd.Linear}


def _int8_state(lin):
    """(int8 codes, per-row scales, bias) of a dynamic int8 Linear, read back from its packed weights."""
    from slimcart.compress.quantize.dynamic_int8 import module_state

    t = module_state(lin)[0]
    return t["weight.int8"], t["weight.scale"].float(), t.get("bias")


def test_ctr_int8_runs_int8_kernels_and_reloads(data, din_folder, tmp_path):
    wl = get_workload("ctr")
    bundle = wl.load_model(str(din_folder))
    built = api.build(wl, str(din_folder), "ctr-int8", threads=1, loaded=(bundle, data), workdir=tmp_path / "w")
    model = built.state.bundle.module
    layers = _int8_linears(model)
    assert sorted(layers) == ["attention.0", "mlp.0", "mlp.2"]  # the 1-output heads stay float
    assert isinstance(model.mlp[-1], torch.nn.Linear) and any("dynamic int8" in k for k in built.state.kernels)
    # the int8 layer computes x W^T + b with int8 weights: within the quantization error of both operands
    lin = bundle.module.mlp[0]
    x = torch.randn(64, lin.in_features)
    q, scales, bias = _int8_state(layers["mlp.0"])
    assert q.dtype == torch.int8 and q.abs().max() >= 127
    with torch.no_grad():
        want = lin(x)
        deq = x @ (q.float() * scales[:, None]).t() + bias
        got = layers["mlp.0"](x)
    bound = (x.abs().amax(1, keepdim=True) / 127) * (q.float() * scales[:, None]).abs().sum(1)  # activation rounding
    assert ((got - deq).abs() <= bound + 1e-4).all() and (got - want).abs().max() < 0.05 * want.abs().max()
    batch = data.batch(data.test, np.arange(len(data.test)), 12)
    fp32 = wl.torch_runner(bundle)(batch)
    mem = wl.torch_runner(built.state.bundle)(batch)
    assert np.corrcoef(fp32, mem)[0, 1] > 0.99
    built.state.save(tmp_path / "out", wl)
    weights = [f for f in (tmp_path / "out").rglob("model.safetensors")]
    assert weights
    with safe_open(str(weights[0]), "pt") as f:
        keys = set(f.keys())
    assert not {"mlp.0.weight", "mlp.2.weight", "attention.0.weight"} & keys and "mlp.4.weight" in keys
    runner, loaded = api.load(wl, tmp_path / "out", threads=1)
    assert sorted(_int8_linears(loaded.module)) == sorted(layers)
    np.testing.assert_array_equal(runner(batch), mem)
    for name, lin in _int8_linears(loaded.module).items():  # the same int8 weights came back
        assert all(torch.equal(a, b) for a, b in zip(_int8_state(lin), _int8_state(layers[name])))
