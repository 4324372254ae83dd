"""Low-rank factorization: exactness at full rank, Eckart–Young error, rank choice, save/reload/ONNX."""
import numpy as np
import pytest
import torch
from torch import nn

from slimcart.contracts import load_saved
from slimcart.recipe import load_plugins
from slimcart.compress import lowrank as LR
from slimcart.contracts import ModelState, StepContext
from slimcart.errors import SlimcartError
from slimcart.workloads import get_workload


pytestmark = pytest.mark.usefixtures("one_thread")


def _linear(out_f=8, in_f=5, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f)


def test_full_rank_reproduces_the_layer():
    lin = _linear()
    fac = LR.factorize_layer(lin, 5)
    x = torch.randn(7, 5)
    assert isinstance(fac.down, nn.Linear) and isinstance(fac.up, nn.Linear)
    assert torch.allclose(fac(x), lin(x), atol=1e-5)
    assert (fac.in_features, fac.out_features, fac.rank) == (5, 8, 5)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_truncation_error_is_the_discarded_singular_values(rank):
    lin = _linear()
    W = lin.weight.detach().numpy().astype(np.float64)
    sigma = np.linalg.svd(W, compute_uv=False)  # numpy, independent of the torch SVD used inside
    fac = LR.factorize_layer(lin, rank)
    err = np.linalg.norm(W - (fac.up.weight @ fac.down.weight).detach().numpy(), "fro")
    assert err == pytest.approx(np.sqrt(np.sum(sigma[rank:] ** 2)), rel=1e-4)
    assert torch.equal(fac.up.bias, lin.bias)  # the bias is carried, not approximated


def test_embedding_factorization():
    torch.manual_seed(1)
    emb = nn.Embedding(20, 6, padding_idx=0)
    sigma = np.linalg.svd(emb.weight.detach().numpy().astype(np.float64), compute_uv=False)
    fac = LR.factorize_layer(emb, 3)
    ids = torch.tensor([[1, 5, 19]])
    assert fac(ids).shape == (1, 3, 6) and fac.weight.shape == (20, 6)
    err = np.linalg.norm(emb.weight.detach().numpy() - fac.weight.detach().numpy(), "fro")
    assert err == pytest.approx(np.sqrt(np.sum(sigma[3:] ** 2)), rel=1e-4)
    assert torch.allclose(LR.factorize_layer(emb, 6)(ids), emb(ids), atol=1e-5)


def test_rank_larger_than_layer_is_an_error():
    with pytest.raises(SlimcartError, match="outside 1..5"):
        LR.factorize_layer(_linear(), 6)
    with pytest.raises(SlimcartError, match="outside"):
        LR.factorize_layer(_linear(), 0)


