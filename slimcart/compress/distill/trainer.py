"""One small trainer for every distillation task: AdamW, warm-up + linear decay, validation with
early stopping, a hard step/time budget, atomic checkpoints, exact resume and data parallelism.

A task (see `DistillTask`) owns the models, the transfer data and the losses; the trainer only
picks example indices, steps the optimizer and keeps the books. Randomness is a function of
(seed, epoch) for the example order and (seed, step) for anything inside a step (dropout,
sampled negatives), so a resumed run takes the same steps an uninterrupted one would.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ...contracts import DistillTask
from ...errors import SlimcartError
from ...outputs import atomic_dir
from . import ddp


class TrainConfig(BaseModel):
    """Budget and optimizer settings. Training stops at `max_steps`, `epochs` or `max_minutes`
    (whichever comes first), or after `patience` validations without a better score."""

    model_config = ConfigDict(extra="forbid")
    max_steps: int = Field(2000, ge=1)
    max_minutes: float | None = Field(15.0, gt=0)  # None: no time limit (fully deterministic schedule)
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup: float = Field(0.05, ge=0, lt=1)  # fraction of the budget spent ramping the LR up
    grad_clip: float | None = 1.0
    eval_every: int = Field(100, ge=1)
    patience: int = Field(5, ge=1)
    seed: int = 0
    dropout: bool = False  # train the student with its dropout on (off: a deterministic function to match)
    world_size: int = Field(1, ge=1)  # > 1: data-parallel worker processes (torch.distributed)


@dataclass
class TrainResult:
    steps: int = 0
    seconds: float = 0.0  # wall clock spent training (validations included)
    cpu_seconds: float = 0.0  # CPU time of this process meanwhile (all its threads): shows how shared the machine was
    best_score: float = float("-inf")
    best_step: int = 0
    evals_since_best: int = 0
    stopped: str = ""
    resumed_at_step: int = 0
    history: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


class _Reporter:
    """Progress as text lines through a callback (the CLI's status line), else a rich bar on a terminal."""

    def __init__(self, total: int, progress: Callable[[str], None] | None, label: str):
        self.total, self.cb, self.label, self.last = total, progress, label, 0.0
        self.bar = None
        if progress is None and sys.stderr.isatty() and ddp.rank() == 0:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                TimeElapsedColumn(), TextColumn("{task.fields[info]}"))
            self.bar.start()
            self.task_id = self.bar.add_task(label, total=total, info="")

    def update(self, step: int, info: str, force: bool = False) -> None:
        if ddp.rank() != 0:
            return
        if self.bar is not None:
            self.bar.update(self.task_id, completed=step, info=info)
        elif self.cb is not None and (force or time.monotonic() - self.last > 2.0):
            self.last = time.monotonic()
            done = int(20 * step / max(self.total, 1))
            self.cb(f"{self.label} [{'#' * done}{'.' * (20 - done)}] step {step}/{self.total} {info}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def _save(folder: Path, model: nn.Module, best: dict, opt, book: dict, final: bool) -> None:
    from safetensors.torch import save_file

    save_file(best, str(folder / "best.safetensors"))
    if not final:  # a finished run keeps only what reuse needs
        save_file(_state_of(model), str(folder / "model.safetensors"))
        sd = opt.state_dict()
        save_file({f"{i}.{k}": v.contiguous() for i, st in sd["state"].items() for k, v in st.items()},
                  str(folder / "optim.safetensors"))
        book = {**book, "param_groups": sd["param_groups"]}
    (folder / "state.json").write_text(json.dumps(book))


def _load(folder: Path, model: nn.Module, opt) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    book = json.loads((folder / "state.json").read_text())
    best = load_file(str(folder / "best.safetensors"))
    if book.get("done"):
        return book, best
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    optim: dict[int, dict] = {}
    for key, v in load_file(str(folder / "optim.safetensors")).items():
        i, name = key.split(".", 1)
        optim.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": optim, "param_groups": book.pop("param_groups")})
    return book, best


def _lr_factor(cfg: TrainConfig, progress: float) -> float:
    if cfg.warmup and progress < cfg.warmup:
        return max(progress / cfg.warmup, 0.01)
    return max(0.0, (1 - progress) / (1 - cfg.warmup))


def fit(task: DistillTask, cfg: TrainConfig, ckpt_dir: Path | None = None, progress: Callable[[str], None] | None = None,
        label: str = "distill") -> TrainResult:
    """Train `task.trainable()` in place and leave the best-validated weights loaded.

    With `ckpt_dir`, every validation writes a checkpoint there; a rerun with the same task
    fingerprint and config continues from it, and a finished run is reused as is.
    Under an initialised torch.distributed group every rank calls this with the same task.
    """
    n = task.n_examples()
    if n == 0:
        raise SlimcartError("distillation transfer data is empty")
    model = task.trainable()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SlimcartError("the student has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
    fingerprint = {"task": task.fingerprint(), "train": cfg.model_dump(exclude={"world_size"}), "n": n}
    res = TrainResult()
    best = _state_of(model)
    if ckpt_dir is not None and (ckpt_dir / "state.json").exists():
        if json.loads((ckpt_dir / "state.json").read_text()).get("fingerprint") == fingerprint:
            book, best = _load(ckpt_dir, model, opt)
            res = TrainResult(**book["result"])
            res.resumed_at_step = res.steps
            if book.get("done"):
                model.load_state_dict(best)
                res.stopped = f"reused finished run ({book['result']['stopped']})"
                return res
            if progress and ddp.rank() == 0:
                progress(f"resuming distillation at step {res.steps} from {ckpt_dir}")

    def checkpoint(final: bool) -> None:
        if ckpt_dir is not None and ddp.rank() == 0:
            book = {"fingerprint": fingerprint, "result": res.as_dict(), "done": final}
            atomic_dir(ckpt_dir, lambda f: _save(f, model, best, opt, book, final))
        ddp.barrier()

    def evaluate() -> bool:
        """Validate on rank 0, share the verdict; True when patience has run out."""
        nonlocal best
        model.eval()
        score = ddp.broadcast_object(task.validate() if ddp.rank() == 0 else None)
        if score > res.best_score:
            res.best_score, res.best_step, res.evals_since_best = score, res.steps, 0
            best = _state_of(model)
        else:
            res.evals_since_best += 1
        res.history.append({"step": res.steps, "val": score, "seconds": round(res.seconds, 1)})
        return res.evals_since_best >= cfg.patience

    reporter = _Reporter(total, progress, label)
    if res.steps == 0:
        evaluate()  # the initial student is a candidate too (and a baseline for the log)
    t0, base_s, losses = time.perf_counter(), res.seconds, []
    c0, base_c = time.process_time(), res.cpu_seconds
    try:
        while not res.stopped:
            if res.steps >= total:
                res.stopped = "step budget"
                break
            frac, time_up = res.steps / total, False
            if budget_s:  # anneal with whichever budget runs out first
                frac, time_up = max(frac, res.seconds / budget_s), res.seconds >= budget_s
                frac, time_up = ddp.broadcast_object((frac, time_up))  # rank 0's clock rules every rank
            if time_up:
                res.stopped = "time budget"
                break
            epoch, offset = divmod(res.steps, steps_per_epoch)
            rng = np.random.default_rng([cfg.seed, epoch])
            order = rng.permutation(n)
            if hasattr(task, "arrange"):  # e.g. length-bucketed batches: less padding, same examples
                order = task.arrange(order, cfg.batch_size, rng)
            batch = order[offset * cfg.batch_size : (offset + 1) * cfg.batch_size]
            for g in opt.param_groups:
                g["lr"] = cfg.lr * _lr_factor(cfg, frac)
            torch.manual_seed(cfg.seed * 1_000_003 + res.steps)
            model.train(cfg.dropout)
            local = ddp.shard(batch)
            opt.zero_grad(set_to_none=True)
            if len(local):
                loss, parts = task.loss(local)
                (loss * (len(local) / len(batch))).backward()
                losses.append(float(loss.detach()))
            ddp.all_reduce_grads(params)
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            res.steps += 1
            res.seconds = base_s + time.perf_counter() - t0
            res.cpu_seconds = base_c + time.process_time() - c0
            info = f"loss {np.mean(losses[-20:]):.4f}" if losses else ""
            if res.steps % cfg.eval_every == 0 or res.steps >= total:
                stop = evaluate()
                res.seconds = base_s + time.perf_counter() - t0
                checkpoint(final=False)
                if stop:
                    res.stopped = f"early stop: no better validation in {cfg.patience} evaluations"
                info += f" val {res.history[-1]['val']:.5g} (best {res.best_score:.5g})"
                reporter.update(res.steps, info, force=True)
            else:
                reporter.update(res.steps, info)
    finally:
        reporter.close()
    if res.history[-1]["step"] != res.steps:  # stopped by the clock between validations
        evaluate()
    model.load_state_dict(best)
    model.eval()
    checkpoint(final=True)
    return res
