"""Distilling a GRU4Rec (session workload): the student learns the teacher's next-click distribution.

Transfer data: the training sessions (never the validation sessions, never the test prefixes). At
every click of a batch of sessions, with s, t the student's and teacher's scores over all items:

    loss = w_kl · T² · KL(softmax(t/T) || softmax(s/T)) + w_task · CE(s, next click)

both full softmaxes over the catalogue (the teacher's soft labels need all items anyway). The KL
is written out here rather than imported from slimcart.compress: workloads and compress meet only
through contracts.py. Validation: HR@20 on a fixed sample of the validation sessions' prefixes.

Options (a mapping or an object with these attributes, all optional): `losses` {"logits_kl": w,
"task": w} (default 1 and 1), `temperature` (default 1), `seed`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SlimcartError

LOSSES = ("logits_kl", "task")
DEFAULT_WEIGHTS = {"logits_kl": 1.0, "task": 1.0}
VAL_ROWS = 5000


def _option(options: Any, name: str, default: Any) -> Any:
    if options is None:
        return default
    value = options.get(name) if isinstance(options, dict) else getattr(options, name, None)
    return default if value is None else value


def soft_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) || softmax(student/T)), mean over rows (Hinton et al., 2015)."""
    t = F.log_softmax(teacher.float() / temperature, -1)
    s = F.log_softmax(student.float() / temperature, -1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


class SessionDistillTask:
    """DistillTask (contracts.py) for a GRU4Rec teacher and student over the same item catalogue."""

    def __init__(self, teacher: nn.Module, student: nn.Module, data, options: Any = None):
        from .session import SessionData

        if not isinstance(data, SessionData):
            raise SlimcartError("session distillation needs the session workload's data")
        weights = dict(_option(options, "losses", DEFAULT_WEIGHTS))
        unknown = sorted(set(weights) - set(LOSSES))
        if unknown:
            raise SlimcartError(f"session distillation has no loss {unknown} (choose from {', '.join(LOSSES)})")
        if any(v < 0 for v in weights.values()):
            raise SlimcartError("distillation loss weights must be >= 0")
        self.w = {k: float(v) for k, v in weights.items() if v}
        if not self.w:
            raise SlimcartError("all distillation loss weights are zero")
        self.T = float(_option(options, "temperature", 1.0))
        if self.T <= 0:
            raise SlimcartError(f"distillation temperature must be > 0, got {self.T}")
        n_t, n_s = teacher.item_emb.num_embeddings, student.item_emb.num_embeddings
        if n_t != n_s:
            raise SlimcartError(f"teacher scores {n_t - 1} items but the student {n_s - 1}: they must share the catalogue")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.max_len = teacher.config.max_len
        self.sessions = [s[: self.max_len + 1] for s in data.train if len(s) >= 2]
        if not self.sessions:
            raise SlimcartError("distillation transfer data is empty: no training session has 2+ clicks")
        self.val_in, self.val_tgt = data.validation_rows(VAL_ROWS)
        self.n_items = data.n_items
        self.set_student(student)
        self._fp = {"sessions": len(self.sessions), "items": int(n_t), "weights": self.w, "T": self.T,
                    "seed": int(_option(options, "seed", 0)), "name": data.name}

    def set_student(self, student: nn.Module) -> None:
        student.requires_grad_(True)  # a copy of the frozen teacher must train
        self.heads = nn.ModuleDict({"student": student})

    def trainable(self) -> nn.Module:
        return self.heads

    def student(self) -> nn.Module:
        return self.heads["student"]

    def n_examples(self) -> int:
        return len(self.sessions)

    def fingerprint(self) -> dict:
        return self._fp

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (clicks, next clicks) of sessions `idx`, cut to the batch's longest."""
        rows = [self.sessions[i] for i in np.asarray(idx)]
        width = max(len(r) for r in rows) - 1
        inp, tgt = np.zeros((len(rows), width), np.int64), np.zeros((len(rows), width), np.int64)
        for i, r in enumerate(rows):
            inp[i, :len(r) - 1], tgt[i, :len(r) - 1] = r[:-1], r[1:]
        return torch.from_numpy(inp), torch.from_numpy(tgt)

    def loss(self, idx) -> tuple[torch.Tensor, dict[str, float]]:
        inp, tgt = self.batch(idx)
        mask = tgt > 0
        student = self.student()
        h, _ = student.encode(inp)
        s_logits = student.score(h[mask])[:, 1:]  # column 0 is padding, never a next click
        parts = {}
        if "logits_kl" in self.w:
            with torch.no_grad():
                t_h, _ = self.teacher.encode(inp)
                t_logits = self.teacher.score(t_h[mask])[:, 1:]
            parts["logits_kl"] = soft_kl(s_logits, t_logits, self.T)
        if "task" in self.w:
            parts["task"] = F.cross_entropy(s_logits.float(), tgt[mask] - 1)
        total = sum(self.w[k] * v for k, v in parts.items())
        return total, {k: float(v.detach()) for k, v in parts.items()}

    @torch.no_grad()
    def validate(self) -> float:
        """HR@20 on the validation sample (full ranking over all items)."""
        return self.score_undistilled(self.student())

    @torch.no_grad()
    def score_undistilled(self, student: nn.Module) -> float:
        from .session import hit_rate, rank_rows

        was_training = student.training
        student.eval()
        ranks = rank_rows(lambda b: student(torch.from_numpy(b)).float().numpy(), self.val_in, self.val_tgt,
                          self.max_len, self.n_items)
        student.train(was_training)
        return hit_rate(ranks)
