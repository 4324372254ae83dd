"""Recovery after pruning: a short training run on calibration data (never the evaluation split).

- distill: match the dense model (the teacher) on the same inputs: the output (embedding cosine or
  MSE, or KL of next-token distributions for causal LMs) plus a per-block hidden-state MSE
  (normalised by the teacher's energy) where widths match, which recovers pruned heads/neurons fast.
- task: the workload's own training loss: next-token cross-entropy (llm), SASRec's sampled
  softmax / BCE over sampled negatives (recsys).
Sparsity masks, when given, are re-applied after every optimizer step so pruned weights stay zero.
Dropout stays off: the short run should adapt the deployed network, not regularise a new one.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import SlimcartError
from .arch import detect, run_model
from .config import RecoverConfig

LossFn = Callable[[nn.Module, dict], torch.Tensor]


def _out(x):
    if isinstance(x, (tuple, list)):
        x = x[0]
    return getattr(x, "logits", x)


def task_loss(workload_name: str, bundle) -> LossFn:
    """The workload's training objective on one calibration batch."""
    if workload_name == "llm":
        def lm(module, batch):
            ids = torch.as_tensor(batch["input_ids"])
            logits = _out(module(input_ids=ids))
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        return lm
    if workload_name == "recsys":
        from ...models.sasrec import sequence_loss

        training = bundle.extra.get("config", {}).get("training", {})
        loss, negatives = training.get("loss", "sampled_softmax"), int(training.get("negatives", 1024))
        gen = torch.Generator().manual_seed(0)

        def rec(module, batch):
            seq = torch.as_tensor(batch["seq"])
            inp, tgt = seq[:, :-1], seq[:, 1:]
            return sequence_loss(module, inp, tgt * (inp > 0), loss, negatives, gen)  # no target from padding
        return rec
    raise SlimcartError(f"workload '{workload_name}' has no task loss here (its data has no labels for training); "
                        "use method: distill")


def sensitivity_loss(module: nn.Module, batch: dict, _count=[0]) -> torch.Tensor:  # noqa: B006 - call counter
    """Label-free loss for Taylor importance: a random projection of the output. Its squared
    first-order change estimates ||change of the output||^2 (E_r[(r . d)^2] = ||d||^2)."""
    out = _out(run_model(module, batch)).float()
    _count[0] += 1
    r = torch.randn(out.shape[-1], generator=torch.Generator().manual_seed(_count[0]))
    return (out @ r).sum()


class _Hidden:
    """Collects every block's output during a forward."""

    def __init__(self, blocks: nn.ModuleList):
        self.outs: list[torch.Tensor] = []
        self.handles = [b.register_forward_hook(lambda _m, _i, o: self.outs.append(_out(o))) for b in blocks]

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
            t_out = _out(run_model(teacher, batch)).float()
        t_h = t_hidden.take()
        s_out = _out(run_model(student, batch)).float()
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


def train(student: nn.Module, batches: list[dict], loss_fn: LossFn, steps: int, lr: float, max_minutes: float,
          masks: dict[str, torch.Tensor] | None = None, on_step: Callable[[int], None] | None = None,
          progress=lambda m: None) -> dict:
    """AdamW with cosine decay over `steps` (cycling through `batches`), stopping at `max_minutes`."""
    if not batches:
        raise SlimcartError("recovery needs calibration batches")
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    modules = dict(student.named_modules())
    student.eval()
    t0, losses, step = time.perf_counter(), [], 0
    for step in range(steps):
        if on_step is not None:
            on_step(step)
        loss = loss_fn(student, batches[step % len(batches)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if masks:
            with torch.no_grad():
                for name, mask in masks.items():
                    modules[name].weight.mul_(mask.to(modules[name].weight.dtype))
        losses.append(loss.item())
        if step % 50 == 0:
            progress(f"recover step {step}/{steps}: loss {losses[-1]:.4f}")
        if time.perf_counter() - t0 > max_minutes * 60:
            progress(f"recover: stopping at the {max_minutes:g}-minute budget after {step + 1} steps")
            break
    head = losses[: max(1, len(losses) // 10)]
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": step + 1, "seconds": round(time.perf_counter() - t0, 1),
            "loss_first_10pct": sum(head) / len(head), "loss_last_10pct": sum(tail) / len(tail)}


def recover(student: nn.Module, batches: list[dict], cfg: RecoverConfig, teacher: nn.Module | None = None,
            layer_map: list[int] | None = None, task: LossFn | None = None,
            masks: dict[str, torch.Tensor] | None = None, progress=lambda m: None) -> dict:
    """Run recovery in place on `student`; `layer_map[i]` = teacher block matching student block i."""
    for p in student.parameters():  # recovery trains every weight of the pruned model
        p.requires_grad_(True)
    if cfg.method == "task":
        if task is None:
            raise SlimcartError("recover method 'task' needs the workload's training loss")
        return train(student, batches, task, cfg.steps, cfg.lr, cfg.max_minutes, masks, progress=progress)
    if teacher is None:
        raise SlimcartError("recover method 'distill' needs the dense model: put a pruning step before it")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    n = len(detect(student).layers)
    loss_fn, cleanup = distill_loss(cfg, teacher, layer_map if layer_map is not None else list(range(n)))
    try:
        return train(student, batches, loss_fn, cfg.steps, cfg.lr, cfg.max_minutes, masks, progress=progress)
    finally:
        cleanup()
