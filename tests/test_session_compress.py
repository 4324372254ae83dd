"""Compressing the session model (GRU4Rec): torch dynamic int8 GRU/Linear and its saved format, compressed
item tables scored through `scores(h)` and trained through their lookup, hidden-unit pruning as a step,
narrow students for distillation, table frequencies, and the built-in gru-* recipes end to end
(built, saved, reloaded through api.load)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from slimcart import api
from slimcart.compress.distill.students import narrow_gru4rec, project_item_table
from slimcart.compress.embeddings import compress_embeddings_
from slimcart.compress.quantize.dynamic_int8 import (
    module_from_state,
    module_state,
    quantize_module,
)
from slimcart.contracts import FORMAT_FILE, ModelBundle
from slimcart.errors import SlimcartError
from slimcart.models.gru4rec import GRU4Rec, GRU4RecConfig, next_item_loss
from slimcart.recipe import load_recipe, parse_recipe
from slimcart.workloads import get_workload

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def wl():
    return get_workload("session")


@pytest.fixture(scope="module")
def data(wl):
    import os

    old = os.environ.pop("SLIMCART_DATA", None)
    try:
        return wl.load_data(None)  # synthetic sessions: 240 items in learnable series
    finally:
        if old is not None:
            os.environ["SLIMCART_DATA"] = old


def tiny(n_items: int, tied: bool = True, hidden=(12, 10), emb: int = 16, seed: int = 0) -> GRU4Rec:
    torch.manual_seed(seed)
    m = GRU4Rec(GRU4RecConfig(n_items=n_items, emb_dim=emb, hidden=list(hidden), tied=tied, max_len=10)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1:
                p.normal_(0, 0.3)
    return m


def bundle_of(m: GRU4Rec) -> ModelBundle:
    return ModelBundle(name="tiny", module=m, source=None, extra={"config": {"model_type": "gru4rec"}})


def build_save_load(wl, data, model, steps, tmp_path, name="m"):
    built = api.build(wl, "tiny", parse_recipe({"name": name, "steps": steps}), threads=1, workdir=tmp_path / f"w-{name}",
                      loaded=(bundle_of(model), data))
    built.state.save(tmp_path / name, wl)
    runner, bundle = api.load(wl, tmp_path / name, 1)
    return built.state, runner, bundle


def batches():
    return [{"seq": np.array([[3, 7, 7, 1, 0, 0], [12, 0, 0, 0, 0, 0], [5, 6, 7, 8, 9, 10]])},
            {"seq": np.array([[0, 0, 4, 5], [9, 8, 7, 6]])}]


# ---------------------------------------------------------------- dynamic int8
def test_int8_weights_are_the_rounded_per_row_values(wl):
    """int8 codes equal round(W / s) with s = max|W_row| / 127.5 (symmetric, per output row), by hand."""
    torch.manual_seed(0)
    gru = nn.GRU(6, 5, batch_first=True)
    q = quantize_module(gru, per_channel=True)
    tensors, meta = module_state(q)
    for name in ("weight_ih_l0", "weight_hh_l0"):
        w = getattr(gru, name).detach().double()
        scale = w.abs().amax(1) / 127.5
        torch.testing.assert_close(tensors[f"{name}.scale"], scale)
        units = w / scale[:, None]
        want = torch.clamp(torch.round(units), -128, 127).to(torch.int8)
        edge = units.abs() > 127.5 - 1e-6  # each row's largest weight sits at +-127.5: either neighbour is right
        got = tensors[f"{name}.int8"]
        assert torch.equal(got[~edge], want[~edge]) and bool((got[edge].to(torch.int16).abs() >= 127).all())
    assert meta == {"type": "gru", "input_size": 6, "hidden_size": 5, "num_layers": 1, "bidirectional": False,
                    "batch_first": True, "per_channel": True}
    x = torch.randn(4, 7, 6)
    with torch.inference_mode():  # int8 kernels: close to float, and the rebuilt module is the same function
        out_q, out_f = q(x)[0], gru(x)[0]
        assert 0 < (out_q - out_f).abs().max() < 0.05
        assert torch.equal(module_from_state(tensors, meta)(x)[0], out_q)


@pytest.mark.parametrize("kind", ["lstm", "linear"])
def test_lstm_and_linear_round_trip(kind):
    torch.manual_seed(1)
    m = nn.LSTM(5, 4, num_layers=2, bidirectional=True, batch_first=True) if kind == "lstm" else nn.Linear(5, 3)
    q = quantize_module(m, per_channel=False)
    rebuilt = module_from_state(*module_state(q))
    x = torch.randn(2, 3, 5)
    with torch.inference_mode():
        a, b = q(x), rebuilt(x)
    assert torch.equal(a[0] if kind == "lstm" else a, b[0] if kind == "lstm" else b)


@pytest.mark.parametrize("tied", [True, False])
def test_dynamic_int8_step_saves_int8_only_and_reloads_the_same_model(wl, data, tmp_path, tied):
    model = tiny(data.n_items, tied)
    layers = ["gru", "linear"]
    state, runner, bundle = build_save_load(wl, data, model, [{"kind": "torch_dynamic_int8", "layers": layers}], tmp_path)
    names = ["grus.0", "grus.1", "proj" if tied else "out"]
    assert state.reports["torch_dynamic_int8"]["layers"] == names and "dynamic int8" in state.kernels[0]
    for b in batches():
        assert np.array_equal(runner(b), wl.torch_runner(state.bundle)(b))  # reloaded == built
        assert np.abs(runner(b) - wl.torch_runner(bundle_of(model))(b)).max() < 0.1  # int8 close to float
    meta = json.loads((tmp_path / "m" / FORMAT_FILE).read_text())
    assert meta["format"] == "torch-dynamic-int8" and sorted(meta["modules"]) == sorted(names)
    with safe_open(str(tmp_path / "m" / "model" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.split(".")[0] in ("grus", "proj", "out")]  # no float copies left
    with safe_open(str(tmp_path / "m" / "dynamic_int8.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if k.endswith(".int8")} == {torch.int8}
    assert not list((tmp_path / "m").rglob("*.pt")) and not list((tmp_path / "m").rglob("*.bin"))


def test_dynamic_int8_must_be_last_and_finds_layers(wl, data, tmp_path):
    with pytest.raises(SlimcartError, match="last step"):
        build_save_load(wl, data, tiny(data.n_items), [{"kind": "torch_dynamic_int8"}, {"kind": "prune_gru_units"}], tmp_path)
    with pytest.raises(SlimcartError, match="no gru layer matches"):
        build_save_load(wl, data, tiny(data.n_items), [{"kind": "torch_dynamic_int8", "layers": ["gru"], "targets": ["x*"]}],
                        tmp_path)


def test_tampered_int8_folder_is_one_clear_error(wl, data, tmp_path):
    build_save_load(wl, data, tiny(data.n_items), [{"kind": "torch_dynamic_int8"}], tmp_path)
    fmt = tmp_path / "m" / FORMAT_FILE
    meta = json.loads(fmt.read_text())
    for change, msg in [({"modules": {"grus.0": {**meta["modules"]["grus.0"], "hidden_size": 10**6}}}, "missing or not int8"),
                        ({"modules": {"nope": meta["modules"]["grus.0"]}}, "missing or not int8"),
                        ({"model_dir": "../x"}, "outside"),
                        ({"stand_ins": [{"key": "grus.0.weight_ih_l0", "shape": [1, 1], "file": "model.safetensors"}]}, "shape")]:
        fmt.write_text(json.dumps({**meta, **change}))
        with pytest.raises(SlimcartError, match=msg):
            api.load(wl, tmp_path / "m", 1)


# ---------------------------------------------------------------- compressed item tables
def test_compressed_table_scores_and_trains_through_its_own_kernels(data):
    model = tiny(data.n_items, tied=True)
    seq = torch.from_numpy(batches()[0]["seq"])
    rep = compress_embeddings_(model, {"method": "rowwise", "bits": 8})
    table = model.item_emb.dequantize()
    with torch.no_grad():  # scores = E_q (P h) + b with the dequantized rows, by hand
        h, n = model.encode(seq)
        last = h[torch.arange(3), n - 1]
        torch.testing.assert_close(model(seq), last @ table.T + model.out_bias, atol=1e-4, rtol=1e-4)
    assert rep["bytes_after"] == (data.n_items + 1) * (16 + 8)  # 16 int8 codes + float32 scale and offset per row
    qr = tiny(data.n_items, tied=True)  # a trainable compressed table (quotient-remainder) recovers through lookups
    compress_embeddings_(qr, {"method": "qr", "collisions": 4})
    opt = torch.optim.Adam([p for p in qr.parameters() if p.requires_grad], 0.02)
    inp, tgt = seq[:, :-1], seq[:, 1:] * (seq[:, :-1] > 0)
    with torch.no_grad():
        first = float(next_item_loss(qr, inp, tgt, data.n_items, None, None))
    for step in range(40):  # sampled softmax: rows looked up through the table's forward
        opt.zero_grad()
        next_item_loss(qr, inp, tgt, 64, None, torch.Generator().manual_seed(step)).backward()
        if step == 0:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in qr.item_emb.parameters() if p.requires_grad)
        opt.step()
    with torch.no_grad():
        assert float(next_item_loss(qr, inp, tgt, data.n_items, None, None)) < 0.7 * first


def test_table_frequencies_are_training_click_counts(wl, tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    sessions = ["1 2 2", "3 1"] * 10 + ["4 5"]  # the newest 10% (2 sessions: "3 1"... "4 5") validate
    (folder / "train_sessions.txt").write_text("\n".join(sessions) + "\n")
    (folder / "test_prefixes.tsv").write_text("prefix\ttarget\n1\t6\n")
    d = wl.load_data(str(folder))
    counts = wl.table_frequencies(bundle_of(tiny(6)), d)["item_emb"]
    train = sessions[:-2]  # validation = the newest 2 sessions
    want = np.bincount(np.array([int(x) for s in train for x in s.split()]), minlength=7)
    assert counts.tolist() == want.tolist() and counts[4] == 0 and counts[5] == 0


def test_mixed_precision_recipe_uses_the_frequencies(wl, data, tmp_path):
    state, runner, bundle = build_save_load(wl, data, tiny(data.n_items), load_recipe("gru-emb-mixed-int8").to_dict()["steps"],
                                            tmp_path)
    freq = wl.table_frequencies(bundle_of(tiny(data.n_items)), data)["item_emb"]
    held = bundle.module.item_emb.tier_ids[0].ids.long().numpy()
    hot = np.sort(np.argsort(-freq, kind="stable")[: round(0.1 * len(freq))])
    assert held.tolist() == hot[freq[hot] > 0].tolist()  # the 10% most clicked items hold int8 rows
    for b in batches():
        assert np.array_equal(runner(b), wl.torch_runner(state.bundle)(b))


# ---------------------------------------------------------------- pruning and distillation students
def test_prune_gru_units_step_by_magnitude(wl, data, tmp_path):
    model = tiny(data.n_items, hidden=(12, 10))
    steps = [{"kind": "prune_gru_units", "units": 0.5, "criterion": "magnitude", "overrides": {"grus.1": 0.3}}]
    state, runner, bundle = build_save_load(wl, data, model, steps, tmp_path)
    assert [g.hidden_size for g in bundle.module.grus] == [6, 7] and bundle.module.proj.in_features == 7
    assert state.teacher is None  # nothing trains after it: no teacher copy kept
    # layer 0's kept units: the 6 largest of ||W_hh[:, j]|| / mean + ||W_ih(layer 1)[:, j]|| / mean, by hand
    w_hh, w_next = model.grus[0].weight_hh_l0.detach().numpy(), model.grus[1].weight_ih_l0.detach().numpy()
    score = np.linalg.norm(w_hh, axis=0) / np.linalg.norm(w_hh, axis=0).mean() + \
        np.linalg.norm(w_next, axis=0) / np.linalg.norm(w_next, axis=0).mean()
    assert state.reports["prune_gru_units"]["layers"]["grus.0"]["kept"] == sorted(np.argsort(-score)[:6].tolist())
    for b in batches():
        assert np.array_equal(runner(b), wl.torch_runner(state.bundle)(b))
    with pytest.raises(SlimcartError, match="GRU structure"):
        from slimcart.arch import recurrent

        recurrent(nn.Linear(2, 2))


def test_projected_item_table_is_exact_for_a_low_rank_table(data):
    for tied in (True, False):
        model = tiny(data.n_items, tied=tied)
        with torch.no_grad():  # a rank-6 table: projecting it on 6 directions loses nothing
            g = torch.Generator().manual_seed(3)
            model.item_emb.weight.copy_(torch.randn(data.n_items + 1, 6, generator=g) @ torch.randn(6, 16, generator=g))
            model.item_emb.weight[0].zero_()
        student = project_item_table(model, 6)
        assert student.item_emb.weight.shape == (data.n_items + 1, 6) and student.config.emb_dim == 6
        with torch.no_grad():
            for b in batches():
                seq = torch.as_tensor(b["seq"])
                torch.testing.assert_close(student(seq), model(seq), atol=1e-4, rtol=1e-4)


def test_narrow_student_halves_widths_and_starts_near_the_teacher(wl, data):
    teacher = tiny(data.n_items, hidden=(12, 10))
    cal = wl.calibration_batches(bundle_of(teacher), data, 4)
    student = narrow_gru4rec(teacher, 0.5, "prune", cal)
    assert student.item_emb.embedding_dim == 8 and [g.hidden_size for g in student.grus] == [6, 5]
    assert sum(p.numel() for p in student.parameters()) < 0.55 * sum(p.numel() for p in teacher.parameters())
    fresh = narrow_gru4rec(teacher, 0.5, "pca", None, seed=0)
    assert [g.hidden_size for g in fresh.grus] == [6, 5]
    seq = torch.as_tensor(batches()[0]["seq"])
    with torch.no_grad():  # the pruned start is closer to the teacher's scores than fresh GRUs
        t = teacher(seq)
        assert (student(seq) - t).pow(2).mean() < (fresh(seq) - t).pow(2).mean()
    with pytest.raises(SlimcartError, match="embedding size"):
        narrow_gru4rec(teacher, 0.01, "prune", cal)


# ---------------------------------------------------------------- built-in recipes end to end
@pytest.mark.parametrize("name", ["gru-int8", "gru-emb-int4-int8", "gru-prune-units", "gru-distill-half"])
def test_builtin_recipes_build_save_and_reload(wl, data, tmp_path, name, monkeypatch):
    monkeypatch.setenv("SLIMCART_HOME", str(tmp_path / "home"))
    steps = load_recipe(name).to_dict()["steps"]
    for s in steps:  # the same recipe with a test-sized training budget
        if s["kind"] == "distill":
            s["train"].update(max_steps=6, eval_every=3, batch_size=32)
    model = tiny(data.n_items)
    state, runner, bundle = build_save_load(wl, data, model, steps, tmp_path, name)
    for b in batches():
        assert np.array_equal(runner(b), wl.torch_runner(state.bundle)(b))
    res = wl.evaluate(runner, bundle, data)
    assert 0 <= res.quality["hr@20"] <= 1 and len(res.outputs["ranks"]) == data.info.n
    if name == "gru-distill-half":
        assert bundle.module.item_emb.embedding_dim == 8 and [g.hidden_size for g in bundle.module.grus] == [6, 5]
    if name == "gru-prune-units":
        assert [g.hidden_size for g in bundle.module.grus] == [6, 5] and state.teacher is None
