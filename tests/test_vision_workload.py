"""Vision workload: metrics by hand, the photo-folder layout and its errors, preprocessing, the
ResNet's save/load and ONNX round trips, augmentation geometry, calibration/distillation data,
and a few training steps through slimcart.training.fit (with exact resume) on tiny JPEG folders
written by the tests (fixtures in conftest.py)."""
from __future__ import annotations

import copy
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PHOTO_COLOURS as COLOURS
from conftest import tiny_cnn_bundle as tiny_bundle
from conftest import write_photo
from PIL import Image

from slimcart.contracts import DistillOptions
from slimcart.errors import SlimcartError
from slimcart.models.cnn_train import augment, to_pixels, top_up_last_batch
from slimcart.workloads import get_workload
from slimcart.workloads.images import decode
from slimcart.workloads.vision import accuracy, macro_f1

pytestmark = pytest.mark.usefixtures("one_thread")

# max_minutes None: the schedule does not depend on the clock, so a resumed run is exact
TINY = {"image_size": 32, "stem": 8, "widths": [8, 8, 16, 16], "blocks": [1, 1, 1, 1], "batch": 8, "patience": 100,
        "lr": 3e-3, "max_minutes": None}


@pytest.fixture
def workload():
    return get_workload("vision")


def one_line_error(fn, match: str):
    with pytest.raises(SlimcartError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- metrics
def test_accuracy_and_macro_f1_by_hand():
    labels, pred = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 2, 0])
    assert accuracy(labels, pred) == pytest.approx(4 / 6)
    # class 0: TP 1, FP 1, FN 1 -> 2/4; class 1: TP 2, FP 1, FN 0 -> 4/5; class 2: TP 1, FP 0, FN 1 -> 2/3
    assert macro_f1(labels, pred) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # a predicted class absent from the labels counts with F1 0: class 0 -> 2/3, class 1 -> 0
    assert macro_f1(np.array([0, 0]), np.array([0, 1])) == pytest.approx(1 / 3)
    assert macro_f1(labels, labels) == 1.0 and accuracy(labels, labels) == 1.0


def reference_macro_f1(labels: np.ndarray, pred: np.ndarray) -> float:
    """Another formulation: confusion matrix -> per-class precision and recall -> harmonic mean."""
    classes = np.union1d(labels, pred)
    cm = np.array([[np.sum((labels == a) & (pred == b)) for b in classes] for a in classes], float)
    f1 = []
    for i in range(len(classes)):
        precision = cm[i, i] / cm[:, i].sum() if cm[:, i].sum() else 0.0
        recall = cm[i, i] / cm[i].sum() if cm[i].sum() else 0.0
        f1.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return float(np.mean(f1))


def test_macro_f1_matches_a_confusion_matrix_reference_on_random_labels():
    rng = np.random.default_rng(0)
    for _ in range(5):
        y, p = rng.integers(0, 6, 200), rng.integers(0, 7, 200)
        assert macro_f1(y, p) == pytest.approx(reference_macro_f1(y, p))


# ---------------------------------------------------------------- data
def test_folder_layout_classes_and_labels(workload, photos):
    data = workload.load_data(str(photos))
    assert data.classes == ["hat", "shoes", "skirt"] and not data.info.synthetic and data.info.n == 12
    assert np.bincount(data.labels("train")).tolist() == [8, 8, 8]
    x = data.images("test", 24)
    assert x.shape == (12, 24, 24, 3) and x.dtype == np.uint8
    red = x[data.labels("test") == 0].reshape(-1, 3).mean(0)  # the hat photos are red
    assert red[0] > 150 and red[2] < 100


def test_synthetic_data_when_none_is_found(workload, monkeypatch):
    monkeypatch.delenv("SLIMCART_DATA", raising=False)
    data = workload.load_data(None)
    assert data.info.synthetic and "SYNTHETIC" in data.info.split and len(data.classes) == 5
    assert data.images("test", 16).shape == (100, 16, 16, 3)


