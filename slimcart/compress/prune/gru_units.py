"""Hidden-unit pruning of GRU layers: the layer becomes narrower (real dense savings, no masks).

A single-layer, unidirectional torch.nn.GRU of width H stacks its three gates row-wise
(PyTorch order r, z, n):

    W_ih (3H, I) = [W_ir; W_iz; W_in]     W_hh (3H, H) = [W_hr; W_hz; W_hn]     b_ih, b_hh (3H,)
    r  = σ(W_ir x + b_ir + W_hr h + b_hr)
    z  = σ(W_iz x + b_iz + W_hz h + b_hz)
    n  = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
    h' = (1 - z) ⊙ n + z ⊙ h

Unit j owns rows j, H + j, 2H + j of W_ih, W_hh and both biases, and is read through column j of
W_hh (by all three gates) and column j of every consumer of the layer's output (the next GRU's
W_ih, a Linear's weight). Keeping units S takes rows {g·H + j : g = 0, 1, 2; j ∈ S}, W_hh columns S
and consumer columns S. Every gate is elementwise per unit once its matmuls are done, so the kept
units compute exactly what they did before whenever the removed units' states are zero; keeping all
units is the identity.

Importance of unit j (higher = keep), from the weights that read it:
    w_j = Σ_B ||B[:, j]|| / mean_k ||B[:, k]||       over B ∈ {W_hh, each consumer weight}
    magnitude   s_j = w_j
    activation  s_j = rms(h_j) · w_j                 rms over calibration positions
Each block is normalised by its mean column norm, because an output item table (tens of thousands
of rows) would otherwise drown the recurrent weights. The activation form is Wanda's |W|·||x||
criterion applied to whole units: the expected size of what deleting unit j removes downstream.

The recipe step `prune_gru_units` (steps.py) finds a model's GRU layers and their consumers through
`slimcart.arch.recurrent` and calls `prune_recurrent`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import nn

from ...errors import SlimcartError


def _check_gru(gru: nn.Module) -> None:
    if not isinstance(gru, nn.GRU) or gru.num_layers != 1 or gru.bidirectional or not gru.bias:
        raise SlimcartError(f"hidden-unit pruning needs a single-layer, unidirectional nn.GRU with biases, got {gru}")


def gate_rows(hidden: int, keep: torch.Tensor) -> torch.Tensor:
    """Row indices of units `keep` in the gate-stacked (3H, ·) weights."""
    return torch.cat([g * hidden + keep for g in range(3)])


def _columns(module: nn.Module) -> torch.Tensor:
    """The weight whose columns read the pruned layer's output."""
    if isinstance(module, nn.GRU):
        return module.weight_ih_l0
    if isinstance(module, nn.Linear):
        return module.weight
    raise SlimcartError(f"cannot prune the inputs of {type(module).__name__} (supported: nn.Linear, nn.GRU)")


def _normalised_column_norms(w: torch.Tensor) -> torch.Tensor:
    norms = w.detach().float().norm(dim=0)
    return norms / norms.mean().clamp(min=1e-12)


def unit_importance(gru: nn.GRU, consumers: Iterable[nn.Module], hidden_states: torch.Tensor | None = None) -> torch.Tensor:
    """Score per hidden unit (H,): magnitude when `hidden_states` is None, else activation-weighted.
    `hidden_states`: (N, H) outputs of this GRU at real (non-padding) positions of calibration data."""
    _check_gru(gru)
    w = _normalised_column_norms(gru.weight_hh_l0)
    for c in consumers:
        cols = _columns(c)
        if cols.shape[1] != gru.hidden_size:
            raise SlimcartError(f"consumer {type(c).__name__} reads {cols.shape[1]} inputs, the GRU has {gru.hidden_size} units")
        w = w + _normalised_column_norms(cols)
    if hidden_states is None:
        return w
    if hidden_states.ndim != 2 or hidden_states.shape[1] != gru.hidden_size or not len(hidden_states):
        raise SlimcartError(f"hidden_states must be (N, {gru.hidden_size}) with N >= 1, got {tuple(hidden_states.shape)}")
    return hidden_states.detach().float().pow(2).mean(0).sqrt() * w


def keep_top(importance: torch.Tensor, width: int) -> torch.Tensor:
    """Indices (ascending, so kept units stay in order) of the `width` most important units."""
    if not 1 <= width <= len(importance):
        raise SlimcartError(f"pruned GRU width must be 1..{len(importance)}, got {width}")
    return importance.topk(width).indices.sort().values


