"""Importance of structural units (a head, a KV group, an FFN neuron, a hidden dimension).

A unit is a list of slices `(module, param name, dim, indices)` that must be removed together.
Each criterion is a small class with `scores(module, units, batches, loss_fn) -> {key: tensor}`:

- Magnitude: L2 norm of all the unit's weights (no data).
- Taylor: first-order estimate of the loss change when the unit is zeroed, (sum w * dL/dw)^2,
  averaged over calibration batches (Molchanov et al., 2019, group form).
- Activation: energy the unit contributes to the layer that consumes it on calibration data,
  E ||X_u W_u^T||^2 (for an FFN neuron: E[x^2] * ||down column||^2); a hidden dimension scores
  E[x_d^2] of the residual stream.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ...arch import run_batch

Slice = tuple[nn.Module, str, int, torch.Tensor]
Units = dict[object, list[list[Slice]]]  # key (e.g. ("ffn", layer)) -> units, each a list of slices


def _part(module: nn.Module, pname: str, dim: int, idx: torch.Tensor) -> torch.Tensor:
    return getattr(module, pname).index_select(dim, idx)


class Magnitude:
    needs_data = False

    def scores(self, module, units: Units, batches=None, loss_fn=None) -> dict[object, torch.Tensor]:
        with torch.no_grad():
            return {key: torch.stack([sum((_part(*s).float() ** 2).sum() for s in unit if s[1] == "weight") ** 0.5
                                      for unit in us]) for key, us in units.items()}


class Taylor:
    needs_data = True

    def scores(self, module, units: Units, batches, loss_fn: Callable) -> dict[object, torch.Tensor]:
        acc = {key: torch.zeros(len(us), dtype=torch.float64) for key, us in units.items()}
        was_training = module.training
        module.eval()  # no dropout: the estimate is of the deployed network
        for batch in batches:
            module.zero_grad(set_to_none=True)
            loss_fn(module, batch).backward()
            with torch.no_grad():
                for key, us in units.items():
                    for i, unit in enumerate(us):
                        total = 0.0
                        for m, pname, dim, idx in unit:
                            p = getattr(m, pname)
                            if p.grad is not None:
                                total += float((p.index_select(dim, idx) * p.grad.index_select(dim, idx)).sum())
                        acc[key][i] += total**2
        module.zero_grad(set_to_none=True)
        module.train(was_training)
        return {k: (v / max(len(batches), 1)).float() for k, v in acc.items()}


class Activation:
    """Needs `consumers`: key -> (Linear whose input columns the units feed, column index per unit),
    or for hidden dims key -> list of modules whose inputs are the residual stream."""

    needs_data = True

    def __init__(self, consumers: dict[object, tuple[nn.Module, list[torch.Tensor]]],
                 residual: dict[object, list[nn.Module]] | None = None):
        self.consumers, self.residual = consumers, residual or {}

    def scores(self, module, units: Units, batches, loss_fn=None) -> dict[object, torch.Tensor]:
        grams: dict[object, list[torch.Tensor]] = {}
        colsq: dict[object, torch.Tensor] = {}  # units of one column each (FFN neurons): a vector suffices
        sq: dict[object, torch.Tensor] = {}
        hooks = []
        for key, (lin, cols) in self.consumers.items():
            single = torch.cat(cols) if all(len(c) == 1 for c in cols) else None
            if single is None:
                grams[key] = [torch.zeros(len(c), len(c), dtype=torch.float64) for c in cols]
            else:
                colsq[key] = torch.zeros(len(cols), dtype=torch.float64)

            def hook(_m, inp, _o, key=key, cols=cols, single=single):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
                if single is not None:
                    colsq[key] += (x[:, single] ** 2).sum(0)
                    return
                for g, c in zip(grams[key], cols):
                    xc = x[:, c]
                    g += xc.T @ xc
            hooks.append(lin.register_forward_hook(hook))
        for key, mods in self.residual.items():
            for m in mods:
                def rhook(_m, inp, _o, key=key):
                    x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
                    sq[key] = sq.get(key, 0) + (x * x).sum(0)
                hooks.append(m.register_forward_hook(rhook))
        try:
            with torch.no_grad():
                for b in batches:
                    run_batch(module, b)
        finally:
            for h in hooks:
                h.remove()
        out = {}
        for key, (lin, cols) in self.consumers.items():
            w = lin.weight.detach().double()
            if key in colsq:
                out[key] = (colsq[key] * (w[:, torch.cat(cols)] ** 2).sum(0)).float()
            else:
                out[key] = torch.stack([torch.trace(w[:, c] @ g @ w[:, c].T) for g, c in zip(grams[key], cols)]).float()
        for key in self.residual:
            out[key] = sq[key].float()
        return out


def block_influence(module: nn.Module, blocks: nn.ModuleList, batches) -> torch.Tensor:
    """Per block: 1 - mean cosine(input, output) over tokens (Men et al., 2024): low = the block barely
    changes the residual stream, so it is the cheapest to drop."""
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    counts = torch.zeros(len(blocks), dtype=torch.float64)
    hooks = []
    for i, blk in enumerate(blocks):
        def hook(_m, args, kwargs, out, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, (tuple, list)) else out
            cos = torch.nn.functional.cosine_similarity(x.reshape(-1, x.shape[-1]).double(),
                                                        y.reshape(-1, y.shape[-1]).double(), dim=-1)
            sums[i] += (1 - cos).sum()
            counts[i] += cos.numel()
        hooks.append(blk.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for b in batches:
                run_batch(module, b)
    finally:
        for h in hooks:
            h.remove()
    return (sums / counts.clamp_min(1)).float()


CRITERIA = {"magnitude": Magnitude, "taylor": Taylor, "activation": Activation}
