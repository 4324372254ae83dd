"""Distilling a DIN (ctr workload): the teacher's click probabilities as soft targets, plus the labels.

    loss = w_soft * T^2 * BCE(sigmoid(s / T), sigmoid(t / T)) + w_task * BCE(sigmoid(s), y)

s, t: student and teacher logits on the same row. With one output per row the "distribution" is
Bernoulli, so the soft-label loss is a binary cross-entropy against the teacher's probability
(Hinton's T^2 keeps its gradient scale comparable to the hard-label term as T changes).
Transfer rows: the training split (behaviour data: its positives with one negative each, drawn once,
seed `seed`). Validation: AUC on the validation split; the test split is never touched.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SlimcartError
from ..training import TeacherStudentTask, length_bucketed
from .ctr_data import CTRData
from .ctr_metrics import auc

CLOSENESS_ROWS = 4096  # training rows on which an undistilled student is compared with the teacher
EVAL_BATCH = 4096


def _features(batch: dict) -> dict:
    return {k: torch.as_tensor(v) for k, v in batch.items() if k != "label"}


class CTRDistillTask(TeacherStudentTask):
    """DistillTask (slimcart.contracts) for DIN teacher/student pairs over the same tables' ids."""

    LOSSES = ("soft", "task")
    DEFAULTS = {"soft": 1.0, "task": 1.0}
    what = "ctr distillation"

    def __init__(self, teacher, student, data: CTRData, weights: dict[str, float] | None = None,
                 temperature: float = 1.0, seed: int = 0, max_len: int = 50):
        if temperature <= 0:
            raise SlimcartError(f"distillation temperature must be > 0, got {temperature}")
        self.setup(teacher, weights)
        self.data, self.T, self.max_len = data, float(temperature), max_len
        self.rows = data.epoch_rows(np.random.default_rng([seed, 7]))
        if not len(self.rows):
            raise SlimcartError("distillation transfer data (the training split) is empty")
        self.lengths = self.rows.end if self.rows.end is not None else None
        self.set_student(student)
        self._fp = {"name": data.name, "rows": int(len(self.rows)), "weights": self.w, "T": self.T, "seed": seed}

    def set_student(self, student) -> None:
        self.attach(student)

    def n_examples(self) -> int:
        return len(self.rows)

    def arrange(self, order: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        """Batches of similar history length (less padding); batch order shuffled."""
        if self.lengths is None:
            return order
        return length_bucketed(order, np.minimum(self.lengths, self.max_len), batch_size, rng)

    def loss(self, idx):
        batch = self.data.batch(self.rows, np.asarray(idx), self.max_len, labels=True)
        feats = _features(batch)
        s = self.student()(**feats).float()
        parts = {}
        if "soft" in self.w:
            with torch.no_grad():
                target = torch.sigmoid(self.teacher(**feats).float() / self.T)
            parts["soft"] = F.binary_cross_entropy_with_logits(s / self.T, target) * self.T ** 2
        if "task" in self.w:
            parts["task"] = F.binary_cross_entropy_with_logits(s, torch.as_tensor(batch["label"], dtype=s.dtype))
        return self.combine(parts)

    @torch.no_grad()
    def logits(self, model, rows) -> np.ndarray:
        """Logits of every row in row order, scored in batches of similar history length."""
        model.eval()
        order = np.argsort(rows.end, kind="stable") if rows.end is not None else np.arange(len(rows))
        out = np.empty(len(rows), np.float32)
        for a in range(0, len(rows), EVAL_BATCH):
            idx = order[a:a + EVAL_BATCH]
            out[idx] = model(**_features(self.data.batch(rows, idx, self.max_len))).float().numpy()
        return out

    def validate(self) -> float:
        """AUC of the student on the validation split."""
        return auc(self.data.valid.label, self.logits(self.student(), self.data.valid))

    def score_undistilled(self, student) -> float:
        """Minus the soft-label BCE to the teacher on a fixed slice of training rows (higher = closer)."""
        pick = np.random.default_rng(0).choice(len(self.rows), min(CLOSENESS_ROWS, len(self.rows)), replace=False)
        rows = self.rows.take(np.sort(pick))  # a random slice: behaviour rows are stored positives first
        s, t = torch.from_numpy(self.logits(student, rows)), torch.from_numpy(self.logits(self.teacher, rows))
        return -float(F.binary_cross_entropy_with_logits(s, torch.sigmoid(t)))