def test_rank_for_energy_by_hand():
    s = np.array([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14: cumulative 0.643, 0.929, 1
    assert LR.rank_for_energy(s, 0.6) == 1
    assert LR.rank_for_energy(s, 0.9) == 2
    assert LR.rank_for_energy(s, 0.95) == 3


def test_budget_allocation_meets_budget_and_follows_sensitivity():
    layers = {"a": _linear(64, 64, 1), "b": _linear(64, 64, 1)}  # identical spectra
    energy = LR.energy_curve(LR.spectrum(layers["a"]))
    assert energy[0] == pytest.approx(1.0) and energy[-1] == 0.0 and np.all(np.diff(energy) <= 0)
    ranks = LR.allocate_budget(layers, {"a": energy, "b": 10 * energy}, keep=0.5, granularity=4)
    kept = sum(LR.lowrank_params(layers[n], r) if r else LR.dense_params(layers[n]) for n, r in ranks.items())
    assert kept <= 0.5 * 2 * 64 * 64
    assert ranks["b"] > ranks["a"]  # the sensitive layer keeps more rank
    # equal curves: the same rank for both (no layer is starved while another stays dense)
    even = LR.allocate_budget(layers, {"a": energy, "b": energy}, keep=0.5, granularity=4)
    assert abs(even["a"] - even["b"]) <= 4
    with pytest.raises(SlimcartError, match="cannot reach"):
        LR.allocate_budget(layers, {"a": energy, "b": energy}, keep=0.01, granularity=16)


def test_measured_damage_curves(tiny_encoder_dir, synthetic_data):
    wl = get_workload("search")
    b = wl.load_model(str(tiny_encoder_dir))
    from slimcart.arch import LayerSelect

    layers = LayerSelect(targets=["*layer.0.attention.self.query", "*layer.1.output.dense"]).pick(b.module, untied=True)
    batches = wl.calibration_batches(b, wl.load_data(None), 2)
    before = {k: v.clone() for k, v in b.module.state_dict().items()}
    curves = LR.damage_curves(b.module, layers, batches)
    for name, c in curves.items():
        assert len(c) == 65 and c[-1] == 0 and c[0] > 0 and np.all(np.diff(c) <= 1e-12), name
    for k, v in b.module.state_dict().items():  # weights restored exactly
        assert torch.equal(v, before[k])


def _ctx(wl, data, tmp_path):
    return StepContext(workload=wl, data=data, workdir=tmp_path, threads=1)


def test_lowrank_step_saves_reloads_and_exports(tmp_path, tiny_encoder_dir, synthetic_data):
    from slimcart.recipe import parse_step
    from slimcart.runtime.onnx_runtime import OnnxRunner

    wl = get_workload("search")
    bundle = wl.load_model(str(tiny_encoder_dir))
    data = wl.load_data(None)
    state = ModelState(bundle=bundle)
    step = parse_step({"kind": "lowrank", "targets": ["*encoder.layer.*"], "keep_params": 0.5, "granularity": 4,
                       "sensitivity": "measured", "calibration_batches": 1})
    state = step.apply(state, _ctx(wl, data, tmp_path))
    info = state.reports["lowrank"]
    assert info["params_after"] <= 0.5 * info["params_before"]
    assert any(isinstance(m, LR.LowRankLinear) for m in bundle.module.modules())
    batch = wl.example_batch(bundle)
    want = wl.torch_runner(bundle)(batch)

    folder = tmp_path / "saved"
    state.save(folder, wl)
    runner, again = load_saved(folder, wl, 1)
    assert LR.factorized_ranks(again.module) == LR.factorized_ranks(bundle.module)
    np.testing.assert_allclose(runner(batch), want, atol=1e-5)

    from slimcart.runtime.onnx_runtime import export_onnx

    spec = wl.export_spec(bundle)
    path = export_onnx(bundle.module, spec["example"], tmp_path / "m.onnx", spec["dynamic_axes"], spec["output_name"])
    np.testing.assert_allclose(OnnxRunner(path, threads=1)(batch), want, atol=1e-4)


def test_lowrank_overrides_and_bad_rank(tmp_path, tiny_encoder_dir, synthetic_data):
    from slimcart.recipe import parse_step

    wl = get_workload("search")
    bundle = wl.load_model(str(tiny_encoder_dir))
    ctx = _ctx(wl, wl.load_data(None), tmp_path)
    step = parse_step({"kind": "lowrank", "targets": ["*encoder.layer.*"], "mode": "energy", "energy": 0.99,
                       "overrides": {"*intermediate.dense": {"rank": 16}, "*.query": {"skip": True}}})
    step.apply(ModelState(bundle=bundle), ctx)
    ranks = LR.factorized_ranks(bundle.module)
    assert all(r == 16 for n, r in ranks.items() if n.endswith("intermediate.dense"))
    assert not any(n.endswith(".query") for n in ranks)
    bad = parse_step({"kind": "lowrank", "overrides": {"*intermediate.dense": {"rank": 999}}})
    with pytest.raises(SlimcartError, match="rank 999"):
        bad.apply(ModelState(bundle=wl.load_model(str(tiny_encoder_dir))), ctx)
    with pytest.raises(SlimcartError, match="no Linear"):
        parse_step({"kind": "lowrank", "targets": ["nothing*"]}).apply(ModelState(bundle=bundle), ctx)


def test_sasrec_embedding_factorization_round_trip(tmp_path):
    from slimcart.models.sasrec import SASRec, SASRecConfig, save_sasrec

    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=40, max_len=8, hidden=16, heads=2, layers=1, dropout=0.0)).eval()
    src = tmp_path / "src"
    src.mkdir()
    save_sasrec(model, src)
    wl = get_workload("recsys")
    bundle = wl.load_model(str(src))
    LR.factorize(bundle.module, {"item_emb": 8, "blocks.0.fc1": 4})
    seq = {"seq": np.array([[0, 0, 0, 3, 4, 5, 6, 7]])}
    want = wl.torch_runner(bundle)(seq)
    (tmp_path / "out").mkdir()
    LR.LowRankFolder().save(tmp_path / "out", wl, bundle)
    load_plugins()
    runner, again = load_saved(tmp_path / "out", wl, 1)
    assert isinstance(again.module.item_emb, LR.LowRankEmbedding)
    np.testing.assert_allclose(runner(seq), want, atol=1e-5)