def test_decode_squashes_the_whole_photo_and_flattens_transparency(tmp_path):
    im = np.zeros((20, 60, 3), np.uint8)
    im[:, :20] = (0, 255, 0)  # left third green: a centre crop would lose it, a squash keeps it
    Image.fromarray(im).save(tmp_path / "wide.png")
    out = decode(tmp_path / "wide.png", 9)
    assert out.shape == (9, 9, 3)
    assert (out[:, :2, 1] > 200).all() and (out[:, 4:, 1] < 30).all()
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[:5, :, :] = (255, 0, 0, 255)  # top half opaque red, bottom half fully transparent
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    out = decode(buf.getvalue(), 10)
    assert out[0, 0].tolist() == [255, 0, 0] and out[9, 9].tolist() == [255, 255, 255]


def test_bad_folders_give_one_clear_line(workload, photos, tmp_path):
    (tmp_path / "file.jpg").write_bytes(b"x")
    one_line_error(lambda: workload.load_data(str(tmp_path / "file.jpg")), "must be a folder")
    one_line_error(lambda: workload.load_data(str(tmp_path / "nowhere")), "does not exist")
    (tmp_path / "no_test" / "train" / "hat").mkdir(parents=True)
    one_line_error(lambda: workload.load_data(str(tmp_path / "no_test")), "no test/ folder")
    loose = tmp_path / "loose" / "test"
    write_photo(loose / "a.jpg", (0, 0, 0), 0)
    one_line_error(lambda: workload.load_data(str(tmp_path / "loose")), "holds images directly")
    (tmp_path / "empty" / "test" / "hat").mkdir(parents=True)
    (tmp_path / "empty" / "test" / "hat" / "notes.txt").write_text("no image")
    one_line_error(lambda: workload.load_data(str(tmp_path / "empty")), "has no images")
    (photos / "test" / "hat" / "broken.jpg").write_bytes(b"not a jpeg at all")
    data = workload.load_data(str(photos))
    one_line_error(lambda: data.images("test", 16), "cannot read image .*broken.jpg")


def test_missing_splits_and_unknown_classes(workload, photos, tmp_path):
    only_test = tmp_path / "only_test"
    for cls in ("hat", "shoes"):
        write_photo(only_test / "test" / cls / "0.jpg", COLOURS[cls], 1)
    data = workload.load_data(str(only_test))
    bundle = tiny_bundle(["hat", "shoes"])
    one_line_error(lambda: workload.calibration_batches(bundle, data, 2), "no train split")
    one_line_error(lambda: workload.train(data, tmp_path / "m", epochs=1, **TINY), "no train split")
    other = tiny_bundle(["dress", "hat"])
    one_line_error(lambda: workload.evaluate(workload.torch_runner(other), other, data), "not trained on .*shoes")


# ---------------------------------------------------------------- model
def test_save_load_round_trip_gives_identical_logits(workload, tmp_path):
    bundle = tiny_bundle(["a", "b", "c"])
    batch = workload.example_batch(bundle)
    before = workload.torch_runner(bundle)(batch)
    workload.save_model(bundle, tmp_path / "m")
    loaded = workload.load_model(str(tmp_path / "m"))
    assert np.array_equal(workload.torch_runner(loaded)(batch), before)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    companions = workload.load_companions(tmp_path / "m")
    assert companions.module is None and workload.image_size(companions) == 32


