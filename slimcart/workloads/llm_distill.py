"""Distilling a causal LM (llm workload): token-level KL on real review text the teacher scores.

Transfer data: fixed-width token windows of the workload's train-split documents (the evaluated
test documents are never used). Per batch: T² · KL(teacher || student) at every token, plus
optionally the next-token cross-entropy on the real text. Validation: negative mean token NLL
on held-out train-split windows (higher is better).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import losses as L
from ..errors import SlimcartError
from ..training import TeacherStudentTask

WEIGHTS = ("logits_kl", "task")
DEFAULT_WEIGHTS = {"logits_kl": 1.0}


class LlmDistillTask(TeacherStudentTask):
    """DistillTask for CausalLM teacher/student pairs with one vocabulary."""

    LOSSES, DEFAULTS, what = WEIGHTS, DEFAULT_WEIGHTS, "llm distillation"

    def __init__(self, teacher, student, windows: list[np.ndarray], weights: dict[str, float] | None = None,
                 temperature: float = 1.0, val_windows: int = 8):
        self.setup(teacher, weights)
        v_t, v_s = teacher.model.config.vocab_size, student.model.config.vocab_size
        if v_t != v_s:
            raise SlimcartError(f"teacher and student vocabularies differ ({v_t} vs {v_s} tokens): token KL needs one")
        windows = [w for w in windows if w.shape[1] == windows[0].shape[1]] if windows else []
        if len(windows) < 2:
            raise SlimcartError(f"distillation transfer data is empty or too small ({len(windows)} token windows)")
        self.T = temperature
        n_val = min(val_windows, max(1, len(windows) // 10))
        self.windows = np.concatenate(windows[:-n_val])
        self.val = np.concatenate(windows[-n_val:])
        self.set_student(student)
        digest = hashlib.sha1(self.windows.tobytes() + self.val.tobytes()).hexdigest()
        self._fp = {"windows": digest, "weights": self.w, "T": self.T}

    def set_student(self, student: nn.Module) -> None:
        self.attach(student)

    def n_examples(self) -> int:
        return len(self.windows)

    def loss(self, idx: np.ndarray):
        ids = torch.from_numpy(self.windows[idx])
        s_logits = self.student()(ids)
        parts = {}
        if "logits_kl" in self.w:
            with torch.no_grad():
                t_logits = self.teacher(ids)
            parts["logits_kl"] = L.token_kl(s_logits, t_logits, self.T)
        if "task" in self.w:
            parts["task"] = F.cross_entropy(s_logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        return self.combine(parts)

    @torch.no_grad()
    def validate(self) -> float:
        return self.score(self.student())

    @torch.no_grad()
    def score(self, model, limit: int | None = None) -> float:
        """Negative mean next-token NLL on the first `limit` held-out windows (one per pass keeps memory flat)."""
        model.eval()
        rows = self.val[:limit]
        nll = 0.0
        for row in rows:
            ids = torch.from_numpy(row[None])
            logits = model(ids)[0, :-1].float()
            nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        return -nll / (rows.shape[0] * (rows.shape[1] - 1))

    def score_undistilled(self, model) -> float:
        """Cheaper score for choosing layers: two held-out windows."""
        return self.score(model, limit=2)
