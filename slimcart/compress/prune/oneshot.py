"""One-shot unstructured / N:M pruning of Linear weights: magnitude, Wanda, SparseGPT.

Wanda and SparseGPT are calibrated layer by layer, as in their papers: the inputs of block 0 are
captured once, then each block is run on them to collect statistics, pruned, and run again so
the next block sees the outputs of the already-pruned model (errors do not compound unseen).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...arch import detect, run_batch
from ...errors import SlimcartError
from .config import SparsityConfig
from .masks import (
    apply_masks,
    check_nm,
    global_masks,
    nm_mask,
    target_linears,
    unstructured_mask,
)
from .sparsegpt import HessianStats, sparsegpt_prune
from .wanda import WandaStats, wanda_mask


class _Stop(Exception):
    pass


def check_targets(linears: dict[str, nn.Linear], cfg: SparsityConfig) -> None:
    """Refuse impossible requests before any weight changes."""
    if not linears:
        raise SlimcartError("no Linear layer matches the pruning targets/exclude patterns")
    if cfg.nm:
        for name, lin in linears.items():
            check_nm(tuple(lin.weight.shape), *cfg.nm, name=name)


def magnitude_masks(linears: dict[str, nn.Linear], cfg: SparsityConfig, sparsity: float | None = None) -> dict:
    """|W| masks: N:M per group, one global threshold, or per tensor (optionally overriding the target)."""
    if cfg.nm:
        return {n: nm_mask(m.weight.detach().abs(), *cfg.nm) for n, m in linears.items()}
    if cfg.scope == "global":
        s = cfg.sparsity if sparsity is None else sparsity
        return global_masks({n: m.weight.detach().abs() for n, m in linears.items()}, s)
    out = {}
    for n, m in linears.items():
        s = cfg.sparsity_of(n) if sparsity is None else sparsity * cfg.sparsity_of(n) / cfg.sparsity
        out[n] = unstructured_mask(m.weight.detach().abs(), s)
    return out


def capture_block_inputs(module: nn.Module, blocks: nn.ModuleList, batches: list[dict]) -> list[tuple[tuple, dict]]:
    """(args, kwargs) that block 0 receives for each calibration batch (the forward stops there)."""
    captured: list[tuple[tuple, dict]] = []

    def hook(_m, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    run_batch(module, b)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _stages(block: nn.Module, local: dict[str, nn.Linear], args: tuple, kwargs: dict) -> list[list[str]]:
    """Targeted Linears of a block in execution order; Linears reading the same tensor (Q/K/V, or
    gate/up) form one stage. Found by running the block once on one calibration input."""
    order: list[tuple[str, int]] = []
    hooks = [lin.register_forward_hook(lambda _m, inp, _o, n=n: order.append((n, inp[0].data_ptr())))
             for n, lin in local.items()]
    try:
        _run_block(block, args, kwargs)
    finally:
        for h in hooks:
            h.remove()
    stages: list[tuple[list[str], int]] = []
    for name, ptr in order:
        if any(name in st for st, _ in stages):
            continue
        if stages and stages[-1][1] == ptr:
            stages[-1][0].append(name)
        else:
            stages.append(([name], ptr))
    return [st for st, _ in stages]


@torch.no_grad()
def prune_layerwise(module: nn.Module, cfg: SparsityConfig, batches: list[dict], progress=lambda m: None) -> dict:
    """Wanda / SparseGPT over every targeted Linear inside the blocks; returns keep-masks by name."""
    arch = detect(module)
    blocks, prefix = arch.layers, arch.layers_path
    linears = target_linears(module, cfg.sparsity_of)
    check_targets(linears, cfg)
    inputs = capture_block_inputs(module, blocks, batches)
    masks: dict[str, torch.Tensor] = {}
    for li, block in enumerate(blocks):
        local = {f"{prefix}.{li}.{n}": m for n, m in block.named_modules() if f"{prefix}.{li}.{n}" in linears}
        # Sequential: each stage is calibrated on inputs that already went through the pruned earlier
        # stages of this block (e.g. o_proj sees the pruned Q/K/V), so it can compensate their error.
        stages = _stages(block, local, *inputs[0]) if cfg.sequential else [list(local)]
        for stage in stages:
            stats: dict[str, Any] = {}
            hooks = []
            for name in stage:
                stats[name] = (HessianStats if cfg.method == "sparsegpt" else WandaStats)(local[name].in_features)

                def hook(_m, inp, _o, s=stats[name], last=name == stage[-1] and cfg.sequential):
                    s.add(inp[0])
                    if last:  # the rest of the block does not matter for this stage
                        raise _Stop
                hooks.append(local[name].register_forward_hook(hook))
            for args, kwargs in inputs:
                try:
                    _run_block(block, args, kwargs)
                except _Stop:
                    pass
            for h in hooks:
                h.remove()
            for name in stage:
                lin, s = local[name], cfg.sparsity_of(name)
                if cfg.method == "sparsegpt":
                    w, keep = sparsegpt_prune(lin.weight, stats[name], s, cfg.nm, cfg.block_size, cfg.damp)
                    lin.weight.copy_(w)
                else:
                    keep = wanda_mask(lin.weight, stats[name], s, cfg.nm)
                    lin.weight.mul_(keep.to(lin.weight.dtype))
                masks[name] = keep
        inputs = [_with_hidden(a, k, _run_block(block, a, k)) for a, k in inputs]
        progress(f"{cfg.method}: block {li + 1}/{len(blocks)} pruned")
    rest = {n: m for n, m in linears.items() if n not in masks}  # Linears outside the blocks (e.g. a pooler)
    if rest:
        rest_masks = magnitude_masks(rest, cfg)
        apply_masks(rest, rest_masks)
        masks.update(rest_masks)
    return masks


def prune_sparse(module: nn.Module, cfg: SparsityConfig, batches: list[dict] | None = None,
                 progress=lambda m: None) -> dict[str, torch.Tensor]:
    """Apply cfg to `module` in place; returns the keep-masks (recovery training keeps them fixed)."""
    linears = target_linears(module, cfg.sparsity_of)
    check_targets(linears, cfg)
    if cfg.method == "magnitude":
        masks = magnitude_masks(linears, cfg)
        apply_masks(linears, masks)
        return masks
    if not batches:
        raise SlimcartError(f"{cfg.method} needs calibration batches")
    return prune_layerwise(module, cfg, batches, progress)
