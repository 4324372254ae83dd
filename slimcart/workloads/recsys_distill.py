"""Distilling a SASRec recommender (recsys workload): logit distillation on real user histories.

Transfer data: every user's training history (leave-last-out: the validation and test items are
never inputs or targets). Per batch the student is pulled towards the teacher's full next-item
distribution at each user's most recent positions (soft-label KL over all items), optionally
its hidden states (MSE through a learned projection when the student is narrower), plus the
ordinary next-item loss on the real next items. Validation: NDCG@10 of the validation item.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .. import losses as L
from ..errors import SlimcartError
from ..models.sasrec import sequence_loss
from ..training import TeacherStudentTask
from .ranking import leave_last_out, ndcg_at, rank_users

WEIGHTS = ("logits_kl", "hidden_mse", "task")
DEFAULT_WEIGHTS = {"logits_kl": 1.0, "task": 1.0}
VAL_USERS = 3000


class RecsysDistillTask(TeacherStudentTask):
    """DistillTask for SASRec teacher/student pairs over the same item catalogue."""

    LOSSES, DEFAULTS, what = WEIGHTS, DEFAULT_WEIGHTS, "recsys distillation"

    def __init__(self, teacher, student, data, weights: dict[str, float] | None = None, temperature: float = 1.0,
                 kd_positions: int = 4, negatives: int = 1024, seed: int = 0):
        self.setup(teacher, weights)
        n_t, n_s = teacher.item_emb.num_embeddings, student.item_emb.num_embeddings
        if n_t != n_s:
            raise SlimcartError(f"teacher scores {n_t - 1} items but the student {n_s - 1}: they must share the catalogue")
        self.T, self.k, self.negatives = temperature, kd_positions, negatives
        self.max_len = teacher.config.max_len
        train, valid, _ = leave_last_out(data.histories)
        self.seqs = train
        self.users = np.array([u for u, s in enumerate(train) if len(s) >= 2], np.int64)
        if not len(self.users):
            raise SlimcartError("distillation transfer data is empty: no user has 2+ training interactions")
        users = data.eval_users[valid[data.eval_users] > 0][:VAL_USERS]
        self.val_in, self.val_tgt = [train[u] for u in users], valid[users]
        self.set_student(student)
        self._fp = {"users": int(len(self.users)), "items": int(n_t), "weights": self.w, "T": self.T, "k": self.k,
                    "negatives": negatives, "seed": seed, "name": data.name}

    def set_student(self, student: nn.Module) -> None:
        t_dim, s_dim = self.teacher.item_emb.embedding_dim, student.item_emb.embedding_dim
        self.attach(student, proj=L.projection(s_dim, t_dim))

    def n_examples(self) -> int:
        return len(self.users)

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded (input, next item) pairs, cut to the batch's longest history."""
        rows = [self.seqs[u][-(self.max_len + 1):] for u in self.users[idx]]
        width = max(len(r) for r in rows) - 1
        inp, tgt = np.zeros((len(rows), width), np.int64), np.zeros((len(rows), width), np.int64)
        for i, r in enumerate(rows):
            inp[i, width - len(r) + 1:], tgt[i, width - len(r) + 1:] = r[:-1], r[1:]
        return torch.from_numpy(inp), torch.from_numpy(tgt)

    def loss(self, idx: np.ndarray):
        inp, tgt = self.batch(idx)
        student = self.student()
        h_s = student.encode(inp)
        with torch.no_grad():
            h_t = self.teacher.encode(inp)
        # the newest k positions of each user: the prefixes the model serves (padding is on the left)
        width = inp.shape[1]
        sel = (tgt > 0) & (torch.arange(width) >= width - self.k)
        parts = {}
        if "logits_kl" in self.w:
            s_logits = h_s[sel] @ student.item_emb.weight[1:].T
            with torch.no_grad():
                t_logits = h_t[sel] @ self.teacher.item_emb.weight[1:].T
            parts["logits_kl"] = L.soft_kl(s_logits, t_logits, self.T)
        if "hidden_mse" in self.w:
            parts["hidden_mse"] = L.hidden_mse(h_s, h_t, self.heads["proj"], tgt > 0)
        if "task" in self.w:
            parts["task"] = sequence_loss(student, inp, tgt, "sampled_softmax", self.negatives, None)
        return self.combine(parts)

    @torch.no_grad()
    def validate(self) -> float:
        """NDCG@10 of the validation item (full ranking, history excluded) on a fixed user sample."""
        return self.ndcg(self.student())

    @torch.no_grad()
    def score_undistilled(self, model) -> float:
        """Validation NDCG@10 of a candidate student (used to choose layers)."""
        return self.ndcg(model)

    @torch.no_grad()
    def ndcg(self, model) -> float:
        model.eval()
        r = rank_users(lambda b: model(torch.from_numpy(b)).numpy(), self.val_in, self.val_tgt, self.max_len)
        return ndcg_at(r["ranks"])