def test_model_errors(workload, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMCART_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SLIMCART_DATA", raising=False)
    one_line_error(lambda: workload.load_model("cnn"), "no trained vision model")
    one_line_error(lambda: workload.load_model(str(tmp_path / "nope")), "unknown model")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    one_line_error(lambda: workload.load_model(str(tmp_path / "half")), "needs config.json and model.safetensors")
    (tmp_path / "half" / "model.safetensors").write_bytes(b"garbage")
    one_line_error(lambda: workload.load_model(str(tmp_path / "half")), "cannot load the vision model")
    one_line_error(lambda: workload.load_companions(tmp_path / "nope"), "not a slimcart vision config")


def test_onnx_export_matches_torch_and_ignores_labels(workload, photos, tmp_path):
    from slimcart.runtime.onnx_runtime import OnnxRunner, export_onnx

    data = workload.load_data(str(photos))
    bundle = tiny_bundle(data.classes)
    spec = workload.export_spec(bundle)
    export_onnx(bundle.module, spec["example"], tmp_path / "m.onnx", spec["dynamic_axes"], spec["output_name"])
    onnx_runner, torch_runner = OnnxRunner(tmp_path / "m.onnx", threads=1), workload.torch_runner(bundle)
    batch = workload.calibration_batches(bundle, data, 1)[0]  # labelled: every runner must ignore "labels"
    assert np.allclose(onnx_runner(batch), torch_runner(batch), atol=1e-4)
    assert np.array_equal(bundle.module(**{k: torch.as_tensor(v) for k, v in batch.items()}).detach().numpy(),
                          torch_runner({"pixels": batch["pixels"]}))


# ---------------------------------------------------------------- inputs
def test_calibration_comes_from_train_with_labels(workload, photos):
    data = workload.load_data(str(photos))
    bundle = tiny_bundle(["hat", "shoes", "skirt", "zebra"])  # model classes a superset: labels map by name
    batches = workload.calibration_batches(bundle, data, 2)
    assert len(batches) == 1 and batches[0]["pixels"].shape == (24, 3, 32, 32)  # 24 training photos in all
    train, test = to_pixels(data.images("train", 32)).numpy(), to_pixels(data.images("test", 32)).numpy()
    for px, label in zip(batches[0]["pixels"], batches[0]["labels"]):
        i = [k for k in range(len(train)) if np.array_equal(train[k], px)]
        assert len(i) == 1 and label == data.labels("train")[i[0]]
        assert not any(np.array_equal(t, px) for t in test)
    loss = workload.task_loss(bundle)
    expected = torch.nn.functional.cross_entropy(bundle.module(torch.as_tensor(batches[0]["pixels"])),
                                                 torch.as_tensor(batches[0]["labels"]))
    assert float(loss(bundle.module, batches[0]).detach()) == pytest.approx(float(expected.detach()))
    one_line_error(lambda: loss(bundle.module, {"pixels": batches[0]["pixels"]}), "needs labelled batches")


def test_bench_inputs_and_preprocessing_cost(workload, photos):
    data = workload.load_data(str(photos))
    bundle = tiny_bundle(data.classes)
    inputs = workload.bench_inputs(bundle, data)
    assert len(inputs.single) == 12 and inputs.single[0]["pixels"].shape == (1, 3, 32, 32)
    assert inputs.items_per_serving_batch == 12 == len(inputs.serving[0]["pixels"])  # fewer than 32 test photos
    assert inputs.unit == "images" and inputs.single[0]["pixels"].dtype == np.float32
    cost = workload.preprocess_cost(bundle, data, n=5)
    assert cost["images"] == 5 and cost["input_shape"] == [3, 32, 32] and 0 < cost["ms_per_image_p50"] < 1000
    assert not cost["synthetic"] and len(cost["loadavg_before"]) == 3


# ---------------------------------------------------------------- training pieces
def test_augment_with_no_jitter_is_the_photo_or_its_mirror():
    x = torch.randint(0, 256, (16, 8, 8, 3), dtype=torch.uint8)
    out = augment(x, torch.Generator().manual_seed(0), zoom=(1.0, 1.0), aspect=0.0, degrees=0.0, shift=0.0, jitter=0.0)
    ref = to_pixels(x)
    same = [torch.allclose(o, r, atol=1e-5) for o, r in zip(out, ref)]
    mirrored = [torch.allclose(o, r.flip(-1), atol=1e-5) for o, r in zip(out, ref)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)
    a = augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(3))) and 0 <= a.min() and a.max() <= 1


def test_a_short_last_batch_is_topped_up_from_the_epochs_first_photos():
    order = np.array([5, 3, 0, 1, 4, 2, 6])
    assert top_up_last_batch(order, 3).tolist() == [5, 3, 0, 1, 4, 2, 6, 5, 3]  # 7 photos -> 3 full batches
    assert top_up_last_batch(order[:6], 3).tolist() == [5, 3, 0, 1, 4, 2]
    assert top_up_last_batch(order[:2], 3).tolist() == [5, 3]  # fewer photos than a batch: left alone


