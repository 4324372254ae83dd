"""Wanda (Sun et al., 2023): prune by |W_ij| * ||X_j||_2, compared within each output row.

The input-activation norm says how much each input column matters on real data; no weight update
follows, so it is one pass of statistics per layer.
"""
from __future__ import annotations

import torch

from .masks import nm_mask, row_mask


class WandaStats:
    """Running sum of squared inputs per input column of one Linear (tokens flattened)."""

    def __init__(self, in_features: int):
        self.sq = torch.zeros(in_features, dtype=torch.float64)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.sq += (x * x).sum(0)
        self.tokens += x.shape[0]

    def col_norms(self) -> torch.Tensor:
        return self.sq.sqrt().float()


def wanda_scores(weight: torch.Tensor, col_norms: torch.Tensor) -> torch.Tensor:
    """|W| scaled by the L2 norm of each input column's activations."""
    return weight.detach().abs().float() * col_norms.unsqueeze(0)


@torch.no_grad()
def wanda_mask(weight: torch.Tensor, stats: WandaStats, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """Keep-mask for one Linear weight (out, in): N:M groups or a per-row fraction."""
    scores = wanda_scores(weight, stats.col_norms())
    return nm_mask(scores, *nm) if nm else row_mask(scores, sparsity)
