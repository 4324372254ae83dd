"""Distilling a GRU4Rec (session workload): the student learns the teacher's next-click distribution.

Transfer data: the training sessions (never the validation sessions, never the test prefixes). At
every click of a batch of sessions, with s, t the student's and teacher's scores over all items:

    loss = w_kl · T² · KL(softmax(t/T) || softmax(s/T)) + w_task · CE(s, next click)

both full softmaxes over the catalogue (the teacher's soft labels need all items anyway; the KL is
slimcart.losses.soft_kl). Validation: HR@20 on a fixed sample of the validation sessions' prefixes.
Options (`DistillOptions`): `losses` {"logits_kl": w, "task": w} (default 1 and 1), `temperature`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import losses as L
from ..contracts import DistillOptions
from ..errors import SlimcartError
from ..models.gru4rec_fit import right_padded_pairs
from ..training import TeacherStudentTask
from .ranking import hit_rate
from .session_data import K, SessionData, rank_rows

LOSSES = ("logits_kl", "task")
DEFAULT_WEIGHTS = {"logits_kl": 1.0, "task": 1.0}
VAL_ROWS = 5000


class SessionDistillTask(TeacherStudentTask):
    """DistillTask (contracts.py) for a GRU4Rec teacher and student over the same item catalogue."""

    LOSSES, DEFAULTS, what = LOSSES, DEFAULT_WEIGHTS, "session distillation"

    def __init__(self, teacher: nn.Module, student: nn.Module, data: SessionData, options: DistillOptions | None = None):
        options = options or DistillOptions()
        if not isinstance(data, SessionData):
            raise SlimcartError("session distillation needs the session workload's data")
        if options.losses is not None and any(v < 0 for v in options.losses.values()):
            raise SlimcartError("distillation loss weights must be >= 0")
        if options.temperature <= 0:
            raise SlimcartError(f"distillation temperature must be > 0, got {options.temperature}")
        n_t, n_s = teacher.item_emb.num_embeddings, student.item_emb.num_embeddings
        if n_t != n_s:
            raise SlimcartError(f"teacher scores {n_t - 1} items but the student {n_s - 1}: they must share the catalogue")
        self.setup(teacher, options.losses)
        self.T = float(options.temperature)
        self.max_len = teacher.config.max_len
        self.sessions = [s[: self.max_len + 1] for s in data.train if len(s) >= 2]
        if not self.sessions:
            raise SlimcartError("distillation transfer data is empty: no training session has 2+ clicks")
        self.lengths = np.array([len(s) for s in self.sessions])
        self.val_in, self.val_tgt = data.validation_rows(VAL_ROWS)
        self.n_items = data.n_items
        self.set_student(student)
        self._fp = {"sessions": len(self.sessions), "items": int(n_t), "weights": self.w, "T": self.T,
                    "seed": options.seed, "name": data.name}

    def set_student(self, student: nn.Module) -> None:
        self.attach(student)

    def n_examples(self) -> int:
        return len(self.sessions)

    def arrange(self, order, batch_size: int, rng):
        from ..training import length_bucketed

        return length_bucketed(order, self.lengths, batch_size, rng)

    def loss(self, idx) -> tuple[torch.Tensor, dict[str, float]]:
        inp, tgt = right_padded_pairs([self.sessions[i] for i in np.asarray(idx)])
        mask = tgt > 0
        student = self.student()
        h, _ = student.encode(inp)
        s_logits = student.score(h[mask])[:, 1:]  # column 0 is padding, never a next click
        parts = {}
        if "logits_kl" in self.w:
            with torch.no_grad():
                t_h, _ = self.teacher.encode(inp)
                t_logits = self.teacher.score(t_h[mask])[:, 1:]
            parts["logits_kl"] = L.soft_kl(s_logits, t_logits, self.T)
        if "task" in self.w:
            parts["task"] = F.cross_entropy(s_logits.float(), tgt[mask] - 1)
        return self.combine(parts)

    @torch.no_grad()
    def validate(self) -> float:
        """HR@20 on the validation sample (full ranking over all items)."""
        return self.score_undistilled(self.student())

    @torch.no_grad()
    def score_undistilled(self, student: nn.Module) -> float:
        was_training = student.training
        student.eval()
        ranks = rank_rows(lambda b: student(torch.from_numpy(b)).float().numpy(), self.val_in, self.val_tgt,
                          self.max_len, self.n_items)
        student.train(was_training)
        return hit_rate(ranks, K)
