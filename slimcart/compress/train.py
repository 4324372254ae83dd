"""The short fixed-budget fine-tuning loop of the techniques that train a little: pruning recovery,
gradual pruning and quantization-aware training. (Distillation, which validates, checkpoints and runs
data-parallel, uses slimcart.training.)

AdamW over `batches` in order (cycling), learning rate constant or on a cosine decay over `steps`,
stopping at `steps` or `max_minutes`. Sparsity masks are re-applied after every optimizer step so
pruned weights stay zero; `on_step(step)` runs before each step (gradual pruning recomputes masks there).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Literal

import torch
from torch import nn

from ..errors import SlimcartError


def train(model: nn.Module, batches: list[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor], steps: int,
          max_minutes: float, param_groups: list[dict], schedule: Literal["cosine", "constant"] = "cosine",
          masks: dict[str, torch.Tensor] | None = None, on_step: Callable[[int], None] | None = None,
          progress: Callable[[str], None] = lambda m: None, label: str = "train") -> dict:
    """Train in place; returns {"steps", "seconds", "loss_first", "loss_last", "loss_first_10pct", "loss_last_10pct"}.
    Modules stay in whatever train/eval mode the caller set (recovery keeps dropout off)."""
    if not batches:
        raise SlimcartError(f"{label} needs calibration batches")
    opt = torch.optim.AdamW(param_groups, weight_decay=0.0)
    sched = None
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    modules = dict(model.named_modules())
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        if on_step is not None:
            on_step(step)
        loss = loss_fn(model, batches[step % len(batches)])
        if not torch.isfinite(loss):
            raise SlimcartError(f"{label}: the loss became NaN/inf at step {step} (lower the learning rate)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if masks:
            with torch.no_grad():
                for name, mask in masks.items():
                    modules[name].weight.mul_(mask.to(modules[name].weight.dtype))
        losses.append(loss.item())
        if step % 50 == 0:
            progress(f"{label} step {step}/{steps}: loss {losses[-1]:.4f}")
        if time.perf_counter() - t0 > max_minutes * 60:
            progress(f"{label}: stopping at the {max_minutes:g}-minute budget after {step + 1} steps")
            break
    head, tail = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10):]
    return {"steps": len(losses), "seconds": round(time.perf_counter() - t0, 1), "loss_first": losses[0],
            "loss_last": losses[-1], "loss_first_10pct": sum(head) / len(head), "loss_last_10pct": sum(tail) / len(tail)}
