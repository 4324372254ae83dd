"""Channel pruning of CNNs: physically remove conv output channels, with everything coupled to them.

A channel is never removed alone. Torch-Pruning's DependencyGraph (Fang et al., "DepGraph",
CVPR 2023) traces the model once and groups every slice that must go together: conv c's output
channel j, BatchNorm entry j after it, and input channel j of every consumer; through a residual
addition the whole stream (stem, each block's last conv + BN, shortcut convs, the next stage's
first conv, the classifier's input columns) shares one channel index. Those groups are what this
module would otherwise hand-write per architecture, so the maintained library does it.

Per group, channels are ranked by an importance score and the lowest `ratio` share is removed
(the same share in every group; kept counts rounded to a multiple of `round_to`, which the int8/
fp32 GEMM kernels vectorise best):
- "l1" / "l2": the L1/L2 norm of the channel's weights summed over the group (no data).
- "fpgm": distance to the group's geometric median (He et al., 2019): redundant, not small, goes.
- "bn_scale": |gamma| of the BatchNorms in the group (Liu et al., 2017, network slimming).
- "taylor": (sum over the group of w * dL/dw)^2, the first-order loss change when the channel is
  zeroed (Molchanov et al., 2019), with dL/dw accumulated over calibration `batches` of `loss_fn`.
The layers that produce the model's outputs are never narrowed (their width is the class count).

After removal the BatchNorm running statistics downstream are stale (a conv lost some inputs);
`recalibrate_batchnorm` re-estimates them on calibration batches before any fine-tuning: for each
BN, running mean = (1/B) sum_b mean_b and running var = (1/B) sum_b var_b (unbiased) over the B
batches, taken in one forward pass per batch in which every BN normalises with the batch's own
statistics (as in training), so each BN sees the inputs the pruned layers before it now produce.
The recipe step is `prune_channels` (steps.py).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...arch import run_batch
from ...errors import SlimcartError

IMPORTANCES = ("l1", "l2", "fpgm", "bn_scale", "taylor")


def _importance(name: str):
    import torch_pruning as tp

    imp = tp.importance
    return {"l1": lambda: imp.GroupMagnitudeImportance(p=1), "l2": lambda: imp.GroupMagnitudeImportance(p=2),
            "fpgm": lambda: imp.FPGMImportance(p=2),
            "bn_scale": lambda: imp.GroupMagnitudeImportance(p=1, target_types=[nn.modules.batchnorm._BatchNorm]),
            "taylor": lambda: imp.GroupTaylorImportance()}[name]()


def _tensors(inputs: Any) -> Any:
    """Tensor / dict / tuple of arrays -> the same structure of tensors (labels and extras kept as given)."""
    if isinstance(inputs, dict):
        return {k: torch.as_tensor(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return tuple(torch.as_tensor(v) for v in inputs)
    return torch.as_tensor(inputs)


def _first(inputs: Any) -> Any:
    """The first example of a batch (MACs are reported per example)."""
    if isinstance(inputs, dict):
        return {k: v[:1] for k, v in inputs.items()}
    return tuple(v[:1] for v in inputs) if isinstance(inputs, tuple) else inputs[:1]


def _count(module: nn.Module, example: Any) -> tuple[int, int]:
    """(MACs of one example, parameters); the library's counter prints notes on stdout, kept quiet."""
    import contextlib
    import io

    import torch_pruning as tp

    with contextlib.redirect_stdout(io.StringIO()):
        macs, params = tp.utils.count_ops_and_params(module, _first(example))
    return int(macs), int(params)


def _forward(module: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):  # a workload batch: keys that are not model inputs (labels) left out
        return run_batch(module, inputs)
    return module(*inputs) if isinstance(inputs, tuple) else module(inputs)


def output_layers(module: nn.Module, example_inputs: Any) -> list[nn.Module]:
    """The leaf modules whose output tensor is (one of) the model's outputs: their width is the
    model's interface (e.g. the number of classes) and must not be pruned."""
    produced: dict[int, nn.Module] = {}
    hooks = [m.register_forward_hook(lambda m, _i, o: produced.__setitem__(id(o), m))
             for m in module.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            out = _forward(module, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    outs = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (tuple, list)) else [out]
    return [produced[id(o)] for o in outs if id(o) in produced]


def layer_widths(module: nn.Module) -> dict[str, list[int]]:
    """{name: [out, in]} channels of every conv and linear layer."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = [m.out_channels, m.in_channels]
        elif isinstance(m, nn.Linear):
            out[name] = [m.out_features, m.in_features]
    return out


def prune_channels(module: nn.Module, ratio: float, example_inputs: Any, importance: str = "l2", round_to: int | None = 8,
                   ignored_layers: list[nn.Module] | None = None, batches: list[Any] | None = None,
                   loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> dict:
    """Remove the least important `ratio` share of channels of every prunable group, in place.

    `example_inputs`: one input batch (tensor, tuple, or dict of keyword inputs) to trace the graph.
    `ignored_layers`: modules whose output channels stay (the output layers are always added).
    `batches` + `loss_fn(module, batch) -> scalar`: the data "taylor" needs.
    Returns a report: params and MACs (of one example) before and after, and every
    conv/linear layer's [out, in] channels before and after.
    """
    import torch_pruning as tp

    if importance not in IMPORTANCES:
        raise SlimcartError(f"unknown channel importance '{importance}' (choose from {', '.join(IMPORTANCES)})")
    if not 0.0 <= ratio < 1.0:
        raise SlimcartError(f"channel pruning ratio must be in [0, 1), got {ratio}")
    if round_to is not None and round_to < 1:
        raise SlimcartError(f"round_to must be a positive channel count or None, got {round_to}")
    if importance == "taylor" and (not batches or loss_fn is None):
        raise SlimcartError("taylor channel importance needs calibration batches and a loss (the workload's task loss)")
    was_training = module.training
    module.eval()
    example = _tensors(example_inputs)
    ignored = list(ignored_layers or []) + output_layers(module, example)
    before = layer_widths(module)
    macs0, params0 = _count(module, example)
    pruner = tp.pruner.MetaPruner(module, example, importance=_importance(importance), pruning_ratio=ratio,
                                  ignored_layers=ignored, round_to=round_to, global_pruning=False)
    if importance == "taylor":
        module.zero_grad(set_to_none=True)
        for b in batches:
            loss_fn(module, _tensors(b)).backward()
    pruner.step()
    module.zero_grad(set_to_none=True)
    macs1, params1 = _count(module, example)
    after = layer_widths(module)
    module.train(was_training)
    return {"ratio": ratio, "importance": importance, "round_to": round_to, "params_before": params0,
            "params_after": params1, "macs_before": macs0, "macs_after": macs1,
            "ignored": [n for n, m in module.named_modules() if any(m is i for i in ignored)],
            "layers": {n: {"before": before[n], "after": after[n]} for n in before}}


@torch.no_grad()
def recalibrate_batchnorm(module: nn.Module, batches: list[Any]) -> int:
    """Re-estimate every BatchNorm's running mean/variance as the plain average over `batches`
    (momentum None = cumulative average), weights untouched; returns the number of BatchNorms reset.
    Dict batches are fed as keyword inputs, keys that are not model inputs (labels) left out."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or not batches:
        return 0
    saved = [(m, m.momentum) for m in bns]
    was_training = module.training
    module.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for b in batches:
            _forward(module, _tensors(b))
    finally:
        for m, mom in saved:
            m.momentum = mom
        module.train(was_training)
    return len(bns)
