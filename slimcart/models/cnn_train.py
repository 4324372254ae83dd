"""Training the product-photo ResNet (slimcart/models/cnn.py) from scratch through slimcart's one
trainer (slimcart.training.fit): the batch augmentation, the objective, and the task object.

Augmentation (all in torch on whole batches of already-decoded uint8 photos, so no image library
runs inside the loop; torchvision's transforms are not available in this torch build):
- geometry: one random affine map per photo applied with `affine_grid` + `grid_sample` —
  zoom s ~ U(zoom) of the side (s < 1 crops in), aspect a ~ exp(U(+-aspect)), rotation
  r ~ U(+-degrees), shift t ~ U(+-shift) and a horizontal flip f = +-1 with probability 1/2:
      [x_in, y_in] = [[f s sqrt(a) cos r, -s/sqrt(a) sin r], [f s sqrt(a) sin r, s/sqrt(a) cos r]] [x_out, y_out] + t
  in the normalised [-1, 1] coordinates of grid_sample; border pixels fill what lies outside.
- colour: brightness b, contrast c (around each photo's mean grey) and saturation g (towards its
  grey image), each ~ U(1 +- jitter):  x <- clamp(mix(grey(x'), x', g)),  x' = (x b - m) c + m.
The photos are stored at the model's input size, the same decode + resize the test images get,
so the un-augmented training input is exactly what serving sees.

Objective: cross-entropy with label smoothing eps (target 1 - eps + eps/K on the class, eps/K on the
others); AdamW, a linear warm-up then cosine decay to zero (TrainConfig schedule "cosine"), batch
norm normalising with batch statistics (TrainConfig batch_norm "update") and dropout on.
The augmentation draws from torch's global generator, which the trainer seeds per step, so a
resumed run takes exactly the steps an uninterrupted one would.
"""
from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..outputs import atomic_dir
from .cnn import CNNConfig, ResNet, count_params, save_cnn

AUGMENT_DEFAULTS = {"zoom": (0.7, 1.05), "aspect": 0.15, "degrees": 10.0, "shift": 0.1, "jitter": 0.25}
GREY = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights


def to_pixels(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) photos -> the model's input: float32 (N, 3, H, W) in [0, 1]."""
    x = torch.as_tensor(images)
    return x.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def augment(images: torch.Tensor, gen: torch.Generator | None = None, zoom=(0.7, 1.05), aspect: float = 0.15,
            degrees: float = 10.0, shift: float = 0.1, jitter: float = 0.25) -> torch.Tensor:
    """Random geometry + colour of a uint8 (N, H, W, 3) batch -> float (N, 3, H, W) in [0, 1] (see module doc).
    `gen` None: torch's global generator."""
    x = to_pixels(images)
    n = x.shape[0]

    def u(lo, hi):
        return torch.rand(n, generator=gen) * (hi - lo) + lo

    s, a, r = u(*zoom), torch.exp(u(-aspect, aspect)), u(-degrees, degrees) * (math.pi / 180)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    sx, sy = flip * s * a.sqrt(), s / a.sqrt()
    theta = torch.stack([torch.stack([sx * r.cos(), -sy * r.sin(), u(-shift, shift)], 1),
                         torch.stack([sx * r.sin(), sy * r.cos(), u(-shift, shift)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    b, c, g = (u(1 - jitter, 1 + jitter).view(n, 1, 1, 1) for _ in range(3))
    weights = torch.tensor(GREY).view(1, 3, 1, 1)
    mean = (x * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True) * b
    x = (x * b - mean) * c + mean
    grey = (x * weights).sum(1, keepdim=True)
    return (grey + (x - grey) * g).clamp_(0.0, 1.0)


def top_up_last_batch(order: np.ndarray, batch_size: int) -> np.ndarray:
    """An epoch's order with a short last batch filled from the epoch's first examples: batch-norm
    statistics of a handful of photos are noise, and every photo is still seen once per epoch."""
    short = len(order) % batch_size
    return order if short == 0 or len(order) < batch_size else np.concatenate([order, order[: batch_size - short]])


class CNNTask:
    """Training from scratch as a task for `slimcart.training.fit`: the examples are the stored uint8
    training photos, each step's batch augmented and scored by label-smoothed cross-entropy."""

    def __init__(self, model: ResNet, images: np.ndarray, labels: np.ndarray, hp: dict,
                 validate: Callable[[ResNet], float], fingerprint: dict):
        self.model, self.hp, self._validate, self._fp = model, hp, validate, fingerprint
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def trainable(self) -> ResNet:
        return self.model

    def student(self) -> ResNet:
        return self.model

    def n_examples(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> dict:
        return self._fp

    def arrange(self, order: np.ndarray, batch_size: int, rng) -> np.ndarray:
        return top_up_last_batch(order, batch_size)

    def loss(self, idx) -> tuple[torch.Tensor, dict[str, float]]:
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        # channels-last: oneDNN's fastest convolution layout on CPU (the model is kept in it while training)
        x = augment(self.images[idx], None, **self.hp["augment"]).contiguous(memory_format=torch.channels_last)
        return F.cross_entropy(self.model(x), self.labels[idx], label_smoothing=self.hp["label_smoothing"]), {}

    def validate(self) -> float:
        return self._validate(self.model)

    def score_undistilled(self, model) -> float:
        return self._validate(model)


def fit(config: CNNConfig, images: np.ndarray, labels: np.ndarray, validate: Callable[[ResNet], float], out: Path,
        hp: dict, epochs: int, seed: int, progress: Callable[[str], None], resume: bool, meta: dict) -> Path:
    """Train on uint8 photos (N, H, W, 3) + class indices; validate after every epoch (`validate` returns
    the score selecting the best epoch, higher is better); stop after `patience` epochs without a
    better one, after `epochs`, or at `max_minutes` (the cosine decay follows whichever budget runs out
    first, so a run cut by the clock still anneals). The best epoch's model is saved to `out`;
    checkpoints go to `<out>.partial` (resumed when `resume` and the data and settings match)."""
    from ..training import TrainConfig
    from ..training import fit as train

    torch.manual_seed(seed)
    model = ResNet(config).to(memory_format=torch.channels_last)
    augment_json = {k: list(v) if isinstance(v, tuple) else v for k, v in hp["augment"].items()}
    fingerprint = {"config": config.to_dict(), "seed": seed, **meta, "augment": augment_json,
                   **{k: hp[k] for k in ("lr", "weight_decay", "batch", "label_smoothing", "warmup_epochs", "select")}}
    task = CNNTask(model, images, labels, hp, validate, fingerprint)
    per_epoch = max(1, math.ceil(task.n_examples() / hp["batch"]))
    cfg = TrainConfig(max_steps=per_epoch * epochs, epochs=epochs, max_minutes=hp["max_minutes"], batch_size=hp["batch"],
                      lr=hp["lr"], weight_decay=hp["weight_decay"], warmup=min(hp["warmup_epochs"] / epochs, 0.5),
                      schedule="cosine", grad_clip=None, eval_every=per_epoch, patience=hp["patience"], seed=seed,
                      dropout=True, batch_norm="update")
    partial = out.with_name(out.name + ".partial")
    if not resume:
        shutil.rmtree(partial, ignore_errors=True)
    progress(f"training a {count_params(model) / 1e6:.2f}M-parameter ResNet on {task.n_examples()} photos")
    # One intra-op thread by default: on the shared 2-core machine two threads ran each step ~2x slower (measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(hp.get("threads", 1))
    try:
        res = train(task, cfg, partial, progress, label="ResNet")
    finally:
        torch.set_num_threads(threads)
    model = model.to(memory_format=torch.contiguous_format).eval()
    training = {"epochs": round(res.steps / per_epoch, 2), "best_epoch": round(res.best_step / per_epoch, 2),
                "seconds": res.seconds, "cpu_seconds": res.cpu_seconds, "stopped": res.stopped, "history": res.history,
                f"val_{hp['select']}": res.best_score, "seed": seed, "epochs_planned": epochs,
                **{k: v for k, v in hp.items() if k != "augment"}, "augment": augment_json}
    extra = {"dataset": meta.get("dataset"), "training": training}
    atomic_dir(out, lambda f: save_cnn(model, f, extra))
    shutil.rmtree(partial, ignore_errors=True)
    return out
