"""Product-photo classification: which catalogue category a photo shows, with a small ResNet.

Model: the ResNet that `slimcart train --workload vision` trains from scratch (alias `cnn` = the
default checkpoint folder), or any folder with config.json + model.safetensors it wrote.
Data: `images-clothing` (3,781 clothing photos, 10 classes, the publisher's train/validation/test
split), or a user's folder in the same `train|validation|test/CLASS/*.jpg` layout (`--data`); a
deterministic synthetic shape set, labelled synthetic, when there is none.
Metrics on the test split: top-1 accuracy and macro-F1 (the mean of per-class F1 = 2TP/(2TP+FP+FN)
over the classes present in the labels or the predictions; the classes are imbalanced, so this
weighs a rare class as much as a common one).
Inputs: decoded, resized photos as `pixels` float32 (N, 3, S, S) in [0, 1]; the decode + resize
cost is measured on its own by `preprocess_cost`, since it does not depend on the model.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..contracts import BenchInputs, DataInfo, DistillOptions, EvalResult, ModelBundle
from ..errors import SlimcartError
from ..models.cnn import CNNConfig, ResNet, actual_config, load_cnn, save_cnn
from ..models.cnn_train import to_pixels
from ..paths import home, resolve_dataset
from . import images as img
from .images import VisionData, load_folder, load_synthetic, png_bytes
from .io import load_checkpoint, model_folder

DATASET = "images-clothing"
ALIAS = "cnn"
SERVING_BATCH = 32
CALIBRATION_BATCH = 32
# A ResNet-18 layout at half width on 96 px photos: one epoch over the 3,068 training photos is
# ~20 CPU-seconds on one core here (measured), so 30 epochs are ~10 CPU-minutes. 96 px keeps the
# garment's outline (what separates shirt / t-shirt / longsleeve); one thread, because two threads
# on the shared 2-core machine made each step ~2x slower (measured).
TRAIN_DEFAULTS = {
    "image_size": 96, "stem": 32, "widths": [32, 64, 128, 256], "blocks": [2, 2, 2, 2], "dropout": 0.2,
    "lr": 2e-3, "weight_decay": 0.05, "batch": 64, "label_smoothing": 0.1, "warmup_epochs": 1, "select": "accuracy",
    # patience 12: validation has 341 photos (one photo = 0.3 points), so its accuracy jitters by ~2 points;
    # patience 8 stopped a 30-epoch cosine run at epoch 24 on a noise peak at epoch 16 (measured)
    "patience": 12, "max_minutes": 14.0, "threads": 1,
    "augment": {"zoom": (0.7, 1.05), "aspect": 0.15, "degrees": 10.0, "shift": 0.1, "jitter": 0.25},
}


def _checkpoint_dir(name: str) -> Path:
    return home() / "vision" / f"resnet-{name}"


def default_checkpoint_dir(data: str | None = None) -> Path:
    """$SLIMCART_HOME (or ~/.cache/slimcart) / vision / resnet-<dataset folder name or 'synthetic'>."""
    path = resolve_dataset(data, DATASET)
    return _checkpoint_dir("synthetic" if path is None else path.name)


# ---------------------------------------------------------------- metrics
def accuracy(labels: np.ndarray, pred: np.ndarray) -> float:
    """Share of photos whose top-1 class is the label."""
    return float(np.mean(np.asarray(labels) == np.asarray(pred)))


def macro_f1(labels: np.ndarray, pred: np.ndarray) -> float:
    """Mean per-class F1 = 2TP / (2TP + FP + FN) over the classes in `labels` or `pred`.
    Hand-written (a few lines) so the definition is visible; tests check it against hand-computed values."""
    labels, pred = np.asarray(labels), np.asarray(pred)
    f1 = []
    for c in np.union1d(labels, pred):
        tp = np.sum((pred == c) & (labels == c))
        fp, fn = np.sum((pred == c) & (labels != c)), np.sum((pred != c) & (labels == c))
        f1.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1))


# ---------------------------------------------------------------- runner
class VisionRunner:
    """PyTorch eager: {"pixels": float32 (N, 3, S, S)} -> logits (N, classes) numpy; other keys (labels) ignored.

    `channels_last`: run a channels-last copy of the module (NHWC activations, oneDNN's preferred
    convolution layout on CPU). What a competent PyTorch user deploys: at batch 32 on this machine it
    was ~1.3x the NCHW module's throughput (bench/cnn_rnn.py measures both, interleaved)."""

    runtime = "torch"

    def __init__(self, module: torch.nn.Module, channels_last: bool = True):
        self.channels_last = channels_last
        module = module.eval()
        self.module = copy.deepcopy(module).to(memory_format=torch.channels_last) if channels_last else module

    def __call__(self, batch: dict[str, Any]) -> np.ndarray:
        x = torch.as_tensor(batch["pixels"])
        with torch.inference_mode():
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.module(x).float().numpy()


