"""Recovery after pruning: a short training run on calibration data (never the evaluation split).

- distill: match the dense model (the teacher) on the same inputs: the output (embedding cosine or
  MSE, or KL of next-token distributions for causal LMs) plus a per-block hidden-state MSE
  (normalised by the teacher's energy) where widths match, which recovers pruned heads/neurons fast.
- task: the workload's own training loss (`Workload.task_loss`), e.g. next-token cross-entropy.
Sparsity masks, when given, are re-applied after every optimizer step so pruned weights stay zero.
Dropout stays off: the short run should adapt the deployed network, not regularise a new one.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...arch import detect, output_tensor, run_batch
from ...errors import SlimcartError
from ..train import train
from .config import RecoverConfig

LossFn = Callable[[nn.Module, dict], torch.Tensor]


def sensitivity_loss(seed: int = 0) -> LossFn:
    """Label-free loss for Taylor importance: a random projection of the output. Its squared
    first-order change estimates ||change of the output||^2 (E_r[(r . d)^2] = ||d||^2). Call k of
    the returned function draws its projection from seed + k: deterministic for every run."""
    calls = [0]

    def loss(module: nn.Module, batch: dict) -> torch.Tensor:
        out = run_batch(module, batch).float()
        calls[0] += 1
        r = torch.randn(out.shape[-1], generator=torch.Generator().manual_seed(seed + calls[0]))
        return (out @ r).sum()

    return loss


class _Hidden:
    """Collects every block's output during a forward."""

    def __init__(self, blocks: nn.ModuleList):
        self.outs: list[torch.Tensor] = []
        self.handles = [b.register_forward_hook(lambda _m, _i, o: self.outs.append(output_tensor(o))) for b in blocks]

    def take(self) -> list[torch.Tensor]:
        outs, self.outs = self.outs, []
        return outs

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def distill_loss(cfg: RecoverConfig, teacher: nn.Module, layer_map: list[int]) -> tuple[LossFn, Callable[[], None]]:
    """Loss of the student against the frozen teacher on one batch; returns (loss_fn, cleanup)."""
    t_hidden = _Hidden(detect(teacher).layers)
    s_hidden: dict[int, _Hidden] = {}

    def loss(student, batch):
        if id(student) not in s_hidden:
            s_hidden[id(student)] = _Hidden(detect(student).layers)
        with torch.no_grad():
            t_out = run_batch(teacher, batch).float()
        t_h = t_hidden.take()
        s_out = run_batch(student, batch).float()
        s_h = s_hidden[id(student)].take()
        if cfg.output_loss == "kl" or (cfg.output_loss == "auto" and t_out.ndim == 3):  # (B, T, vocab): LM logits
            total = F.kl_div(F.log_softmax(s_out, -1).flatten(0, -2), F.log_softmax(t_out, -1).flatten(0, -2),
                             log_target=True, reduction="batchmean")
        elif cfg.output_loss == "mse":
            total = F.mse_loss(s_out, t_out) / t_out.pow(2).mean().clamp_min(1e-12)
        else:
            total = (1 - F.cosine_similarity(s_out, t_out, dim=-1)).mean()
        if cfg.hidden_weight and s_h:
            w = torch.as_tensor(batch["attention_mask"]).unsqueeze(-1).float() if "attention_mask" in batch else None
            terms = []
            for si, ti in enumerate(layer_map):
                a, b = s_h[si].float(), t_h[ti].float()
                if a.shape != b.shape:  # hidden width pruned: nothing to compare element-wise
                    continue
                err, energy = (a - b) ** 2, b**2
                if w is not None and w.shape[:2] == a.shape[:2]:
                    err, energy = err * w, energy * w
                terms.append(err.sum() / energy.sum().clamp_min(1e-12))
            if terms:
                total = total + cfg.hidden_weight * torch.stack(terms).mean()
        return total

    def cleanup():
        t_hidden.close()
        for h in s_hidden.values():
            h.close()

    return loss, cleanup


def recover(student: nn.Module, batches: list[dict], cfg: RecoverConfig, teacher: nn.Module | None = None,
            layer_map: list[int] | None = None, task: LossFn | None = None,
            masks: dict[str, torch.Tensor] | None = None, progress=lambda m: None) -> dict:
    """Run recovery in place on `student`; `layer_map[i]` = teacher block matching student block i."""
    for p in student.parameters():  # recovery trains every weight of the pruned model
        p.requires_grad_(True)
    student.eval()  # dropout off: adapt the deployed network, do not regularise a new one
    groups = [{"params": [p for p in student.parameters() if p.requires_grad], "lr": cfg.lr}]
    if cfg.method == "task":
        if task is None:
            raise SlimcartError("recover method 'task' needs a workload with a training loss (this one has no labels): "
                                "use method: distill")
        return train(student, batches, task, cfg.steps, cfg.max_minutes, groups, masks=masks, progress=progress,
                     label="recover")
    if teacher is None:
        raise SlimcartError("recover method 'distill' needs the dense model: put a pruning step before it")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    n = len(detect(student).layers)
    loss_fn, cleanup = distill_loss(cfg, teacher, layer_map if layer_map is not None else list(range(n)))
    try:
        return train(student, batches, loss_fn, cfg.steps, cfg.max_minutes, groups, masks=masks, progress=progress,
                     label="recover")
    finally:
        cleanup()
