"""Compositional quotient-remainder embeddings (Shi et al. 2020, "Compositional Embeddings Using
Complementary Partitions for Memory-Efficient Recommendation Systems").

With c = `collisions` and m = ceil(N / c), id i has quotient q = i // m (c rows, table Q) and
remainder r = i mod m (m rows, table R). No two ids share both, so every id keeps a distinct vector:
    mult    E[i] = Q[q] * R[r]                  (element-wise; the paper's default)
    sum     E[i] = Q[q] + R[r]
    concat  E[i] = [Q[q], R[r]]                 (Q has d_q columns, R has d - d_q)
Parameters: (c + m) * d instead of N * d, about 1/c of the table for c << m.

Starting point from a trained table (weights w_i, e.g. training counts + 1, minimise
sum_i w_i ||E[i] - E_fit[i]||^2; a short retraining of the whole model then recovers the rest):
    mult    per column k a rank-1 fit of the c x m matrix E[., ., k], by alternating least squares:
            R[r,k] = sum_q w E Q / sum_q w Q^2,  Q[q,k] = sum_r w E R / sum_r w R^2
    sum     alternating weighted means: Q[q] = mean_r (E - R[r]), R[r] = mean_q (E - Q[q])
    concat  Q[q] = weighted mean of E[i, :d_q] over its bucket, R[r] likewise of E[i, d_q:]
Scoring every row never builds E: mult gives h E[i]^T = (h * Q[q]) R[r]^T, a [B, c, d] x [d, m]
product; sum gives h Q^T + h R^T broadcast; concat splits h.
"""
from __future__ import annotations

import torch
from torch import nn

from ...errors import SlimcartError
from .base import (
    CompressedEmbedding,
    check_frequencies,
    register_table,
    table_shape,
    tensor,
)
from .rowwise import bag_mode, source_weight

OPERATIONS = ("mult", "sum", "concat")