def predict(runner, images: np.ndarray, batch: int = SERVING_BATCH) -> np.ndarray:
    """Logits for uint8 (N, S, S, 3) photos, fed in serving-size batches."""
    return np.concatenate([np.asarray(runner({"pixels": to_pixels(images[i:i + batch]).numpy()}), np.float32)
                           for i in range(0, len(images), batch)])


class VisionWorkload:
    name = "vision"
    quality_keys = ("accuracy", "macro_f1")
    higher_is_better = {"accuracy": True, "macro_f1": True}
    primary_metric = "accuracy"
    serving_batch = SERVING_BATCH

    # ---------------------------------------------------------------- model
    def load_model(self, spec: str) -> ModelBundle:
        """`cnn` = the default checkpoint folder; else a folder with config.json + model.safetensors."""
        if spec == ALIAS:
            folder = default_checkpoint_dir()
            if not (folder / "model.safetensors").exists():
                raise SlimcartError(f"no trained vision model at {folder}: run `slimcart train --workload vision` "
                                    "first (or pass a model folder)")
        else:
            folder = model_folder(spec, f"'{ALIAS}'")
        module, cfg = load_checkpoint(folder, load_cnn, "the vision model")
        return ModelBundle(name=spec, module=module, source=folder, extra={"config": cfg})

    def load_companions(self, folder: Path) -> ModelBundle:
        """The config.json beside an exported model (classes and input size); no torch module."""
        f = Path(folder) / "config.json"
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
            CNNConfig.from_dict(cfg["model"])
        except (OSError, ValueError, KeyError, TypeError):
            raise SlimcartError(f"{f} is missing or not a slimcart vision config (it names the classes and input size)") from None
        return ModelBundle(name=str(folder), module=None, source=Path(folder), extra={"config": cfg})

    def save_model(self, bundle: ModelBundle, folder: Path) -> None:
        """model.safetensors + config.json (training info carried over from the source config)."""
        folder.mkdir(parents=True, exist_ok=True)
        extra = {k: v for k, v in bundle.extra.get("config", {}).items() if k not in ("model_type", "model")}
        save_cnn(bundle.module, folder, extra)

    def save_companions(self, bundle: ModelBundle, folder: Path) -> None:
        """config.json beside an exported model; one save_model wrote already describes the weights and is kept."""
        if (Path(folder) / "config.json").exists():
            return
        cfg = dict(bundle.extra.get("config", {}))
        if isinstance(bundle.module, ResNet):
            cfg.update(model_type="slimcart-resnet", model=actual_config(bundle.module).to_dict())
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text(json.dumps(cfg, indent=2))

    def torch_runner(self, bundle: ModelBundle) -> VisionRunner:
        return VisionRunner(bundle.module)

    @staticmethod
    def model_config(bundle: ModelBundle) -> CNNConfig:
        return CNNConfig.from_dict(bundle.extra.get("config", {}).get("model", {"classes": []}))

    def image_size(self, bundle: ModelBundle) -> int:
        return int(self.model_config(bundle).image_size)

    def example_batch(self, bundle: ModelBundle) -> dict:
        s = self.image_size(bundle)
        return {"pixels": np.random.default_rng(0).random((2, 3, s, s), dtype=np.float32)}

    def export_spec(self, bundle: ModelBundle) -> dict:
        return {"example": self.example_batch(bundle), "output_name": "logits", "model_type": None,
                "dynamic_axes": {"pixels": {0: "batch"}, "logits": {0: "batch"}}}

    # ---------------------------------------------------------------- data
    def load_data(self, data: str | None) -> VisionData:
        """A `split/CLASS/*.jpg` folder (--data, else SLIMCART_DATA/images-clothing), else synthetic shapes."""
        path = resolve_dataset(data, DATASET)
        return load_synthetic() if path is None else load_folder(path)

    def data_info(self, data: VisionData) -> DataInfo:
        return data.info

    def model_labels(self, bundle: ModelBundle, data: VisionData, split: str) -> np.ndarray:
        """The split's labels as indices into the model's classes (matched by class name)."""
        classes = self.model_config(bundle).classes
        unknown = [c for c in data.classes if c not in classes]
        if unknown:
            raise SlimcartError(f"the data has classes the model was not trained on ({', '.join(unknown[:5])}); model "
                                f"classes: {', '.join(classes)}. Train on it: slimcart train --workload vision --data ...")
        return np.array([classes.index(c) for c in data.classes], np.int64)[data.labels(split)]

    def preprocess_cost(self, bundle: ModelBundle, data: VisionData, n: int = 64) -> dict:
        """Decode + resize cost per photo (test files; synthetic data: its PNGs), apart from the model."""
        size = self.image_size(bundle)
        if data.arrays:
            blobs = [(f"synthetic-{i}", png_bytes(a)) for i, a in enumerate(data.arrays["test"][:n])]
        else:
            blobs = [(str(p), p.read_bytes()) for p in data.files["test"][:n]]
        return {**img.preprocess_cost(blobs, size), "synthetic": data.info.synthetic}

    # ---------------------------------------------------------------- inputs
    def bench_inputs(self, bundle: ModelBundle, data: VisionData) -> BenchInputs:
        """Decoded test photos: 64 single-photo requests and every full batch of 32 (decode timed apart)."""
        x = data.images("test", self.image_size(bundle))
        single = [{"pixels": to_pixels(x[i:i + 1]).numpy()} for i in range(min(64, len(x)))]
        serving = [{"pixels": to_pixels(x[i:i + SERVING_BATCH]).numpy()} for i in range(0, len(x), SERVING_BATCH)]
        serving = [b for b in serving if len(b["pixels"]) == SERVING_BATCH] or serving[:1]
        n = len(serving[0]["pixels"])
        return BenchInputs(single=single, serving=serving, items_per_serving_batch=n, unit="images",
                           label=f"batch {n} decoded photos")

    def calibration_batches(self, bundle: ModelBundle, data: VisionData, n: int) -> list[dict]:
        """`n` batches of 32 training photos (never validation/test) with their labels, un-augmented."""
        if not data.has("train"):
            raise SlimcartError(f"the data {data.name} has no train split to calibrate on (never the test split)")
        y = self.model_labels(bundle, data, "train")
        x = data.images("train", self.image_size(bundle))
        order = np.random.default_rng(1).permutation(len(y))[: n * CALIBRATION_BATCH]
        return [{"pixels": to_pixels(x[order[i:i + CALIBRATION_BATCH]]).numpy(), "labels": y[order[i:i + CALIBRATION_BATCH]]}
                for i in range(0, len(order), CALIBRATION_BATCH)]

    # ---------------------------------------------------------------- quality
    def evaluate(self, runner, bundle: ModelBundle, data: VisionData, reference: Any = None) -> EvalResult:
        """Accuracy and macro-F1 on the test split; outputs = logits, predictions and labels per photo."""
        y = self.model_labels(bundle, data, "test")
        logits = predict(runner, data.images("test", self.image_size(bundle)))
        n_classes = len(self.model_config(bundle).classes)
        if logits.ndim != 2 or logits.shape[1] != n_classes:
            raise SlimcartError(f"the model gives {logits.shape[-1]} scores per photo but its config names {n_classes} classes")
        pred = logits.argmax(1)
        return EvalResult(quality={"accuracy": accuracy(y, pred), "macro_f1": macro_f1(y, pred)},
                          outputs={"logits": logits, "pred": pred, "labels": y},
                          per_unit=(np.asarray(pred) == np.asarray(y)).astype(float))

    def task_loss(self, bundle: ModelBundle) -> Callable[[Any, dict], torch.Tensor]:
        """Cross-entropy on a labelled calibration batch. The labels travel inside the batch; the model's
        forward accepts and ignores `labels`, and the ONNX/OpenVINO runners feed only graph inputs."""
        def loss(module, batch):
            if "labels" not in batch:
                raise SlimcartError("the vision task loss needs labelled batches (calibration_batches carry 'labels')")
            return F.cross_entropy(module(torch.as_tensor(batch["pixels"])), torch.as_tensor(batch["labels"]))
        return loss

    def distill_task(self, teacher, student, bundle: ModelBundle, data: VisionData, options: DistillOptions | None = None):
        """Soft labels from the teacher + the true class on augmented training photos; validation
        accuracy selects the best step (see vision_distill.py)."""
        from .vision_distill import VisionDistillTask

        size = self.image_size(bundle)
        for split in ("train", "validation"):
            data.labels(split)
        return VisionDistillTask(teacher, student, data.images("train", size), self.model_labels(bundle, data, "train"),
                                 data.images("validation", size), self.model_labels(bundle, data, "validation"),
                                 data.name, options)

    # ---------------------------------------------------------------- training
    def train(self, data: str | VisionData | None = None, out: Path | None = None, epochs: int = 30, seed: int = 0,
              progress: Callable[[str], None] | None = None, resume: bool = True, **overrides) -> Path:
        """Train the ResNet from scratch on the train split through slimcart.training.fit; keep the epoch
        with the best validation accuracy (patience, wall-clock budget); returns the model folder (see
        models/cnn_train.py). `max_minutes=None` makes the run independent of the clock (exact resume)."""
        from ..models.cnn_train import fit

        hp = {**TRAIN_DEFAULTS, **overrides}
        if set(hp) != set(TRAIN_DEFAULTS):
            raise SlimcartError(f"unknown training option(s): {', '.join(sorted(set(hp) - set(TRAIN_DEFAULTS)))}")
        if hp["select"] not in self.quality_keys:
            raise SlimcartError(f"select must be one of {', '.join(self.quality_keys)}, got {hp['select']!r}")
        d = data if isinstance(data, VisionData) else self.load_data(data)
        for split in ("train", "validation"):
            d.labels(split)
        if len(d.classes) < 2:
            raise SlimcartError(f"the data {d.name} has one class ({d.classes[0]}): a classifier needs at least two")
        out = Path(out).expanduser() if out else _checkpoint_dir(d.name)
        size = int(hp["image_size"])
        x_val, y_val = d.images("validation", size), d.labels("validation")

        def validate(model: ResNet) -> float:
            pred = predict(VisionRunner(model, channels_last=False), x_val).argmax(1)  # the model trains channels-last
            return {"accuracy": accuracy, "macro_f1": macro_f1}[hp["select"]](y_val, pred)

        config = CNNConfig(classes=list(d.classes), **{k: hp[k] for k in ("image_size", "stem", "widths", "blocks", "dropout")})
        return fit(config, d.images("train", size), d.labels("train"), validate, out, hp, epochs=epochs, seed=seed,
                   progress=progress or (lambda m: None), resume=resume,
                   meta={"dataset": d.name, "n_train": len(d.labels("train")), "synthetic": d.info.synthetic})


WORKLOAD_CLASS = VisionWorkload
