"""Distilling the product-photo classifier: soft labels from the teacher plus the true class.

Per batch of training photos (augmented the way training augments them, the teacher seeing the
same augmented photo as the student):

    loss = w_kl * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + w_task * CE(z_s, y)

(Hinton et al., 2015: the T^2 keeps the soft-label gradients on the scale of the hard-label ones.)
Validation: the student's top-1 accuracy on the validation split (never the test split).
The KL is written here in two lines rather than taken from slimcart.compress.distill.losses,
because a workload may not import the compress floor's internals.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SlimcartError

WEIGHTS = ("logits_kl", "task")
DEFAULTS = {"weights": {"logits_kl": 1.0, "task": 1.0}, "temperature": 2.0, "augment": True}
SCORE_PHOTOS = 128  # validation photos for the cheap teacher-closeness score


def _option(options: Any, name: str):
    """`options.name` or `options[name]` (a pydantic config or a dict), else the default."""
    if options is None:
        return DEFAULTS[name]
    value = options.get(name) if isinstance(options, dict) else getattr(options, name, None)
    return DEFAULTS[name] if value is None else value


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), mean over the batch."""
    return F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                    log_target=True, reduction="batchmean") * t * t


class VisionDistillTask:
    """DistillTask (slimcart.contracts) for a teacher/student pair over the same classes."""

    def __init__(self, teacher: nn.Module, student: nn.Module, train_images: np.ndarray, train_labels: np.ndarray,
                 val_images: np.ndarray, val_labels: np.ndarray, name: str, options: Any = None):
        weights = dict(_option(options, "weights"))
        unknown = sorted(set(weights) - set(WEIGHTS))
        if unknown:
            raise SlimcartError(f"vision distillation has no loss {unknown} (choose from {', '.join(WEIGHTS)})")
        self.w = {k: float(v) for k, v in weights.items() if v}
        if not self.w:
            raise SlimcartError("all distillation loss weights are zero")
        self.T, self.augment = float(_option(options, "temperature")), bool(_option(options, "augment"))
        if self.T <= 0:
            raise SlimcartError(f"distillation temperature must be positive, got {self.T}")
        if len(train_labels) == 0 or len(val_labels) == 0:
            raise SlimcartError("vision distillation needs non-empty train and validation splits")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.x, self.y = torch.from_numpy(np.ascontiguousarray(train_images)), torch.as_tensor(train_labels)
        self.x_val, self.y_val = val_images, np.asarray(val_labels)
        self.set_student(student)
        self._fp = {"name": name, "n_train": len(self.y), "n_val": len(self.y_val), "weights": self.w,
                    "T": self.T, "augment": self.augment, "image_size": int(self.x.shape[1])}

    def set_student(self, student: nn.Module) -> None:
        student.requires_grad_(True)  # a copy of the (frozen) teacher must train
        self._student = student

    def trainable(self) -> nn.Module:
        return self._student

    def student(self) -> nn.Module:
        return self._student

    def n_examples(self) -> int:
        return len(self.y)

    def fingerprint(self) -> dict:
        return self._fp

    def loss(self, idx: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        from ..models.cnn_train import augment, to_pixels

        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        # the trainer seeds torch's global generator per step, so augmentation resumes exactly
        x = augment(self.x[idx]) if self.augment else to_pixels(self.x[idx])
        z_s = self._student(x)
        parts = {}
        if "logits_kl" in self.w:
            with torch.no_grad():
                z_t = self.teacher(x)
            parts["logits_kl"] = soft_kl(z_s, z_t, self.T)
        if "task" in self.w:
            parts["task"] = F.cross_entropy(z_s, self.y[idx])
        total = sum(self.w[k] * v for k, v in parts.items())
        return total, {k: float(v.detach()) for k, v in parts.items()}

    @torch.no_grad()
    def _logits(self, model: nn.Module, images: np.ndarray) -> torch.Tensor:
        from ..models.cnn_train import to_pixels

        model.eval()
        return torch.cat([model(to_pixels(images[i:i + 64])) for i in range(0, len(images), 64)])

    def validate(self) -> float:
        """The student's top-1 accuracy on the validation split."""
        pred = self._logits(self._student, self.x_val).argmax(1).numpy()
        return float(np.mean(pred == self.y_val))

    def score_undistilled(self, student: nn.Module) -> float:
        """-KL(teacher || student) at T=1 on the first validation photos (higher = closer to the teacher)."""
        x = self.x_val[:SCORE_PHOTOS]
        return -float(soft_kl(self._logits(student, x), self._logits(self.teacher, x), 1.0))
