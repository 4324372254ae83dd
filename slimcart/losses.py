"""Distillation and training losses shared by techniques and workloads' distillation tasks: plain functions of student and teacher tensors, each a scalar mean.

Every KL here is KL(teacher || student) on temperature-softened distributions, multiplied by T²
so its gradient scale stays comparable to a hard-label loss when T changes (Hinton et al., 2015).
Masks are boolean, True = position counts; fully masked inputs give 0 rather than NaN.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SlimcartError


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def _check_same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise SlimcartError(f"{what}: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}"
                            " (give the student a projection, or pick a loss that does not compare them directly)")


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """T² · KL(softmax(t/T) || softmax(s/T)) over the last dim, averaged over the other (masked) positions."""
    _check_same_shape(student_logits, teacher_logits, "soft-label KL")
    t = teacher_logits.float() / temperature
    s = student_logits.float() / temperature
    p = F.softmax(t, -1)
    kl = (p * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1)
    return _masked_mean(kl, mask) * temperature**2


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Token-level KL for causal LMs: (B, L, V) logits, mean over the non-padding tokens."""
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise SlimcartError(f"token KL needs the same vocabulary: student has {student_logits.shape[-1]} tokens, "
                            f"teacher {teacher_logits.shape[-1]}")
    mask = None if attention_mask is None else attention_mask.bool()
    return soft_kl(student_logits, teacher_logits, temperature, mask)


def listwise_kl(student_scores: torch.Tensor, teacher_scores: torch.Tensor, temperature: float = 1.0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Listwise ranking distillation (ListNet-style): each row is one query's scores over its candidate
    products; the student's softmax ranking distribution is pulled towards the teacher's.
    `mask` (same shape as the scores) drops padded candidates from both distributions."""
    _check_same_shape(student_scores, teacher_scores, "listwise ranking KL")
    if mask is not None:
        neg = torch.finfo(torch.float32).min / 4
        student_scores = student_scores.float().masked_fill(~mask, neg)
        teacher_scores = teacher_scores.float().masked_fill(~mask, neg)
    return soft_kl(student_scores, teacher_scores, temperature)


def binary_kl(student_logit: torch.Tensor, teacher_logit: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Logit distillation for CTR models: T² · KL(Bernoulli(σ(t/T)) || Bernoulli(σ(s/T))), mean over items."""
    _check_same_shape(student_logit, teacher_logit, "binary logit KL")
    t, s = teacher_logit.float() / temperature, student_logit.float() / temperature
    p = torch.sigmoid(t)
    # log σ(x) = -softplus(-x), log(1 - σ(x)) = -softplus(x): stable for large |x|
    kl = p * (F.softplus(-s) - F.softplus(-t)) + (1 - p) * (F.softplus(s) - F.softplus(t))
    return kl.mean() * temperature**2


def embedding_cosine(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """Mean (1 - cosine similarity) between matching rows of two (N, D) embedding matrices."""
    _check_same_shape(student_emb, teacher_emb, "embedding cosine")
    return (1 - F.cosine_similarity(student_emb.float(), teacher_emb.float(), dim=-1)).mean()


def embedding_mse(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per element between two (N, D) embedding matrices."""
    _check_same_shape(student_emb, teacher_emb, "embedding MSE")
    return F.mse_loss(student_emb.float(), teacher_emb.float())


def projection(student_width: int, teacher_width: int) -> nn.Module:
    """Learned map from the student's width to the teacher's (identity when they already match).

    Trained with the student but never saved with it: it only exists to compare hidden states."""
    if student_width == teacher_width:
        return nn.Identity()
    proj = nn.Linear(student_width, teacher_width, bias=False)
    nn.init.normal_(proj.weight, std=student_width**-0.5)
    return proj


def hidden_mse(student_h: torch.Tensor, teacher_h: torch.Tensor, proj: nn.Module | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between (B, L, D) hidden states after projecting the student's; mean over the unmasked
    positions of the per-position mean squared error."""
    if proj is not None:
        student_h = proj(student_h)
    _check_same_shape(student_h, teacher_h, "hidden-state MSE")
    per_pos = (student_h.float() - teacher_h.float()).pow(2).mean(-1)
    return _masked_mean(per_pos, mask)


def attention_kl(student_att: torch.Tensor, teacher_att: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MiniLM self-attention distribution transfer: KL(teacher row || student row) for every head and
    query position of (B, H, L, L) attention probabilities; `mask` (B, L) marks real tokens."""
    _check_same_shape(student_att, teacher_att, "attention-map KL")
    eps = 1e-12  # probabilities of masked keys are exactly 0 in both: their terms vanish
    kl = (teacher_att * (torch.log(teacher_att + eps) - torch.log(student_att + eps))).sum(-1)  # (B, H, L)
    row_mask = None if mask is None else mask.bool()[:, None, :].expand_as(kl)
    return _masked_mean(kl, row_mask)


def self_relation(x: torch.Tensor, heads: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MiniLM-v2 relation: split (B, L, D) vectors into `heads` relation heads and return the
    (B, heads, L, L) softmax of their scaled dot products (padding keys excluded)."""
    b, L, d = x.shape
    if d % heads:
        raise SlimcartError(f"relation heads ({heads}) must divide the width {d}")
    xh = x.float().reshape(b, L, heads, d // heads).transpose(1, 2)
    scores = xh @ xh.transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min / 4)
    return scores.softmax(-1)


def relation_kl(student_x: torch.Tensor, teacher_x: torch.Tensor, heads: int,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Value-relation (or query/key-relation) transfer: KL between teacher and student self-relations.
    Widths may differ (only the L×L relations are compared), heads must divide both widths."""
    return attention_kl(self_relation(student_x, heads, mask), self_relation(teacher_x, heads, mask), mask)