@register_table
class QREmbedding(CompressedEmbedding):
    kind = "qr"

    def __init__(self, num_embeddings: int, embedding_dim: int, collisions: int, operation: str = "mult",
                 q_dim: int | None = None, padding_idx=None, mode=None):
        super().__init__(num_embeddings, embedding_dim, padding_idx, mode)
        if operation not in OPERATIONS:
            raise SlimcartError(f"QR operation must be one of {OPERATIONS}, got {operation!r}")
        if not 1 <= collisions <= num_embeddings:
            raise SlimcartError(f"QR collisions must be between 1 and the table's {num_embeddings} rows, got {collisions}")
        self.operation, self.collisions = operation, int(collisions)
        self.m = -(-num_embeddings // collisions)
        n_q = -(-num_embeddings // self.m)
        if operation == "concat":
            self.q_dim = q_dim if q_dim is not None else embedding_dim // 2
            if not 1 <= self.q_dim < embedding_dim:
                raise SlimcartError(f"QR concat q_dim must be between 1 and {embedding_dim - 1}, got {self.q_dim}")
            dq, dr = self.q_dim, embedding_dim - self.q_dim
        else:
            self.q_dim, dq, dr = None, embedding_dim, embedding_dim
        self.Q = nn.Parameter(torch.zeros(n_q, dq))
        self.R = nn.Parameter(torch.zeros(self.m, dr))

    def split(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(quotient, remainder) of each id."""
        return torch.div(ids, self.m, rounding_mode="floor"), torch.remainder(ids, self.m)

    @classmethod
    def from_embedding(cls, emb: nn.Module, config, frequencies=None) -> QREmbedding:
        w = source_weight(emb).float()
        n, d = w.shape
        new = cls(n, d, config.collisions, config.operation, config.q_dim, emb.padding_idx, bag_mode(emb))
        weight = torch.ones(n, dtype=torch.float64) if frequencies is None else check_frequencies(frequencies, n) + 1
        with torch.no_grad():
            if config.init == "random":
                g = torch.Generator().manual_seed(config.seed)
                std = float(w.std())
                scale = std ** 0.5 if config.operation == "mult" else std / (2 ** 0.5 if config.operation == "sum" else 1)
                new.Q.normal_(0, scale, generator=g)
                new.R.normal_(0, scale, generator=g)
            else:
                new._fit(w, weight.float(), config.fit_iters)
        return new

    def _fit(self, w: torch.Tensor, weight: torch.Tensor, iters: int) -> None:
        """Weighted least-squares starting point (see the module docstring)."""
        n, d = w.shape
        c, m = self.Q.shape[0], self.m
        E = torch.zeros(c * m, d)
        E[:n] = w
        W = torch.zeros(c * m)
        W[:n] = weight
        if self.padding_idx is not None:
            W[self.padding_idx] = 0.0  # padding looks up zero whatever Q and R hold
        E, W = E.reshape(c, m, d), W.reshape(c, m, 1)
        tiny = 1e-12
        if self.operation == "concat":
            self.Q.copy_((W * E[..., : self.q_dim]).sum(1) / W.sum(1).clamp_min(tiny))
            self.R.copy_((W * E[..., self.q_dim:]).sum(0) / W.sum(0).clamp_min(tiny))
            return
        if self.operation == "sum":
            Q, R = torch.zeros(c, d), (W * E).sum(0) / W.sum(0).clamp_min(tiny)
            for _ in range(max(1, iters)):
                Q = (W * (E - R)).sum(1) / W.sum(1).clamp_min(tiny)
                R = (W * (E - Q[:, None])).sum(0) / W.sum(0).clamp_min(tiny)
        else:
            # Start Q at each bucket's root-mean-square per column with the sign of its mean: a rank-1
            # factor close to the leading one, so ALS converges in a few sweeps.
            rms = ((W * E * E).sum(1) / W.sum(1).clamp_min(tiny)).sqrt()
            Q = torch.where((W * E).sum(1) < 0, -rms, rms)
            Q = torch.where(Q.abs() < tiny, torch.ones_like(Q), Q)
            for _ in range(max(1, iters)):
                R = (W * E * Q[:, None]).sum(0) / (W * Q[:, None] ** 2).sum(0).clamp_min(tiny)
                Q = (W * E * R[None]).sum(1) / (W * R[None] ** 2).sum(1).clamp_min(tiny)
        self.Q.copy_(Q)
        self.R.copy_(R)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        q, r = self.split(ids)
        a, b = self.Q[q], self.R[r]
        if self.operation == "mult":
            return a * b
        if self.operation == "sum":
            return a + b
        return torch.cat([a, b], -1)

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        B, n = h.shape[0], self.num_embeddings
        if self.operation == "mult":
            s = (h[:, None, :] * self.Q[None]) @ self.R.t()  # [B, c, m]
        elif self.operation == "sum":
            s = (h @ self.Q.t())[:, :, None] + (h @ self.R.t())[:, None, :]
        else:
            s = (h[:, : self.q_dim] @ self.Q.t())[:, :, None] + (h[:, self.q_dim:] @ self.R.t())[:, None, :]
        return self._zero_padding_column(s.reshape(B, -1)[:, :n].contiguous())

    def state_for_save(self):
        return ({"Q": self.Q.detach(), "R": self.R.detach()},
                self._meta(collisions=self.collisions, operation=self.operation, q_dim=self.q_dim))

    @classmethod
    def from_saved(cls, tensors, meta):
        n, d, pad, mode = table_shape(meta)
        new = cls(n, d, int(meta.get("collisions", 0)), meta.get("operation", ""), meta.get("q_dim"), pad, mode)
        with torch.no_grad():
            new.Q.copy_(tensor(tensors, "Q", torch.float32, tuple(new.Q.shape)))
            new.R.copy_(tensor(tensors, "R", torch.float32, tuple(new.R.shape)))
        return new
