"""Quantization-aware training: W8A8 fake-quant in the forward pass, straight-through rounding in the
backward pass, activation scales learned with LSQ (Esser et al., 2020), trained by distillation from
the fp32 model on calibration texts (or with a caller-supplied loss).

After training the fake-quant wrappers are removed: the model keeps its fine-tuned float weights, and
the learned activation ranges go to `ModelState.act_ranges`, which the following `static_int8`
step uses instead of calibrating — so the exported int8 model computes what was trained.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Literal

import torch
from pydantic import Field

from ...arch import LayerSelect, run_batch
from ...errors import SlimcartError
from ...recipe import Step, register_step
from ..train import train
from .fake_quant import (
    FakeQuantConfig,
    FakeQuantLinear,
    calibrate_,
    dequantize_,
    quantize_,
)
from .schemes import QuantScheme

Forward = Callable[[torch.nn.Module, Any], torch.Tensor]


class QATConfig(LayerSelect):
    """max_steps / max_minutes bound the run (whichever comes first); lr for weights, scale_lr for LSQ scales;
    Linears outside `targets` / in `exclude` stay fp32."""

    max_steps: int = Field(200, ge=1)
    max_minutes: float = Field(3.0, gt=0)
    lr: float = Field(2e-5, gt=0)
    scale_lr: float = Field(1e-3, gt=0)  # on log(scale): ~0.1% per step
    learn_scales: bool = True
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
    fq = FakeQuantConfig(weight=QuantScheme(bits=8), activation=QuantScheme(bits=8, symmetric=False, granularity="per_tensor"))
    wrapped = quantize_(model, fq, filter_fn=lambda name, _m: cfg.selects(name))
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
    with torch.no_grad():
        targets = [forward(teacher, b).detach() for b in batches]

    def step_loss(m, pair):
        b, t = pair
        return loss_fn(forward(m, b), t, b) if loss_fn else distill_loss(forward(m, b), t)

    def mean_loss() -> float:
        with torch.no_grad():
            return float(sum(step_loss(model, pair) for pair in zip(batches, targets)) / len(batches))

    before = mean_loss()
    model.eval()  # no dropout: the student should match the teacher's deterministic function
    for m in layers:
        m.train()  # ...but fake-quant recomputes weight codes every step
    rep = train(model, list(zip(batches, targets)), step_loss, cfg.max_steps, cfg.max_minutes, groups, "constant",
                progress=progress, label="QAT")
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
    return {"act_ranges": ranges, "steps": rep["steps"], "seconds": rep["seconds"], "loss_before": before, "loss_after": after,
            "loss_first": rep["loss_first"], "loss_last": rep["loss_last"]}


@register_step
class QAT(QATConfig, Step):
    """W8A8 quantization-aware fine-tuning (STE + LSQ scales, distilled from fp32); follow with static_int8."""

    kind: Literal["qat"] = "qat"
    workloads = ("search",)
    calibration_batches: int = Field(64, ge=1)

    def apply(self, state, ctx):
        module = state.torch_module(self.kind)
        batches = ctx.calibration(state.bundle, self.calibration_batches)
        cfg = self.model_copy(update={"exclude": self.exclude + [f"{n}*" for n in state.keep_fp32]})
        ctx.progress("quantization-aware training (distillation from fp32)")
        with torch.enable_grad():
            info = qat_(module, batches, run_batch, cfg, progress=ctx.progress)
        state.act_ranges.update(info["act_ranges"])
        state.reports[self.kind] = {k: v for k, v in info.items() if k != "act_ranges"}  # as every training step reports
        state.notes.append(f"QAT: {info['steps']} steps on {len(batches)} calibration batches, distillation loss "
                           f"{info['loss_before']:.2e} -> {info['loss_after']:.2e} (mean over the batches); learned activation ranges exported")
        return state
