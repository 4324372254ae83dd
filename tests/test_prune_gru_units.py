"""Hidden-unit pruning of GRUs: identity at full width, equality with 'removed units silenced' in the
unpruned model, parameter counts from the formula, importance criteria, save/load of pruned widths."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from slimcart.compress.prune.gru_units import (
    collect_hidden, gate_rows, keep_top, prune_gru_units, select_inputs, select_units, unit_importance,
)
from slimcart.errors import SlimcartError
from slimcart.models.gru4rec import GRU4Rec, GRU4RecConfig, load_gru4rec, right_align, save_gru4rec

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = torch.tensor([[3, 4, 5, 6, 0], [7, 0, 0, 0, 0], [1, 2, 3, 4, 5]])


def model(tied: bool = False, hidden=(12, 10), seed: int = 0) -> GRU4Rec:
    torch.manual_seed(seed)
    m = GRU4Rec(GRU4RecConfig(n_items=40, emb_dim=8, hidden=list(hidden), tied=tied)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1:
                p.normal_(0, 0.3)
    return m


def gru_params(inp: int, h: int) -> int:
    """nn.GRU(inp, h): three gates, each with an input matrix, a recurrent matrix and two bias vectors."""
    return 3 * (h * inp + h * h + 2 * h)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("layer", [0, 1])
def test_full_width_is_identity(tied, layer):
    m = model(tied)
    before = m(SEQ)
    name, consumers = m.unit_consumers(layer)
    H = m.get_submodule(name).hidden_size
    prune_gru_units(m, name, consumers, torch.arange(H))
    assert torch.equal(m(SEQ), before)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("layer", [0, 1])
def test_pruned_equals_unpruned_with_removed_units_silenced(tied, layer):
    """Independent reference: in the unpruned model, zero every weight that READS the removed units
    (their recurrent columns and the consumers' columns). Those units then influence nothing, so the
    outputs must equal the pruned model's."""
    m = model(tied)
    name, consumers = m.unit_consumers(layer)
    gru = m.get_submodule(name)
    keep = torch.tensor([0, 2, 3, 7, 8])
    drop = torch.tensor([j for j in range(gru.hidden_size) if j not in keep.tolist()])
    ref = model(tied)
    with torch.no_grad():
        ref.get_submodule(name).weight_hh_l0[:, drop] = 0
        for c in consumers:
            sub = ref.get_submodule(c)
            (sub.weight_ih_l0 if isinstance(sub, nn.GRU) else sub.weight)[:, drop] = 0
    prune_gru_units(m, name, consumers, keep)
    torch.testing.assert_close(m(SEQ), ref(SEQ), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_param_drop_matches_formula(tied):
    m = model(tied, hidden=(12, 10))
    n_items, D = 40, 8
    before = n_params(m)
    # last layer 10 -> 4 units; its consumer is out (Linear 10 -> n_items+1) or proj (Linear 10 -> D)
    name, consumers = m.unit_consumers(1)
    prune_gru_units(m, name, consumers, torch.tensor([1, 3, 5, 9]))
    consumer_out = D if tied else n_items + 1
    want = before - (gru_params(12, 10) - gru_params(12, 4)) - consumer_out * (10 - 4)
    assert n_params(m) == want
    # first layer 12 -> 6 units: its own GRU and the second GRU's input columns shrink
    name, consumers = m.unit_consumers(0)
    prune_gru_units(m, name, consumers, torch.arange(6))
    want -= (gru_params(D, 12) - gru_params(D, 6)) + 3 * 4 * (12 - 6)
    assert n_params(m) == want


def test_pruned_model_round_trips_through_safetensors(tmp_path):
    m = model(False, hidden=(12, 10))
    name, consumers = m.unit_consumers(1)
    prune_gru_units(m, name, consumers, torch.tensor([0, 4, 6]))
    save_gru4rec(m, tmp_path)
    loaded, cfg = load_gru4rec(tmp_path)
    assert cfg["model"]["hidden"] == [12, 3]
    assert torch.equal(loaded(SEQ), m(SEQ))


def test_gate_rows_and_select_units_by_hand():
    assert gate_rows(4, torch.tensor([1, 3])).tolist() == [1, 3, 5, 7, 9, 11]
    gru = nn.GRU(2, 4, batch_first=True)
    small = select_units(gru, torch.tensor([1, 3]))
    assert torch.equal(small.weight_hh_l0, gru.weight_hh_l0[[1, 3, 5, 7, 9, 11]][:, [1, 3]])
    assert torch.equal(small.bias_ih_l0, gru.bias_ih_l0[[1, 3, 5, 7, 9, 11]])
    lin = nn.Linear(4, 3)
    assert torch.equal(select_inputs(lin, torch.tensor([0, 2])).weight, lin.weight[:, [0, 2]])


def test_magnitude_and_activation_importance():
    torch.manual_seed(0)
    gru, out = nn.GRU(3, 6, batch_first=True), nn.Linear(6, 20)
    with torch.no_grad():  # unit 4 is read by nothing: least important by magnitude
        gru.weight_hh_l0[:, 4] = 0
        out.weight[:, 4] = 0
    mag = unit_importance(gru, [out])
    assert int(mag.argmin()) == 4
    # by hand: each block's column norms divided by their mean, summed over blocks
    w = gru.weight_hh_l0.norm(dim=0) / gru.weight_hh_l0.norm(dim=0).mean() + out.weight.norm(dim=0) / out.weight.norm(dim=0).mean()
    torch.testing.assert_close(mag, w)
    hidden = torch.ones(50, 6)
    hidden[:, 1] = 0.0  # unit 1 never activates
    act = unit_importance(gru, [out], hidden)
    assert int(act.argmin()) in (1, 4) and act[1] == 0 and act[4] == 0
    torch.testing.assert_close(act[0], w[0])  # rms 1
    assert keep_top(torch.tensor([0.5, 0.1, 0.9, 0.3]), 2).tolist() == [0, 2]


def test_collect_hidden_keeps_real_positions():
    m = model(False)
    batches = [{"seq": SEQ}]
    h = collect_hidden(m, "grus.0", batches, lambda mod, b: mod(b["seq"]), mask=lambda b: right_align(b["seq"])[0] > 0)
    assert h.shape == (4 + 1 + 5, 12)
    every = collect_hidden(m, "grus.0", batches, lambda mod, b: mod(b["seq"]))
    assert every.shape == (15, 12)
    assert not m.grus[0]._forward_hooks  # hook removed


def test_bad_inputs_are_clear_errors():
    with pytest.raises(SlimcartError, match="single-layer"):
        select_units(nn.GRU(3, 4, num_layers=2), torch.arange(2))
    with pytest.raises(SlimcartError, match="width must be 1..4"):
        keep_top(torch.ones(4), 0)
    with pytest.raises(SlimcartError, match="reads 5 inputs"):
        unit_importance(nn.GRU(3, 4), [nn.Linear(5, 2)])
    with pytest.raises(SlimcartError, match="cannot prune the inputs of Conv1d"):
        select_inputs(nn.Conv1d(4, 2, 1), torch.arange(2))
    with pytest.raises(SlimcartError, match="hidden_states must be"):
        unit_importance(nn.GRU(3, 4), [], torch.ones(5, 3))
    assert np.isfinite(unit_importance(nn.GRU(3, 4), []).numpy()).all()
