"""Session workload: reading, metrics by hand, GRU4Rec against a hand-written GRU, padding invariance,
save/load and ONNX round trips, training + resume, calibration/bench inputs, task loss, distillation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slimcart.contracts import DistillOptions, ModelBundle
from slimcart.errors import SlimcartError
from slimcart.models.gru4rec import (
    GRU4Rec,
    GRU4RecConfig,
    load_gru4rec,
    next_item_loss,
    right_align,
)
from slimcart.workloads import get_workload
from slimcart.workloads.ranking import hit_rate, reciprocal_ranks, target_ranks
from slimcart.workloads.session import (
    TRAIN_DEFAULTS,
    SessionData,
    all_prefixes,
    check_prefixes,
    pad_right,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_TRAIN = {"emb_dim": 16, "hidden": 16, "batch": 32, "negatives": 64, "patience": 100, "max_minutes": 5.0}


@pytest.fixture
def workload():
    return get_workload("session")


def tiny_model(n_items: int = 30, tied: bool = False, hidden=(8,), seed: int = 0) -> GRU4Rec:
    torch.manual_seed(seed)
    m = GRU4Rec(GRU4RecConfig(n_items=n_items, emb_dim=6, hidden=list(hidden), tied=tied, max_len=10)).eval()
    with torch.no_grad():  # non-zero biases so a wrong gate layout cannot hide
        for p in m.parameters():
            if p.ndim == 1:
                p.normal_(0, 0.3)
    return m


def bundle_of(model: GRU4Rec) -> ModelBundle:
    return ModelBundle(name="tiny", module=model, source=None, extra={"config": {"model_type": "gru4rec"}})


def write_dataset(folder: Path, sessions: list[str], test_rows: list[str] | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train_sessions.txt").write_text("\n".join(sessions) + "\n")
    if test_rows is not None:
        (folder / "test_prefixes.tsv").write_text("prefix\ttarget\n" + "\n".join(test_rows) + "\n")
    return folder


# ---------------------------------------------------------------- metrics
def test_ranks_hr_mrr_by_hand():
    scores = np.array([
        [9.0, 0.1, 0.5, 0.3, 0.2],  # target 2 (0.5) highest among items 1..4 -> rank 0 (column 0 ignored)
        [0.0, 0.4, 0.4, 0.9, 0.1],  # target 1 (0.4): 0.9 above, item 2 ties -> rank 2
        [0.0, np.nan, 0.2, 0.1, 0.3],  # target 4 (0.3) and NaN counts as -inf -> rank 0
        [0.0, 0.9, 0.8, 0.7, 0.1],  # target 4 last -> rank 3
    ], np.float32)
    ranks = target_ranks(scores, np.array([2, 1, 4, 4]))
    assert ranks.tolist() == [0, 2, 0, 3]
    assert hit_rate(ranks, 20) == 1.0 and hit_rate(ranks, 2) == 0.5 and hit_rate(ranks, 3) == 0.75
    assert reciprocal_ranks(ranks, 20).mean() == pytest.approx((1 + 1 / 3 + 1 + 1 / 4) / 4)
    assert reciprocal_ranks(ranks, 3).tolist() == pytest.approx([1, 1 / 3, 1, 0])


def test_evaluate_full_ranking_by_hand(tmp_path, workload):
    """Rows scored by a fake runner whose score of item i is fixed per prefix length: ranks known by hand."""
    folder = write_dataset(tmp_path / "d", [f"{i % 40 + 1} {i % 40 + 2} {i % 40 + 3}" for i in range(60)],
                           ["5\t3", "5 6\t41", "5 6 7\t1", "9\t42"])
    data = workload.load_data(str(folder))
    assert data.n_items == 42 and not data.info.synthetic and data.info.n == 4
    base = np.arange(43, dtype=np.float32)  # item i scores i: rank of target t is 42 - t

    def runner(batch):
        seq = np.asarray(batch["seq"])
        return np.tile(base, (len(seq), 1)) * np.where((seq > 0).sum(1) == 2, -1.0, 1.0)[:, None]

    res = workload.evaluate(runner, bundle_of(tiny_model(42)), data)
    # rows: target 3 (len 1, rank 39), 41 (len 2: order reversed, rank 40), 1 (len 3, rank 41), 42 (len 1, rank 0)
    assert res.outputs["ranks"].tolist() == [39, 40, 41, 0]
    assert res.quality == {"hr@20": pytest.approx(0.25), "mrr@20": pytest.approx(0.25)}


# ---------------------------------------------------------------- data
def test_reads_files_and_splits(tmp_path, workload):
    sessions = [" ".join(str((i + k) % 9 + 1) for k in range(2 + i % 3)) for i in range(30)]
    data = workload.load_data(str(write_dataset(tmp_path / "d", sessions, ["1 2\t3", "4\t5"])))
    assert len(data.valid) == 3 and len(data.train) == 27  # newest 10% of the sessions validate
    assert [s.tolist() for s in data.valid] == [[int(x) for x in s.split()] for s in sessions[-3:]]
    assert [p.tolist() for p in data.test_prefixes] == [[1, 2], [4]] and data.test_targets.tolist() == [3, 5]
    prefixes, targets = data.validation_rows()
    # validation sessions 1 2 | 2 3 4 | 3 4 5 6 -> every prefix and its next click
    assert [p.tolist() for p in prefixes] == [[1], [2], [2, 3], [3], [3, 4], [3, 4, 5]]
    assert targets.tolist() == [2, 3, 4, 4, 5, 6]
    # without a test file the newest sessions are cut into prefixes
    only = workload.load_data(str(write_dataset(tmp_path / "e", sessions, None)))
    assert len(only.test_prefixes) == sum(len(s.split()) - 1 for s in sessions[-3:])
    assert len(only.train) + len(only.valid) == 27


def test_validation_data_replaces_only_the_evaluated_rows(tmp_path, workload):
    sessions = [" ".join(str((i + k) % 9 + 1) for k in range(2 + i % 3)) for i in range(30)]
    data = workload.load_data(str(write_dataset(tmp_path / "d", sessions, ["1 2\t3", "4\t5"])))
    val = workload.validation_data(data)
    prefixes, targets = data.validation_rows()
    assert [p.tolist() for p in val.test_prefixes] == [p.tolist() for p in prefixes] and val.info.n == 6
    assert val.test_targets.tolist() == targets.tolist() and val.info.split.startswith("validation")
    assert [p.tolist() for p in data.test_prefixes] == [[1, 2], [4]]  # the test rows are untouched
    assert val.train is data.train and workload.validation_data(data, 0.5).info.n == 3


@pytest.mark.parametrize("sessions, tests, message", [
    (["1 2", "3 x"], None, "line 2"),
    (["1 2", "0 3"], None, "reserved for padding"),
    (["1 2"] * 20, ["1 2\t3"], "header"),
    (["1 2"] * 20, ["prefix\ttarget", "1 2\t3 4"], "one item id"),
    (["1 2"] * 20, ["prefix\ttarget", "1 2"], "expected 'prefix<TAB>target'"),
    (["1"], None, "too few sessions"),
])
def test_bad_data_is_one_clear_error(tmp_path, workload, sessions, tests, message):
    folder = tmp_path / "d"
    write_dataset(folder, sessions, None)
    if tests is not None:
        (folder / "test_prefixes.tsv").write_text("\n".join(tests) + "\n")
    with pytest.raises(SlimcartError, match=message) as e:
        workload.load_data(str(folder))
    assert "\n" not in str(e.value)


def test_missing_and_wrong_files(tmp_path, workload):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlimcartError, match="no train_sessions.txt"):
        workload.load_data(str(tmp_path / "empty"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(SlimcartError, match="sessions .txt"):
        workload.load_data(str(tmp_path / "x.csv"))
    with pytest.raises(SlimcartError, match="does not exist"):
        workload.load_data(str(tmp_path / "nope"))


def test_synthetic_fallback_is_labelled(workload, monkeypatch):
    monkeypatch.delenv("SLIMCART_DATA", raising=False)
    data = workload.load_data(None)
    assert data.info.synthetic and "SYNTHETIC" in data.info.split and data.info.n == len(data.test_prefixes)


# ---------------------------------------------------------------- model
def reference_gru4rec(model: GRU4Rec, clicks: list[int]) -> torch.Tensor:
    """The GRU equations written out (PyTorch gate order r, z, n), one click at a time."""
    x = model.item_emb.weight[torch.tensor(clicks)]
    for gru in model.grus:
        H = gru.hidden_size
        h, outs = torch.zeros(H), []
        Wi, Wh, bi, bh = gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0
        for xt in x:
            gi, gh = Wi @ xt + bi, Wh @ h + bh
            r, z = torch.sigmoid(gi[:H] + gh[:H]), torch.sigmoid(gi[H:2 * H] + gh[H:2 * H])
            n = torch.tanh(gi[2 * H:] + r * gh[2 * H:])
            h = (1 - z) * n + z * h
            outs.append(h)
        x = torch.stack(outs)
    last = x[-1]
    if model.out is not None:
        return model.out.weight @ last + model.out.bias
    return model.item_emb.weight @ model.proj(last) + model.out_bias


@pytest.mark.parametrize("tied", [False, True])
def test_forward_matches_hand_written_gru_for_any_padding(tied):
    model = tiny_model(tied=tied, hidden=(8, 5))
    rows = [[3, 7, 7, 1], [12], [5, 6, 7, 8, 9, 10]]
    want = torch.stack([reference_gru4rec(model, r) for r in rows])
    right = torch.from_numpy(pad_right([np.array(r) for r in rows], 10))
    left = torch.zeros(3, 9, dtype=torch.long)
    for i, r in enumerate(rows):
        left[i, 9 - len(r):] = torch.tensor(r)
    with torch.no_grad():
        for seq in (right, left, torch.cat([right, torch.zeros(3, 4, dtype=torch.long)], 1)):
            torch.testing.assert_close(model(seq), want, atol=1e-5, rtol=1e-5)


def test_right_align():
    seq = torch.tensor([[0, 0, 4, 5], [7, 8, 9, 0], [1, 2, 3, 4]])
    x, n = right_align(seq)
    assert x.tolist() == [[4, 5, 0, 0], [7, 8, 9, 0], [1, 2, 3, 4]] and n.tolist() == [2, 3, 4]


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip_identical_scores(tmp_path, workload, tied):
    model = tiny_model(tied=tied, hidden=(8, 6))
    workload.save_model(bundle_of(model), tmp_path / "m")
    loaded = workload.load_model(str(tmp_path / "m"))
    batch = workload.example_batch(loaded)
    assert np.array_equal(workload.torch_runner(loaded)(batch), workload.torch_runner(bundle_of(model))(batch))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model"]["hidden"] == [8, 6] and cfg["model"]["tied"] is tied
    assert not list(tmp_path.glob("m/*.pt")) and not list(tmp_path.glob("m/*.bin"))  # safetensors only


def test_load_errors_are_one_line(tmp_path, workload, monkeypatch):
    monkeypatch.setenv("SLIMCART_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SLIMCART_DATA", raising=False)
    with pytest.raises(SlimcartError, match="slimcart train --workload session"):
        workload.load_model("gru4rec")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(SlimcartError) as e:
        workload.load_model(str(tmp_path / "bad"))
    assert "\n" not in str(e.value)
    with pytest.raises(SlimcartError, match="not valid JSON"):
        workload.load_companions(tmp_path / "bad")


def test_runner_refuses_bad_batches(workload):
    runner = workload.torch_runner(bundle_of(tiny_model(30)))
    for seq, msg in [(np.array([[1, 0, 2]]), "one side"), (np.array([[31, 2]]), "outside 0..30"),
                     (np.array([[0, 0]]), "empty prefix"), (np.array([[-1, 2]]), "outside"), (np.array([1.5]), "2-D integer")]:
        with pytest.raises(SlimcartError, match=msg):
            runner({"seq": seq})
    with pytest.raises(SlimcartError, match="dict with 'seq'"):
        runner([[1, 2]])
    assert check_prefixes(np.array([[0, 3, 4], [5, 0, 0]]), 30).dtype == np.int64


@pytest.mark.parametrize("tied", [False, True])
def test_onnx_export_runs_in_onnxruntime(tmp_path, workload, tied):
    import onnxruntime as ort

    model = tiny_model(tied=tied, hidden=(8,))
    spec = workload.export_spec(bundle_of(model))
    with torch.inference_mode():
        torch.onnx.export(model, (torch.as_tensor(spec["example"]["seq"]),), str(tmp_path / "m.onnx"), input_names=["seq"],
                          output_names=[spec["output_name"]], dynamic_axes=spec["dynamic_axes"], opset_version=17, dynamo=False)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for seq in (np.array([[3, 4, 0, 0, 0], [1, 2, 3, 4, 5]]), np.array([[0, 0, 0, 9]]), np.array([[2] * 13])):
        want = workload.torch_runner(bundle_of(model))({"seq": seq})
        np.testing.assert_allclose(sess.run(None, {"seq": seq})[0], want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- loss, inputs, training
def test_sampled_softmax_with_all_items_is_full_cross_entropy():
    model = tiny_model(30)
    seq, tgt = torch.tensor([[1, 2, 3, 0]]), torch.tensor([[2, 3, 4, 0]])
    h, _ = model.encode(seq)
    logits = model.score(h[0, :3])[:, 1:]
    want = torch.nn.functional.cross_entropy(logits, torch.tensor([1, 2, 3]))
    torch.testing.assert_close(next_item_loss(model, seq, tgt, 30, None, None), want)
    # sampled: finite, and the uniform-q correction log(K/n) is a constant shift of every logit
    assert torch.isfinite(next_item_loss(model, seq, tgt, 8, None, torch.Generator().manual_seed(0)))


def test_task_loss_pads_either_side_and_trains(workload):
    model = tiny_model(30)
    loss = workload.task_loss(bundle_of(model))
    right, left = np.array([[1, 2, 3, 0], [4, 5, 0, 0]]), np.array([[0, 1, 2, 3], [0, 0, 4, 5]])
    torch.testing.assert_close(loss(model, {"seq": right}), loss(model, {"seq": left}))
    model.train()
    opt = torch.optim.Adam(model.parameters(), 0.05)
    first = float(loss(model, {"seq": right}))
    for _ in range(30):
        opt.zero_grad()
        loss(model, {"seq": right}).backward()
        opt.step()
    assert float(loss(model, {"seq": right})) < 0.5 * first


def test_calibration_and_bench_inputs(tmp_path, workload):
    sessions = [" ".join(str((i * 7 + k) % 50 + 1) for k in range(2 + i % 5)) for i in range(400)]
    data = workload.load_data(str(write_dataset(tmp_path / "d", sessions, [f"{i % 50 + 1} {i % 49 + 1}\t3" for i in range(600)])))
    bundle = bundle_of(tiny_model(50))
    cal = workload.calibration_batches(bundle, data, 3)
    assert len(cal) == 3 and all(b["seq"].shape[0] == 64 for b in cal)
    train = {tuple(s.tolist()) for s in data.train}
    for b in cal:  # whole training sessions only
        for row in b["seq"]:
            assert tuple(row[row > 0].tolist()) in train
    bi = workload.bench_inputs(bundle, data)
    assert bi.unit == "sessions" and bi.items_per_serving_batch == 256 and len(bi.serving) == 2
    assert all(b["seq"].shape[0] == 1 for b in bi.single) and len(bi.single) == 64
    runner = workload.torch_runner(bundle)
    assert runner(bi.serving[0]).shape == (256, 51)


def test_training_learns_and_resumes_exactly(tmp_path, workload, monkeypatch):
    monkeypatch.delenv("SLIMCART_DATA", raising=False)
    data = workload.load_data(None)
    full = workload.train(data, tmp_path / "full", epochs=3, seed=3, **TINY_TRAIN)
    seen = []

    def crash_after_epoch_2(msg):  # the trainer reports every validation (one per epoch)
        seen.append(" val " in msg)
        if sum(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        workload.train(data, tmp_path / "cut", epochs=3, seed=3, progress=crash_after_epoch_2, **TINY_TRAIN)
    assert (tmp_path / "cut.partial" / "state.json").exists() and not (tmp_path / "cut").exists()
    msgs = []
    cut = workload.train(data, tmp_path / "cut", epochs=3, seed=3, progress=msgs.append, **TINY_TRAIN)
    assert msgs[0].startswith("resuming GRU4Rec at step") and not (tmp_path / "cut.partial").exists()
    a, b = load_gru4rec(full)[0].state_dict(), load_gru4rec(cut)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # identical to the uninterrupted run
    training = json.loads((full / "config.json").read_text())["training"]
    losses = [h["loss"] for h in training["history"] if h["loss"] is not None]
    assert len(losses) == 3 and losses[-1] < losses[0] and 0 <= training["val_hr@20"] <= 1
    # a learnable next-click structure: far above the 20/n_items of random ranking on the test rows
    res = workload.evaluate(workload.torch_runner(workload.load_model(str(full))), workload.load_model(str(full)), data)
    assert res.quality["hr@20"] > 3 * 20 / data.n_items


def test_train_rejects_unknown_options(workload, monkeypatch):
    monkeypatch.delenv("SLIMCART_DATA", raising=False)
    with pytest.raises(SlimcartError, match="unknown training option"):
        workload.train(None, None, epochs=1, bogus=1)
    assert set(TRAIN_DEFAULTS) >= {"negatives", "alpha", "tied", "max_minutes"}


# ---------------------------------------------------------------- distillation
def test_distill_task_pulls_student_to_teacher(workload, monkeypatch):
    monkeypatch.delenv("SLIMCART_DATA", raising=False)
    data: SessionData = workload.load_data(None)
    teacher = tiny_model(data.n_items, hidden=(16,), seed=1)
    student = tiny_model(data.n_items, hidden=(4,), seed=2)
    task = workload.distill_task(teacher, student, bundle_of(teacher), data, DistillOptions(losses={"logits_kl": 1.0}))
    assert task.n_examples() == sum(len(s) >= 2 for s in data.train)
    idx = np.arange(32)
    first, parts = task.loss(idx)
    assert set(parts) == {"logits_kl"} and first.item() > 0
    same = workload.distill_task(teacher, tiny_model(data.n_items, hidden=(16,), seed=1), bundle_of(teacher), data,
                                 DistillOptions())
    assert same.loss(idx)[1]["logits_kl"] == pytest.approx(0.0, abs=1e-6)  # identical student: KL 0
    opt = torch.optim.Adam(task.trainable().parameters(), 0.02)
    task.trainable().train()
    for _ in range(40):
        opt.zero_grad()
        task.loss(idx)[0].backward()
        opt.step()
    assert task.loss(idx)[0].item() < 0.7 * first.item()
    assert 0.0 <= task.validate() <= 1.0 and task.fingerprint()["weights"] == {"logits_kl": 1.0}
    with pytest.raises(SlimcartError, match="no loss"):
        workload.distill_task(teacher, student, bundle_of(teacher), data, DistillOptions(losses={"hidden_mse": 1.0}))
    # sampled candidates: K >= n is the full softmax; identical models have KL 0; training on the sampled
    # KL pulls the student towards the teacher's FULL distribution
    full = workload.distill_task(teacher, tiny_model(data.n_items, hidden=(4,), seed=2), bundle_of(teacher), data,
                                 DistillOptions(losses={"logits_kl": 1.0}))
    every = workload.distill_task(teacher, tiny_model(data.n_items, hidden=(4,), seed=2), bundle_of(teacher), data,
                                  DistillOptions(losses={"logits_kl": 1.0}, transfer={"kd_negatives": data.n_items}))
    assert every.loss(idx)[1] == full.loss(idx)[1]
    opts = DistillOptions(losses={"logits_kl": 1.0, "task": 1.0}, temperature=2.0, transfer={"kd_negatives": 32})
    same = workload.distill_task(teacher, tiny_model(data.n_items, hidden=(16,), seed=1), bundle_of(teacher), data, opts)
    torch.manual_seed(0)
    assert same.loss(idx)[1]["logits_kl"] == pytest.approx(0.0, abs=1e-6)
    sampled = workload.distill_task(teacher, tiny_model(data.n_items, hidden=(4,), seed=2), bundle_of(teacher), data,
                                    DistillOptions(losses={"logits_kl": 1.0}, transfer={"kd_negatives": 32}))
    before = full.loss(idx)[1]["logits_kl"]
    opt = torch.optim.Adam(sampled.trainable().parameters(), 0.02)
    for step in range(40):
        torch.manual_seed(step)
        opt.zero_grad()
        sampled.loss(idx)[0].backward()
        opt.step()
    full.set_student(sampled.student())
    assert full.loss(idx)[1]["logits_kl"] < 0.8 * before
    with pytest.raises(SlimcartError, match="share the catalogue"):
        workload.distill_task(teacher, tiny_model(5), bundle_of(teacher), data, DistillOptions())


def test_all_prefixes():
    p, t = all_prefixes([np.array([4, 5, 6]), np.array([7])])
    assert [x.tolist() for x in p] == [[4], [4, 5]] and t.tolist() == [5, 6]


@pytest.mark.slow
def test_real_diginetica_counts_match_source_md(real_data, workload):
    """SOURCE.md: 186,670 training sessions, 43,097 items, 60,858 test rows."""
    data = workload.load_data(None)
    assert len(data.train) + len(data.valid) == 186_670 and data.n_items == 43_097 and data.info.n == 60_858
    assert not data.info.synthetic and len(data.valid) == round(186_670 * 0.1)


def test_implements_the_workload_contract(workload):
    from slimcart.contracts import Workload

    members = [n for n in Workload.__dict__ if not n.startswith("_")] + list(Workload.__annotations__)
    missing = [n for n in members if not hasattr(workload, n)]
    assert not missing
    assert workload.primary_metric in workload.quality_keys and set(workload.higher_is_better) == set(workload.quality_keys)
