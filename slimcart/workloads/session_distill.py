"""Distilling a GRU4Rec (session workload): the student learns the teacher's next-click distribution.

Transfer data: the training sessions (never the validation sessions, never the test prefixes). At
every click of a batch of sessions, with s, t the student's and teacher's scores over all items:

    loss = w_kl · T² · KL(softmax(t/T) || softmax(s/T)) + w_task · CE(s, next click)

over all items (the KL is slimcart.losses.soft_kl). With `transfer.kd_negatives` = K, both softmaxes
run over a sampled candidate set instead: each row's true next click plus K items drawn uniformly once
per batch, every sampled logit shifted by log(n/K) after the temperature so that the candidate set's
partition sum estimates the full one (the sampled softmax of the training loss; accidental hits of
the true item masked). About n/K times cheaper per step, so many more steps fit a time budget.
Validation: HR@20 on a fixed sample of the validation sessions' prefixes (full ranking).
Options (`DistillOptions`): `losses` {"logits_kl": w, "task": w} (default 1 and 1), `temperature`,
`transfer` {"kd_negatives": K}.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import losses as L
from ..contracts import DistillOptions
from ..errors import SlimcartError
from ..models.gru4rec import MASK_VALUE
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
        k = options.transfer.get("kd_negatives") if isinstance(options.transfer, dict) else None
        self.k = None if k is None or int(k) >= data.n_items else int(k)
        self.max_len = teacher.config.max_len
        self.sessions = [s[: self.max_len + 1] for s in data.train if len(s) >= 2]
        if not self.sessions:
            raise SlimcartError("distillation transfer data is empty: no training session has 2+ clicks")
        self.lengths = np.array([len(s) for s in self.sessions])
        self.val_in, self.val_tgt = data.validation_rows(VAL_ROWS)
        self.n_items = data.n_items
        self.set_student(student)
        self._fp = {"sessions": len(self.sessions), "items": int(n_t), "weights": self.w, "T": self.T,
                    "kd_negatives": self.k, "seed": options.seed, "name": data.name}

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
        pos = tgt[mask]
        student = self.student()
        h, _ = student.encode(inp)
        h = h[mask]
        if self.k is None:
            s_logits = student.score(h)[:, 1:]  # column 0 is padding, never a next click
            target = pos - 1
        else:  # candidates: the true item (column 0) + K shared uniform draws (torch's generator: seeded per step)
            neg = torch.randint(1, self.n_items + 1, (self.k,))
            s_logits, target = self.candidate_logits(student, h, pos, neg), torch.zeros_like(pos)
        parts = {}
        if "logits_kl" in self.w:
            with torch.no_grad():
                t_h, _ = self.teacher.encode(inp)
                t_h = t_h[mask]
                t_logits = self.teacher.score(t_h)[:, 1:] if self.k is None else self.candidate_logits(self.teacher, t_h, pos, neg)
            if self.k is None:
                parts["logits_kl"] = L.soft_kl(s_logits, t_logits, self.T)
            else:  # the log(n/K) shift belongs after the temperature: applied to both, then T = 1
                parts["logits_kl"] = L.soft_kl(self.shifted(s_logits / self.T, pos, neg),
                                               self.shifted(t_logits / self.T, pos, neg), 1.0) * self.T**2
        if "task" in self.w:
            logits = s_logits.float() if self.k is None else self.shifted(s_logits.float(), pos, neg)
            parts["task"] = F.cross_entropy(logits, target)
        return self.combine(parts)

    @staticmethod
    def candidate_logits(model: nn.Module, h: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """(rows, 1 + K) scores of each row's true item and the K shared sampled items."""
        w_pos, b_pos = model.output_rows(pos)
        w_neg, b_neg = model.output_rows(neg)
        return torch.cat([((h * w_pos).sum(-1) + b_pos).unsqueeze(1), F.linear(h, w_neg, b_neg)], 1)

    def shifted(self, logits: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """Sampled columns + log(n/K) (uniform draws), accidental hits of the true item masked."""
        out = torch.cat([logits[:, :1], logits[:, 1:] + float(np.log(self.n_items / self.k))], 1)
        return out.masked_fill(torch.cat([torch.zeros_like(pos, dtype=torch.bool).unsqueeze(1),
                                          neg.unsqueeze(0) == pos.unsqueeze(1)], 1), MASK_VALUE)

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
