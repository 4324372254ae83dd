"""ctr workload: metrics and bootstrap by hand, DIN-protocol / libFM / Criteo parsing, the DIN model
(save/load, table swapping, ONNX), task loss, distillation task, training and resume, bad input."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from slimcart.contracts import DistillOptions
from slimcart.errors import SlimcartError
from slimcart.models.ctr import (
    DIN,
    DINConfig,
    load_din,
    load_frequencies,
    parameter_bytes,
    save_din,
)
from slimcart.workloads import get_workload
from slimcart.workloads.ctr_data import behaviour_data, stratified_holdout
from slimcart.workloads.ctr_metrics import (
    _resample_weights,
    auc,
    bootstrap_auc,
    calibration,
    ece,
    logloss,
    paired_bootstrap_auc,
    weighted_auc,
)

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = {"dim": 8, "batch": 128, "patience": 100, "max_len": 12}


@pytest.fixture
def workload():
    return get_workload("ctr")


@pytest.fixture
def synth(workload, monkeypatch):
    monkeypatch.delenv("SLIMCART_DATA", raising=False)
    return workload.load_data(None)


def tiny_din(tables, fields, history=None, target=None, n_dense=0, seed=0) -> DIN:
    torch.manual_seed(seed)
    cfg = DINConfig(tables=tables, fields=fields, dim=8, history_table=history, target_field=target, n_dense=n_dense,
                    attention_hidden=[8], mlp_hidden=[16, 8])
    model = DIN(cfg).eval()
    with torch.no_grad():  # spread the tiny init so that outputs differ visibly between rows
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def bundle_of(model):
    from slimcart.contracts import ModelBundle

    return ModelBundle("tiny", model, None, extra={"config": {"model_type": "ctr-din", "model": model.config.to_dict()}})


# ---------------------------------------------------------------- metrics
def test_auc_logloss_ece_by_hand():
    y = np.array([1, 0, 1, 0, 0])
    z = np.array([2.0, 0.0, 0.0, -1.0, 0.0])  # click 0.0 ties two non-clicks at 0.0
    # pairs (click, non-click): 2.0 beats all 3; 0.0 ties two (1/2 each) and beats -1.0 -> (3 + 2) / 6
    assert auc(y, z) == pytest.approx(5 / 6)
    p = 1 / (1 + np.exp(-z))
    hand = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert logloss(y, z) == pytest.approx(hand, rel=1e-12)
    assert calibration(y, z) == pytest.approx(p.mean() / 0.4)
    # 5 bins of one row each: ECE = mean |p - y|
    assert ece(y, z, bins=5) == pytest.approx(np.mean(np.abs(p - y)))
    # one bin: |mean p - mean y|
    assert ece(y, z, bins=1) == pytest.approx(abs(p.mean() - 0.4))
    assert math.isnan(auc([1, 1], [0.1, 0.2]))  # one class only
    assert auc([1, 0], [np.nan, 0.0]) == 0.0  # a NaN prediction ranks last


def test_auc_and_logloss_match_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    z = np.round(rng.normal(size=500) + y, 1)  # rounding makes many ties
    assert auc(y, z) == pytest.approx(sk.roc_auc_score(y, z), abs=1e-12)
    assert logloss(y, z) == pytest.approx(sk.log_loss(y, 1 / (1 + np.exp(-z))), rel=1e-9)


def brute_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    return ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))


def test_weighted_auc_is_auc_of_repeated_rows():
    rng = np.random.default_rng(1)
    y, s = rng.integers(0, 2, 40), np.round(rng.normal(size=40), 1)
    groups = rng.integers(0, 12, 40)
    w = next(_resample_weights(40, groups, 3, rng, chunk=3))
    assert w.shape == (3, 40) and (w.sum(1) > 0).all()
    for g in np.unique(groups):  # a group is drawn whole: its rows share one weight
        assert (w[:, groups == g] == w[:, groups == g][:, :1]).all()
    got = weighted_auc(y, s, w)
    for k in range(3):
        assert got[k] == pytest.approx(brute_auc(np.repeat(y, w[k]), np.repeat(s, w[k])), abs=1e-12)
    rows = next(_resample_weights(40, None, 1, rng, chunk=1))
    assert rows.sum() == 40  # row bootstrap: n draws


def test_paired_bootstrap_hand_checked():
    y = np.array([1, 0] * 20)
    good = np.where(y == 1, 1.0, 0.0)
    bad = 1.0 - good
    r = paired_bootstrap_auc(y, bad, good, resamples=200)
    # every resample with both classes: AUC(good) = 1, AUC(bad) = 0
    assert r["delta"] == 1.0 and r["ci95"] == [1.0, 1.0] and r["resamples"] == 200
    same = paired_bootstrap_auc(y, good * 0.3, good * 0.3 + 0.1)  # same ranking -> no difference, ever
    assert same["delta"] == 0.0 and same["ci95"] == [0.0, 0.0]
    rng = np.random.default_rng(0)
    noisy = y + rng.normal(0, 1.0, len(y))
    one = bootstrap_auc(y, noisy, resamples=500)
    assert one["ci95"][0] < one["auc"] < one["ci95"][1]  # a real spread around the point estimate
    with pytest.raises(ValueError):
        paired_bootstrap_auc(y, good, good[:-1])


def test_stratified_holdout_keeps_label_share():
    y = np.array([1] * 10 + [0] * 90)
    m = stratified_holdout(y, 0.2)
    assert m.sum() == 20 and y[m].sum() == 2


# ---------------------------------------------------------------- data
def test_din_protocol_on_a_hand_written_log():
    # user 0: items 1 2 3 4 5; user 1: 3 1 2 (eval only); user 2: 4 5 (too short: train only)
    histories = [np.array([1, 2, 3, 4, 5]), np.array([3, 1, 2]), np.array([4, 5])]
    d = behaviour_data(histories, 6, "hand", synthetic=False)
    assert d.tables == {"user": 4, "item": 7} and d.fields == ["user", "item"]
    # train positives: user 0 targets t=1,2 (items 2,3); user 1 none; user 2 t=1 (item 5)
    assert d.train.sparse.tolist() == [[1, 2], [1, 3], [3, 5]] and d.train.end.tolist() == [1, 2, 1]
    assert d.valid.label.tolist() == [1, 1, 0, 0] and d.valid.sparse[:2].tolist() == [[1, 4], [2, 1]]
    assert d.test.sparse[:2].tolist() == [[1, 5], [2, 2]]
    b = d.batch(d.test, np.arange(4), max_len=3, labels=True)
    assert b["hist"].tolist() == [[2, 3, 4], [0, 3, 1], [2, 3, 4], [0, 3, 1]]  # newest 3, left-padded
    for u, item in zip(d.test.user[2:], d.test.sparse[2:, 1]):  # negatives: items the user never touched
        assert item not in histories[u] and 1 <= item <= 6
    assert d.test.user[2:].tolist() == [0, 1] and (d.test.sparse[2:, 0] == [1, 2]).all()
    # frequencies: user rows = training positives; items = occurrences in training interactions
    assert d.frequencies["emb_user"].tolist() == [0, 2, 0, 1]
    # items: interactions before each user's validation item: user 0: 1 2 3, user 1: 3, user 2: 4 5
    assert d.frequencies["emb_item"].tolist() == [0, 1, 1, 2, 1, 1, 0]
    r1, r2 = d.epoch_rows(np.random.default_rng(5)), d.epoch_rows(np.random.default_rng(5))
    assert len(r1) == 6 and r1.label.sum() == 3 and (r1.sparse == r2.sparse).all()


def test_libfm_folder_with_featindex(tmp_path, workload):
    (tmp_path / "featindex.fm.txt").write_text(
        "city:other\t0\ncity:a\t1\ncity:b\t2\ncity:c\t3\nslot:x\t4\nslot:y\t5\n")
    lines = ["1 1:1 4:1", "0 1:1 5:1", "0 2:1 4:1", "0 1:1 4:1", "1 3:1 4:1"] * 4
    (tmp_path / "train.fm.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "test.fm.txt").write_text("1 1:1 4:1\n0 2:1 5:1\n0 0:1 5:1\n")
    d = workload.load_data(str(tmp_path))
    assert d.fields == ["city", "slot"] and d.history_table is None and d.n_dense == 0
    n_valid = len(d.valid)
    assert n_valid == 4 and len(d.train) == 16 and d.valid.label.sum() == 2  # 20% stratified
    # the most frequent value gets row 1; test's city:other (never in train) -> row 0
    assert d.test.sparse[0, 0] == 1 and d.test.sparse[2, 0] == 0
    total = d.frequencies["emb_city"].sum()
    assert total == len(d.train) and d.frequencies["emb_city"][1] >= d.frequencies["emb_city"][2]


CRITEO_ROWS = [
    "0\t1\t1\t5\t0\t1382\t4\t15\t2\t181\t1\t2\t\t2\t68fd1e64\t80e26c9b" + "\tab" * 24,
    "1\t2\t0\t44\t1\t102\t8\t2\t2\t4\t1\t1\t\t4\t68fd1e64\tf0cf0024" + "\tcd" * 24,
    "0\t\t-1\t1\t14\t767\t89\t4\t2\t245\t1\t3\t3\t45\t287e684f\t0a519c5c" + "\t" * 24,
]


def test_criteo_layout_parses_numeric_and_categorical(tmp_path, workload):
    f = tmp_path / "clicks.tsv"
    f.write_text("\n".join(CRITEO_ROWS * 10) + "\n")
    d = workload.load_data(str(f))
    assert d.n_dense == 13 and len(d.fields) == 26 and d.fields[0] == "c1"
    assert len(d.train) + len(d.valid) + len(d.test) == 30
    dense = np.concatenate([d.train.dense, d.valid.dense, d.test.dense])
    # I1 of the rows: 1, 2, missing -> log1p(1), log1p(2), 0 ; I2 = -1 -> -log1p(1)
    assert np.allclose(np.unique(dense[:, 0]), [0.0, math.log1p(1), math.log1p(2)])
    assert np.isclose(dense[:, 1].min(), -math.log1p(1))
    assert d.tables["c1"] == 3 and d.tables["c3"] == 4  # c1: 2 kept values + rare row; c3: ab, cd, "" + rare
    b = d.batch(d.test, np.arange(len(d.test)), 50)
    model = tiny_din(d.tables, d.fields, n_dense=13)
    assert model(**{k: torch.as_tensor(v) for k, v in b.items()}).shape == (len(d.test),)


def test_real_criteo_sample_schema(real_data, workload):
    d = workload.load_data(str(real_data / "ctr-criteo-sample"))
    assert (len(d.train), len(d.valid), len(d.test)) == (7200, 409, 391)
    assert d.train.label.sum() == 1549 and d.test.label.sum() == 86 and d.n_dense == 13 and len(d.fields) == 26


@pytest.mark.parametrize("content, fragment", [
    ("0\t" + "\t".join(["1"] * 38) + "\n", "Criteo layout needs 40"),  # one column short
    ("0\t" + "\t".join(["x"] * 13) + "\t" + "\t".join(["a"] * 26) + "\n", "non-numeric value in numeric column I1"),
    ("2\t" + "\t".join(["1"] * 13) + "\t" + "\t".join(["a"] * 26) + "\n", "0/1 label"),
])
def test_bad_criteo_file(tmp_path, workload, content, fragment):
    f = tmp_path / "bad.tsv"
    f.write_text(content)
    with pytest.raises(SlimcartError, match=fragment):
        workload.load_data(str(f))


def test_bad_libfm_and_paths(tmp_path, workload):
    (tmp_path / "train.fm.txt").write_text("1 a:1 b:1\n")
    (tmp_path / "test.fm.txt").write_text("0 1:1 2:1\n")
    with pytest.raises(SlimcartError, match="integer ids"):
        workload.load_data(str(tmp_path))
    with pytest.raises(SlimcartError, match="does not exist"):
        workload.load_data(str(tmp_path / "nope"))


# ---------------------------------------------------------------- model
def test_save_load_round_trip_and_frequencies(tmp_path, synth, workload):
    model = tiny_din(synth.tables, synth.fields, "item", 1)
    save_din(model, tmp_path, {"dataset": "synthetic"}, synth.frequencies)
    loaded, cfg = load_din(tmp_path)
    b = synth.batch(synth.test, np.arange(50), 12)
    with torch.no_grad():
        a = model(**{k: torch.as_tensor(v) for k, v in b.items()})
    bundle = workload.load_model(str(tmp_path))
    assert np.array_equal(workload.torch_runner(bundle)(b), a.numpy())  # identical, not just close
    assert bundle.extra["frequencies"] == tmp_path / "frequencies.safetensors"
    workload.save_model(bundle, tmp_path / "copy")  # a re-saved (e.g. compressed) model carries no counts
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["config.json", "model.safetensors"]
    freq = load_frequencies(tmp_path)
    assert set(freq) == set(loaded.embedding_tables()) and freq["emb_item"].tolist() == synth.frequencies["emb_item"].tolist()
    assert not any(p.suffix in (".pt", ".bin", ".pkl") for p in tmp_path.iterdir())


def test_tables_are_plain_attributes_and_swappable(synth):
    model = tiny_din(synth.tables, synth.fields, "item", 1)
    tables = model.embedding_tables()
    assert set(tables) == {"emb_user", "emb_item"} and all(isinstance(t, torch.nn.Embedding) for t in tables.values())
    sizes = parameter_bytes(model)
    assert sizes["embedding"] == 4 * 8 * (synth.tables["user"] + synth.tables["item"])
    assert sizes["embedding"] + sizes["dense"] == 4 * sum(p.numel() for p in model.parameters())
    b = {k: torch.as_tensor(v) for k, v in synth.batch(synth.test, np.arange(20), 12).items()}
    before = model(**b)

    class Doubled(torch.nn.Module):  # any ids -> rows module may replace a table
        def __init__(self, t):
            super().__init__()
            self.t = t

        def forward(self, ids):
            return 2 * self.t(ids)

    setattr(model, "emb_item", Doubled(tables["emb_item"]))
    assert model.embedding_tables()["emb_item"] is model.emb_item
    assert not torch.allclose(model(**b), before)


def test_platt_scaling_recovers_a_known_scaling_and_folds_exactly(synth):
    from slimcart.models.ctr import fold_into_output
    from slimcart.models.ctr_train import platt_scaling

    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 200_000)
    y = (rng.random(len(z)) < 1 / (1 + np.exp(-(0.5 * z - 1.0)))).astype(np.float32)  # true rate: sigmoid(z/2 - 1)
    a, c = platt_scaling(y, z)
    assert a == pytest.approx(0.5, abs=0.02) and c == pytest.approx(-1.0, abs=0.03)
    model = tiny_din(synth.tables, synth.fields, "item", 1)
    b = {k: torch.as_tensor(v) for k, v in synth.batch(synth.test, np.arange(30), 12).items()}
    with torch.no_grad():
        before = model(**b)
        fold_into_output(model, 0.4, 0.3)
        assert torch.allclose(model(**b), 0.4 * before + 0.3, atol=1e-5)


def test_wrong_inputs_are_refused(synth):
    model = tiny_din(synth.tables, synth.fields, "item", 1)
    b = synth.batch(synth.test, np.arange(4), 12)
    with pytest.raises(ValueError, match="takes sparse, hist"):
        model(torch.as_tensor(b["sparse"]))
    with pytest.raises(ValueError, match="int64 item ids"):
        model(torch.as_tensor(b["sparse"]), torch.zeros(4, 3))


@pytest.mark.parametrize("kind", ["behaviour", "criteo"])
def test_onnx_export_matches_onnxruntime(tmp_path, synth, workload, kind):
    ort = pytest.importorskip("onnxruntime")
    if kind == "behaviour":
        data, model = synth, tiny_din(synth.tables, synth.fields, "item", 1)
    else:
        f = tmp_path / "c.tsv"
        f.write_text("\n".join(CRITEO_ROWS * 10) + "\n")
        data = workload.load_data(str(f))
        model = tiny_din(data.tables, data.fields, n_dense=13)
    from slimcart.runtime.onnx_runtime import export_onnx

    spec = workload.export_spec(bundle_of(model))
    names = list(spec["example"])
    # slimcart's exporter passes the inputs by keyword: positionally, Criteo's `dense` would land in `hist`
    export_onnx(model, spec["example"], tmp_path / "m.onnx", spec["dynamic_axes"], spec["output_name"])
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == names
    rows = data.test if len(data.test) >= 7 else data.train
    batch = data.batch(rows, np.arange(7), 12)  # another batch size (and history width) than the example
    got = sess.run(None, {k: batch[k] for k in names})[0]
    want = workload.torch_runner(bundle_of(model))(batch)
    assert got.shape == (7,) and np.abs(got - want).max() < 1e-5


# ---------------------------------------------------------------- workload
def test_inputs_evaluate_and_task_loss(synth, workload):
    model = tiny_din(synth.tables, synth.fields, "item", 1)
    bundle = bundle_of(model)
    inputs = workload.bench_inputs(bundle, synth)
    assert inputs.unit == "rows" and len(inputs.single) == 64 and inputs.single[0]["sparse"].shape == (1, 2)
    assert inputs.items_per_serving_batch == 1024 and inputs.serving[0]["sparse"].shape == (1024, 2)
    res = workload.evaluate(workload.torch_runner(bundle), bundle, synth)
    out = res.outputs
    assert np.array_equal(out["labels"], synth.test.label) and res.quality["auc"] == pytest.approx(brute_auc(out["labels"], out["logits"]))
    assert set(res.quality) == set(workload.quality_keys) and out["auc_ci95"][0] <= res.quality["auc"] <= out["auc_ci95"][1]
    again = workload.evaluate(workload.torch_runner(bundle), bundle, synth, reference=out)
    assert again.outputs["vs_reference"]["delta"] == 0.0
    cal = workload.calibration_batches(bundle, synth, 3)
    assert len(cal) == 3 and all("label" in b for b in cal)
    test_pairs = {(int(u), int(e)) for u, e in zip(synth.test.user, synth.test.end)}
    valid_pairs = {(int(u), int(e)) for u, e in zip(synth.valid.user, synth.valid.end)}
    cal_rows = synth.epoch_rows(np.random.default_rng(1))  # what calibration_batches drew from
    assert not ({(int(u), int(e)) for u, e in zip(cal_rows.user, cal_rows.end)} & (test_pairs | valid_pairs))
    loss = workload.task_loss(bundle)(model, cal[0])
    logits = model(**{k: torch.as_tensor(v) for k, v in cal[0].items() if k != "label"})
    y, p = cal[0]["label"].astype(np.float64), 1 / (1 + np.exp(-logits.detach().double().numpy()))
    hand = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert float(loss) == pytest.approx(hand, rel=1e-5)
    flipped = dict(cal[0], label=1 - cal[0]["label"])  # the label really reaches the loss
    assert float(workload.task_loss(bundle)(model, flipped)) != pytest.approx(float(loss), rel=1e-3)


def test_model_trained_on_other_data_is_refused(synth, workload):
    model = tiny_din({"user": 5, "item": 7}, ["user", "item"], "item", 1)
    with pytest.raises(SlimcartError, match="was it trained on this dataset"):
        workload.evaluate(workload.torch_runner(bundle_of(model)), bundle_of(model), synth)


def test_distill_task_soft_targets(synth, workload):
    teacher = tiny_din(synth.tables, synth.fields, "item", 1)
    task = workload.distill_task(teacher, copy.deepcopy(teacher), bundle_of(teacher), synth, DistillOptions({"soft": 1.0}))
    assert task.n_examples() == 2 * len(synth.train)
    idx = np.arange(0, task.n_examples(), 7)
    loss, parts = task.loss(idx)
    loss.backward()
    # student == teacher: BCE(sigmoid(s), sigmoid(t)) is at its minimum in s, so no gradient reaches it
    grads = [p.grad.abs().max() for p in task.student().parameters() if p.grad is not None]
    assert grads and max(grads) < 1e-6 and set(parts) == {"soft"}
    far = tiny_din(synth.tables, synth.fields, "item", 1, seed=3)
    assert task.score_undistilled(far) < task.score_undistilled(copy.deepcopy(teacher))
    assert 0.0 <= task.validate() <= 1.0
    with pytest.raises(SlimcartError, match="no loss"):
        workload.distill_task(teacher, far, bundle_of(teacher), synth, DistillOptions({"kl": 1.0}))


def test_training_learns_and_resumes_exactly(workload, synth, tmp_path):
    full = workload.train(synth, tmp_path / "full", epochs=3, **TINY)
    bundle = workload.load_model(str(full))
    cfg = bundle.extra["config"]
    training = cfg["training"]
    assert training["val_auc"] > 0.55 and cfg["synthetic"] is True  # synthetic data has learnable structure
    assert training["epochs"] == 3 and len(training["history"]) == 4  # the initial model + one validation per epoch
    platt = training["platt"]  # (1, 0) is feasible, so the fitted scaling cannot be worse on validation
    assert platt["scale"] > 0 and platt["val_logloss_after"] <= platt["val_logloss_before"] + 1e-9
    assert set(load_frequencies(full)) == {"emb_user", "emb_item"}
    assert not (tmp_path / "full.partial").exists()  # checkpoints go once the model is saved
    steps_per_epoch = training["history"][1]["step"]

    def crash_after_epoch_2(msg):  # the trainer reports after writing each validation's checkpoint
        if f"step {2 * steps_per_epoch}/" in msg:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        workload.train(synth, tmp_path / "cut", epochs=3, progress=crash_after_epoch_2, **TINY)
    assert (tmp_path / "cut.partial" / "state.json").exists() and not (tmp_path / "cut").exists()
    messages = []
    cut = workload.train(synth, tmp_path / "cut", epochs=3, progress=messages.append, **TINY)
    assert messages[0].startswith(f"resuming DIN at step {2 * steps_per_epoch}")
    a, b = load_din(full)[0].state_dict(), load_din(cut)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same weights as the uninterrupted run, bit for bit
    with pytest.raises(SlimcartError, match="unknown training option"):
        workload.train(synth, tmp_path / "x", epochs=1, layers=3)


def test_training_negatives_are_fresh_unseen_items_per_step(synth):
    from slimcart.models.ctr_train import DINTask
    from slimcart.workloads.ctr_data import sample_unseen

    model = tiny_din(synth.tables, synth.fields, "item", 1)
    task = DINTask(model, synth, 1, 0.0, lambda m: 0.5, {}, lambda u, rng: sample_unseen(synth, u, rng))
    n = len(synth.train)
    assert task.n_examples() == 2 * n
    idx = np.array([0, 5, n, n + 5])  # positives 0 and 5, and one negative of each
    torch.manual_seed(1)
    rows = task.rows(idx)
    assert rows.label.tolist() == [1, 1, 0, 0] and (rows.user[2:] == rows.user[:2]).all()
    assert (rows.end[2:] == rows.end[:2]).all()  # same history as the positive
    stops = np.r_[synth.offsets[1:], len(synth.flat)]
    for u, item in zip(rows.user[2:], rows.sparse[2:, 1]):  # an item the user never touched
        assert item not in synth.flat[synth.offsets[u]:stops[u]] and 1 <= item < synth.tables["item"]
    torch.manual_seed(1)
    assert np.array_equal(task.rows(idx).sparse, rows.sparse)  # a function of the step's seed
    torch.manual_seed(2)
    assert not np.array_equal(task.rows(np.arange(n, 2 * n)).sparse, task.rows(np.arange(n, 2 * n)).sparse)


def test_bad_model_specs(tmp_path, workload, monkeypatch):
    monkeypatch.setenv("SLIMCART_HOME", str(tmp_path / "home"))
    with pytest.raises(SlimcartError, match="slimcart train --workload ctr"):
        workload.load_model("din")
    with pytest.raises(SlimcartError, match="--data ctr-ipinyou"):
        workload.load_model("din@ctr-ipinyou")
    with pytest.raises(SlimcartError, match="plain name"):
        workload.load_model("din@../x")
    with pytest.raises(SlimcartError, match="unknown model"):
        workload.load_model("nosuch")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(SlimcartError, match="cannot load DIN"):
        workload.load_model(str(tmp_path / "m"))


def test_cli_train_bad_data_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from slimcart.cli import app

    f = tmp_path / "bad.tsv"
    f.write_text("0\t" + "\t".join(["1"] * 38) + "\n")
    res = CliRunner().invoke(app, ["train", "-w", "ctr", "--data", str(f), "-o", str(tmp_path / "o")])
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "Criteo layout" in res.output
    assert not (tmp_path / "o").exists()


def test_distill_task_runs_in_the_shared_trainer(synth, workload, tmp_path):
    from slimcart.training import TrainConfig, fit

    teacher = load_din(workload.train(synth, tmp_path / "teacher", epochs=2, **TINY))[0]
    student = DIN(DINConfig.from_dict(teacher.config.to_dict()))  # a fresh student of the same shape
    task = workload.distill_task(teacher, student, bundle_of(teacher), synth, DistillOptions())
    before, val_before = task.score_undistilled(student), task.validate()
    res = fit(task, TrainConfig(max_steps=60, batch_size=64, lr=3e-3, eval_every=20, max_minutes=None))
    assert res.steps == 60 and res.best_step > 0 and res.best_score > val_before
    assert task.score_undistilled(task.student()) > before  # closer to the teacher than before training


def test_config_that_disagrees_with_the_weights_is_refused(tmp_path, synth, workload):
    import json

    save_din(tiny_din(synth.tables, synth.fields, "item", 1), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model"]["tables"]["item"] = 10**12  # would be terabytes if the model were built before checking
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SlimcartError, match="weights do not match config.json at emb_item.weight"):
        workload.load_model(str(tmp_path))


def test_cli_train_ctr_writes_a_loadable_checkpoint(tmp_path, monkeypatch, workload):
    from typer.testing import CliRunner

    from slimcart.cli import app

    monkeypatch.delenv("SLIMCART_DATA", raising=False)
    res = CliRunner().invoke(app, ["train", "-w", "ctr", "-o", str(tmp_path / "din"), "--epochs", "1", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "SYNTHETIC" in res.output and str(tmp_path / "din") in res.output.replace("\n", "")
    bundle = workload.load_model(str(tmp_path / "din"))
    assert bundle.extra["config"]["training"]["epochs"] == 1 and bundle.extra["frequencies"].is_file()
    assert not (tmp_path / "din.partial").exists()
