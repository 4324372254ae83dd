"""Quantization-aware training: W8A8 fake-quant in the forward pass, straight-through rounding in the
backward pass, activation scales learned with LSQ (Esser et al., 2020), trained by distillation from
the fp32 model on calibration texts (or with a caller-supplied loss).

After training the fake-quant wrappers are removed: the model keeps its fine-tuned float weights, and
the learned activation ranges go to `state.extra["act_ranges"]`, which the following `static_int8`
step uses instead of calibrating — so the exported int8 model computes what was trained.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict

from ...errors import SlimcartError
from ...recipe import Step, register_step
from .fake_quant import FakeQuantConfig, FakeQuantLinear, LayerOverride, calibrate_, dequantize_, quantize_
from .schemes import QuantScheme

Forward = Callable[[torch.nn.Module, Any], torch.Tensor]


class QATConfig(BaseModel):
    """max_steps / max_minutes bound the run (whichever comes first); lr for weights, scale_lr for LSQ scales."""

    model_config = ConfigDict(extra="forbid")
    max_steps: int = 200
    max_minutes: float = 3.0
    lr: float = 2e-5
    scale_lr: float = 1e-3  # on log(scale): ~0.1% per step
    learn_scales: bool = True
    skip: list[str] = []  # fnmatch patterns of Linears kept fp32
    seed: int = 0


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cosine between student and teacher outputs (what the search metrics rank by)."""
    s, t = student.float().reshape(student.shape[0], -1), teacher.float().reshape(teacher.shape[0], -1)
    return (1 - torch.nn.functional.cosine_similarity(s, t, dim=1)).mean()


def _lsq_params(layers: list[FakeQuantLinear]) -> list[torch.nn.Parameter]:
    """Make each calibrated activation scale trainable (zero point stays fixed). The parameter is log(scale):
    Adam's steps are then relative changes of the scale, the role LSQ's gradient scaling plays under SGD."""
    params = []
    for m in layers:
        m.act_log_scale = torch.nn.Parameter(m.act_scale.detach().clone().log())
        params.append(m.act_log_scale)
    return params


def qat_(model: torch.nn.Module, batches: list, forward: Forward, config: QATConfig | None = None,
         loss_fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor] | None = None,
         progress: Callable[[str], None] = lambda m: None) -> dict:
    """Fine-tune `model` in place with W8A8 fake quantization. Default loss: distillation from a frozen fp32
    copy; `loss_fn(student_out, teacher_out, batch)` replaces it (e.g. the workload's own loss).
    Returns {"act_ranges": {layer: (lo, hi)}, "steps": n, "loss_before"/"loss_after": mean loss over all
    batches in eval mode before and after training, "loss_first"/"loss_last": the first and last step's loss}."""
    cfg = config or QATConfig()
    if not batches:
        raise SlimcartError("QAT needs training data (got no calibration batches)")
    torch.manual_seed(cfg.seed)
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    fq = FakeQuantConfig(weight=QuantScheme(bits=8), activation=QuantScheme(bits=8, symmetric=False, granularity="per_tensor"),
                         overrides=[LayerOverride(pattern=p, skip=True) for p in cfg.skip])
    wrapped = quantize_(model, fq)
    if not wrapped:
        raise SlimcartError("QAT found no nn.Linear layers to quantize")
    calibrate_(model, lambda: [forward(model, b) for b in batches])
    layers = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    scales = _lsq_params(layers) if cfg.learn_scales else []
    weights = [p for n, p in model.named_parameters() if not n.endswith("act_log_scale")]
    for p in weights:
        p.requires_grad_(True)
    groups = [{"params": weights, "lr": cfg.lr}]
    if scales:
        groups.append({"params": scales, "lr": cfg.scale_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    with torch.no_grad():
        targets = [forward(teacher, b).detach() for b in batches]
    def mean_loss() -> float:
        with torch.no_grad():
            return float(sum((loss_fn(forward(model, b), t, b) if loss_fn else distill_loss(forward(model, b), t))
                             for b, t in zip(batches, targets)) / len(batches))

    before = mean_loss()
    model.eval()  # no dropout: the student should match the teacher's deterministic function
    for m in layers:
        m.train()  # ...but fake-quant recomputes weight codes every step
    deadline = time.monotonic() + cfg.max_minutes * 60
    first = last = float("nan")
    step = 0
    while step < cfg.max_steps and time.monotonic() < deadline:
        i = step % len(batches)
        out = forward(model, batches[i])
        loss = loss_fn(out, targets[i], batches[i]) if loss_fn else distill_loss(out, targets[i])
        if not torch.isfinite(loss):
            raise SlimcartError("QAT loss became NaN/inf (lower lr)")
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if step == 0 else first
        last = float(loss.detach())
        step += 1
        if step % 20 == 0:
            progress(f"QAT step {step}: loss {last:.2e}")
    model.eval()
    after = mean_loss()
    ranges = {}
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantLinear) and m.act_scale is not None:
            s = float(m.act_log_scale.detach().exp()) if m.act_log_scale is not None else float(m.act_scale)
            z = float(m.act_zero)
            key = name[: -len(".linear")] if name.endswith(".linear") else name
            ranges[key] = ((m.act_scheme.qmin - z) * s, (m.act_scheme.qmax - z) * s)
    dequantize_(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return {"act_ranges": ranges, "steps": step, "loss_before": before, "loss_after": after,
            "loss_first": first, "loss_last": last}


@register_step
class QAT(Step):
    """W8A8 quantization-aware fine-tuning (STE + LSQ scales, distilled from fp32); follow with static_int8."""

    kind: Literal["qat"] = "qat"
    workloads = ("search",)
    max_steps: int = 200
    max_minutes: float = 3.0
    lr: float = 2e-5
    scale_lr: float = 1e-3
    learn_scales: bool = True
    calibration_batches: int = 64

    def apply(self, state, ctx):
        from .smoothquant import _torch_forward

        if state.runtime != "torch":
            raise SlimcartError("qat trains the PyTorch model: put it before static_int8")
        batches = ctx.calibration(state.bundle, self.calibration_batches)
        cfg = QATConfig(max_steps=self.max_steps, max_minutes=self.max_minutes, lr=self.lr, scale_lr=self.scale_lr,
                        learn_scales=self.learn_scales, skip=[f"{n}*" for n in state.extra.get("keep_fp32", [])])
        ctx.progress("quantization-aware training (distillation from fp32)")
        with torch.enable_grad():
            info = qat_(state.bundle.module, batches, _torch_forward, cfg, progress=ctx.progress)
        state.extra["act_ranges"] = info["act_ranges"]
        state.notes.append(f"QAT: {info['steps']} steps on {len(batches)} calibration batches, distillation loss "
                           f"{info['loss_before']:.2e} -> {info['loss_after']:.2e} (mean over the batches); learned activation ranges exported")
        return state
