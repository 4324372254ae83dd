"""Sparsity masks: exact-count unstructured (per tensor, per row, or global) and N:M.

A mask is a bool tensor shaped like the weight, True = keep. Counts are exact: ties in the score
are broken by position (a stable sort), so "50%" prunes exactly round(0.5 * n) weights.
"""
from __future__ import annotations

import torch
from torch import nn

from ...errors import SlimcartError
from .config import check_fraction


def _prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask over a 1-D score vector with the k lowest entries False."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        keep[torch.argsort(scores, stable=True)[:k]] = False
    return keep


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the highest scores of the whole tensor; exactly round(sparsity * numel) pruned."""
    check_fraction(sparsity, "sparsity")
    k = int(round(sparsity * scores.numel()))
    return _prune_lowest(scores.flatten().float(), k).view_as(scores)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row (Wanda's comparison group): each row loses exactly round(sparsity * in) weights."""
    check_fraction(sparsity, "sparsity")
    k = int(round(sparsity * scores.shape[1]))
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.argsort(scores.float(), dim=1, stable=True)[:, :k]
        keep.scatter_(1, idx, False)
    return keep


def check_nm(shape: tuple[int, ...], n: int, m: int, name: str = "weight") -> None:
    """N:M groups run along the input dimension (columns), which must be a multiple of M."""
    if shape[-1] % m:
        raise SlimcartError(f"{n}:{m} sparsity needs the input size of {name} ({shape[-1]}) to be a multiple of {m}")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest scores in every group of m consecutive inputs of each row."""
    check_nm(tuple(scores.shape), n, m)
    groups = scores.float().reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, torch.argsort(groups, dim=1, descending=True, stable=True)[:, :n], True)
    return keep.view_as(scores)


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold across all tensors: exactly round(sparsity * total) weights pruned in all."""
    check_fraction(sparsity, "sparsity")
    names = list(scores)
    flat = torch.cat([scores[n].flatten().float() for n in names])
    keep = _prune_lowest(flat, int(round(sparsity * flat.numel())))
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[start : start + size].view_as(scores[n])
        start += size
    return out


def target_linears(module: nn.Module, sparsity_of) -> dict[str, nn.Linear]:
    """Linear layers with a non-zero target sparsity, by qualified name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear) and sparsity_of(name) > 0}


@torch.no_grad()
def apply_masks(linears: dict[str, nn.Linear], masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place."""
    for name, mask in masks.items():
        linears[name].weight.mul_(mask.to(linears[name].weight.dtype))


def sparsity_report(linears: dict[str, nn.Linear]) -> dict:
    """Fraction of exact zeros over the targeted weights, and per module."""
    per = {n: float((m.weight == 0).float().mean()) for n, m in linears.items()}
    total = sum(m.weight.numel() for m in linears.values())
    zeros = sum(int((m.weight == 0).sum()) for m in linears.values())
    return {"overall": zeros / max(total, 1), "per_module": per}
