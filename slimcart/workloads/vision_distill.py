"""Distilling the product-photo classifier: soft labels from the teacher plus the true class.

Per batch of training photos (augmented the way training augments them, the teacher seeing the
same augmented photo as the student):

    loss = w_kl * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + w_task * CE(z_s, y)

(Hinton et al., 2015: the T^2 keeps the soft-label gradients on the scale of the hard-label ones;
slimcart.losses.soft_kl.) Validation: the student's top-1 accuracy on the validation split (never
the test split). Whether batch norm uses batch statistics while the student trains is the
trainer's setting (TrainConfig.batch_norm), not the task's.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import losses as L
from ..contracts import DistillOptions
from ..errors import SlimcartError
from ..models.cnn_train import AUGMENT_DEFAULTS, augment, to_pixels
from ..training import TeacherStudentTask

WEIGHTS = ("logits_kl", "task")
DEFAULT_WEIGHTS = {"logits_kl": 1.0, "task": 1.0}
SCORE_PHOTOS = 128  # validation photos for the cheap teacher-closeness score
EVAL_BATCH = 64


class VisionDistillTask(TeacherStudentTask):
    """DistillTask (slimcart.contracts) for a teacher/student pair over the same classes."""

    LOSSES, DEFAULTS, what = WEIGHTS, DEFAULT_WEIGHTS, "vision distillation"

    def __init__(self, teacher: nn.Module, student: nn.Module, train_images: np.ndarray, train_labels: np.ndarray,
                 val_images: np.ndarray, val_labels: np.ndarray, name: str, options: DistillOptions | None = None,
                 augment_photos: bool = True):
        options = options or DistillOptions()
        self.setup(teacher, options.losses)
        self.T, self.augment = float(options.temperature), augment_photos
        if len(train_labels) == 0 or len(val_labels) == 0:
            raise SlimcartError("vision distillation needs non-empty train and validation splits")
        self.x, self.y = torch.from_numpy(np.ascontiguousarray(train_images)), torch.as_tensor(train_labels)
        self.x_val, self.y_val = val_images, np.asarray(val_labels)
        self.set_student(student)
        # JSON types only (lists, not tuples): the trainer compares this with the copy read back from a checkpoint
        augment_json = {k: list(v) if isinstance(v, tuple) else v for k, v in AUGMENT_DEFAULTS.items()}
        self._fp = {"name": name, "n_train": len(self.y), "n_val": len(self.y_val), "weights": self.w, "T": self.T,
                    "augment": augment_json if augment_photos else None, "image_size": int(self.x.shape[1]),
                    "seed": options.seed}

    def set_student(self, student: nn.Module) -> None:
        self.attach(student)

    def n_examples(self) -> int:
        return len(self.y)

    def loss(self, idx: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        # augmentation draws from torch's global generator, which the trainer seeds per step: exact resume
        x = augment(self.x[idx], None, **AUGMENT_DEFAULTS) if self.augment else to_pixels(self.x[idx])
        z_s = self.student()(x)
        parts = {}
        if "logits_kl" in self.w:
            with torch.no_grad():
                z_t = self.teacher(x)
            parts["logits_kl"] = L.soft_kl(z_s, z_t, self.T)
        if "task" in self.w:
            parts["task"] = F.cross_entropy(z_s, self.y[idx])
        return self.combine(parts)

    @torch.no_grad()
    def _logits(self, model: nn.Module, images: np.ndarray) -> torch.Tensor:
        training = model.training
        model.eval()
        try:
            return torch.cat([model(to_pixels(images[i:i + EVAL_BATCH])) for i in range(0, len(images), EVAL_BATCH)])
        finally:
            model.train(training)

    def validate(self) -> float:
        """The student's top-1 accuracy on the validation split."""
        pred = self._logits(self.student(), self.x_val).argmax(1).numpy()
        return float(np.mean(pred == self.y_val))

    def score_undistilled(self, student: nn.Module) -> float:
        """-KL(teacher || student) at T=1 on the first validation photos (higher = closer to the teacher)."""
        x = self.x_val[:SCORE_PHOTOS]
        return -float(L.soft_kl(self._logits(student, x), self._logits(self.teacher, x), 1.0))