def test_distill_task(workload, photos):
    data = workload.load_data(str(photos))
    bundle = tiny_bundle(data.classes)
    teacher, student = bundle.module, copy.deepcopy(bundle.module).eval()
    task = workload.distill_task(teacher, student, bundle, data, DistillOptions(losses={"logits_kl": 1.0}))
    loss, parts = task.loss(np.arange(6))  # teacher and student see the same augmented photos
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6) and set(parts) == {"logits_kl"}  # a copy matches exactly
    assert task.score_undistilled(student) == pytest.approx(0.0, abs=1e-6)
    pred = workload.torch_runner(bundle)({"pixels": to_pixels(data.images("validation", 32)).numpy()}).argmax(1)
    assert task.validate() == pytest.approx(accuracy(data.labels("validation"), pred))
    task = workload.distill_task(teacher, student, bundle, data, DistillOptions(temperature=2.0))
    loss, parts = task.loss(np.arange(6))
    loss.backward()
    assert set(parts) == {"logits_kl", "task"} and parts["task"] > 0 and task.n_examples() == 24
    assert loss.item() == pytest.approx(parts["logits_kl"] + parts["task"], rel=1e-5)  # default weights 1 and 1
    assert any(p.grad is not None for p in student.parameters()) and all(p.grad is None for p in teacher.parameters())
    with pytest.raises(SlimcartError, match="no loss"):
        workload.distill_task(teacher, student, bundle, data, DistillOptions(losses={"hidden_mse": 1.0}))


def test_train_few_steps_and_resume_exactly(workload, photos, tmp_path):
    from safetensors.torch import load_file

    data = workload.load_data(str(photos))  # 24 training photos, batches of 8: 3 steps per epoch
    full = workload.train(data, tmp_path / "full", epochs=3, **TINY)

    def crash_after_epoch_2(msg):
        if " step 6/9 " in msg and " val " in msg:  # said after the epoch-2 checkpoint is written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        workload.train(data, tmp_path / "cut", epochs=3, progress=crash_after_epoch_2, **TINY)
    assert (tmp_path / "cut.partial" / "state.json").exists() and not (tmp_path / "cut").exists()
    messages = []
    cut = workload.train(data, tmp_path / "cut", epochs=3, progress=messages.append, **TINY)
    assert messages[1].startswith("resuming ResNet at step 6") and " step 9/9 " in messages[-1]
    a, b = load_file(str(full / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # identical to the uninterrupted run
    assert not (tmp_path / "cut.partial").exists()
    bundle = workload.load_model(str(cut))
    training = bundle.extra["config"]["training"]
    history = training["history"]  # the untrained model (step 0), then one validation per epoch
    assert [h["step"] for h in history] == [0, 3, 6, 9] and history[-1]["loss"] < history[1]["loss"]
    assert training["epochs"] == 3 and training["stopped"] == "step budget"
    assert workload.model_config(bundle).classes == data.classes
    q = workload.evaluate(workload.torch_runner(bundle), bundle, data)
    assert set(q.quality) == {"accuracy", "macro_f1"} and q.outputs["logits"].shape == (12, 3)
    one_line_error(lambda: workload.train(data, tmp_path / "x", epochs=1, learning_rate=1.0), "unknown training option")


@pytest.mark.slow
@pytest.mark.skipif(not (Path(os.environ.get("SLIMCART_DATA", "/work/shared/data")) / "images-clothing").exists(),
                    reason="real clothing photos not available")
def test_real_clothing_folder(workload, monkeypatch):
    monkeypatch.setenv("SLIMCART_DATA", os.environ.get("SLIMCART_DATA", "/work/shared/data"))
    data = workload.load_data(None)
    # counts and classes as stated in the folder's SOURCE.md
    assert not data.info.synthetic and len(data.classes) == 10 and "t-shirt" in data.classes
    assert [len(data.labels(s)) for s in ("train", "validation", "test")] == [3068, 341, 372]
    assert data.images("test", 64).shape == (372, 64, 64, 3)


def test_cli_trains_and_evaluates_a_vision_model(photos, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from slimcart.cli import app

    monkeypatch.setenv("SLIMCART_HOME", str(tmp_path / "home"))
    out = tmp_path / "model"
    res = CliRunner().invoke(app, ["train", "--workload", "vision", "--data", str(photos), "--out", str(out),
                                   "--epochs", "1", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "checkpoint:" in res.output and (out / "model.safetensors").is_file() and not (tmp_path / "model.partial").exists()
    res = CliRunner().invoke(app, ["eval", "--workload", "vision", "--model", str(out), "--data", str(photos), "--json",
                                   "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert '"accuracy"' in res.output and '"macro_f1"' in res.output