def select_units(gru: nn.GRU, keep: torch.Tensor) -> nn.GRU:
    """A new GRU with only the hidden units `keep` (same input size)."""
    _check_gru(gru)
    keep = torch.as_tensor(keep, dtype=torch.long)
    rows = gate_rows(gru.hidden_size, keep)
    new = nn.GRU(gru.input_size, len(keep), batch_first=gru.batch_first)
    with torch.no_grad():
        new.weight_ih_l0.copy_(gru.weight_ih_l0[rows])
        new.weight_hh_l0.copy_(gru.weight_hh_l0[rows][:, keep])
        new.bias_ih_l0.copy_(gru.bias_ih_l0[rows])
        new.bias_hh_l0.copy_(gru.bias_hh_l0[rows])
    return new.to(gru.weight_hh_l0.dtype).train(gru.training)


def select_inputs(module: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A new consumer reading only inputs `keep` (nn.Linear columns, or a GRU's input columns)."""
    keep = torch.as_tensor(keep, dtype=torch.long)
    if isinstance(module, nn.Linear):
        new = nn.Linear(len(keep), module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            new.weight.copy_(module.weight[:, keep])
            if module.bias is not None:
                new.bias.copy_(module.bias)
    elif isinstance(module, nn.GRU):
        _check_gru(module)
        new = nn.GRU(len(keep), module.hidden_size, batch_first=module.batch_first)
        with torch.no_grad():
            for name in ("weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
                getattr(new, name).copy_(getattr(module, name))
            new.weight_ih_l0.copy_(module.weight_ih_l0[:, keep])
    else:
        raise SlimcartError(f"cannot prune the inputs of {type(module).__name__} (supported: nn.Linear, nn.GRU)")
    return new.to(_columns(module).dtype).train(module.training)


def prune_gru_units(model: nn.Module, gru_name: str, consumer_names: list[str], keep: torch.Tensor) -> nn.Module:
    """Replace submodule `gru_name` by its units `keep` and each consumer by its matching inputs, in place."""
    gru = model.get_submodule(gru_name)
    new_gru = select_units(gru, keep)
    consumers = {n: select_inputs(model.get_submodule(n), keep) for n in consumer_names}
    model.set_submodule(gru_name, new_gru)
    for name, module in consumers.items():
        model.set_submodule(name, module)
    return model


def collect_hidden(model: nn.Module, gru_name: str, batches: list[Any], run: Callable[[nn.Module, Any], Any],
                   mask: Callable[[Any], torch.Tensor] | None = None) -> torch.Tensor:
    """(N, H) outputs of GRU `gru_name` over calibration batches, `run(model, batch)` doing the forward;
    `mask(batch)` -> (B, L) bool keeps real positions (None: every position)."""
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(gru_name).register_forward_hook(lambda _m, _i, out: seen.append(out[0].detach()))
    try:
        with torch.no_grad():
            out = []
            for batch in batches:
                run(model, batch)
                h = seen.pop()
                out.append(h[mask(batch)] if mask is not None else h.reshape(-1, h.shape[-1]))
    finally:
        handle.remove()
    return torch.cat(out)


def prune_recurrent(model: nn.Module, layers: list[tuple[str, list[str]]], removed: dict[str, float],
                    criterion: Literal["magnitude", "activation"], batches: list[Any] | None,
                    run: Callable[[nn.Module, Any], Any], positions: Callable[[Any], torch.Tensor] | None,
                    round_to: int = 1) -> dict:
    """Prune GRU layers in place, first to last: `layers` = [(GRU name, consumer names)], `removed`
    = {GRU name: fraction of its units removed} (layers not in it are left alone). Kept width =
    max(round_to, H - round(fraction * H) rounded down to a multiple of round_to). Activation
    importance is measured on the model as pruned so far (real positions only).
    Returns {"layers": {name: {"before", "after", "kept"}}, "params_before", "params_after"}."""
    if criterion == "activation" and not batches:
        raise SlimcartError("activation importance needs calibration batches")
    before = sum(p.numel() for p in model.parameters())
    report = {}
    for name, consumers in layers:
        if name not in removed:
            continue
        gru = model.get_submodule(name)
        _check_gru(gru)
        h = gru.hidden_size
        width = h - int(round(removed[name] * h))
        width = max(round_to, width // round_to * round_to)
        if width >= h:
            report[name] = {"before": h, "after": h, "kept": list(range(h))}
            continue
        states = collect_hidden(model, name, batches, run, positions) if criterion == "activation" else None
        keep = keep_top(unit_importance(gru, [model.get_submodule(c) for c in consumers], states), width)
        prune_gru_units(model, name, consumers, keep)
        report[name] = {"before": h, "after": width, "kept": keep.tolist()}
    return {"layers": report, "params_before": before, "params_after": sum(p.numel() for p in model.parameters())}
