"""SparseGPT (Frantar & Alistarh, 2023): prune a Linear and fix up the surviving weights.

For a layer's inputs X, minimising ||W X - W' X||^2 has Hessian H = X X^T. Columns are processed
left to right: pruning column i's weights leaves an error that the Optimal Brain Surgeon update
spreads over the not-yet-processed columns via the upper Cholesky factor of H^-1. Masks are
chosen per block of columns ("adaptive mask selection") from w^2 / [H^-1]_ii^2, so the choice
already knows which weights are cheap to remove. N:M picks N of every M inputs per row the same way.
"""
from __future__ import annotations

import torch

from ...errors import SlimcartError
from .masks import check_nm


class HessianStats:
    """Running X^T X of one Linear's inputs (float32 sums, tokens flattened)."""

    def __init__(self, in_features: int):
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.xtx.addmm_(x.T, x)
        self.tokens += x.shape[0]


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, so that H^-1 = U^T U."""
    h = h + damp * torch.diagonal(h).mean() * torch.eye(len(h), dtype=h.dtype)
    for extra in (0.0, 1e-6, 1e-4, 1e-2):  # rarely, rounding leaves H not positive definite
        try:
            lower = torch.linalg.cholesky(h + extra * torch.diagonal(h).mean() * torch.eye(len(h), dtype=h.dtype))
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise SlimcartError("SparseGPT: the calibration Hessian is not positive definite even after damping")


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, stats: HessianStats, sparsity: float, nm: tuple[int, int] | None = None,
                    block_size: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(new weight, keep-mask) for one Linear weight (out, in); the caller writes them back.

    Unstructured: exactly round(sparsity * numel) weights are zero. N:M: every group of M inputs of
    every row keeps N.
    """
    if stats.tokens == 0:
        raise SlimcartError("SparseGPT got no calibration inputs for a layer")
    rows, cols = weight.shape
    if nm is not None:
        check_nm((rows, cols), *nm)
        block_size = max(nm[1], block_size - block_size % nm[1])  # N:M groups must not straddle blocks
    W = weight.detach().double().clone()
    H = stats.xtx.double() / stats.tokens
    dead = torch.diagonal(H) == 0  # inputs that never fired: nothing to preserve, weights removable
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = _inverse_cholesky(H, damp)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    total_pruned = lambda upto: int(round(sparsity * rows * upto))  # noqa: E731 - exact total over blocks
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        err = torch.zeros_like(W1)
        mask1 = torch.ones_like(W1, dtype=torch.bool)
        if nm is None:
            k = total_pruned(i2) - total_pruned(i1)
            if k > 0:
                score = (W1**2 / d.unsqueeze(0) ** 2).flatten()
                mask1.view(-1)[torch.argsort(score, stable=True)[:k]] = False
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                score = W1[:, i : i + m] ** 2 / d[i : i + m].unsqueeze(0) ** 2
                drop = torch.argsort(score, dim=1, stable=True)[:, : m - n]
                mask1[:, i : i + m].scatter_(1, drop, False)
            w = W1[:, i]
            e = (w - w * mask1[:, i]) / d[i]
            W1[:, i:] -= e.unsqueeze(1) * U1[i, i:].unsqueeze(0)  # column i becomes w * mask exactly
            err[:, i] = e
        W[:, i1:i2] = W1 * mask1
        W[:, i2:] -= err @ U[i1:i2, i2:]
        keep[:, i1:i2] = mask1
    return W.to(weight.dtype), keep

