"""One trainer for every model slimcart trains or distils (SASRec and the other recommenders, the CNN,
distillation students): AdamW, warm-up + linear or cosine decay (or a constant rate), validation with early
stopping, a hard step/time budget, atomic checkpoints, exact resume and data parallelism.

A task (`slimcart.contracts.DistillTask`: trainable(), n_examples(), loss(idx), validate(),
fingerprint()) owns the models, the data and the losses; the trainer only picks example indices,
steps the optimizer and keeps the books. Randomness is a function of
(seed, epoch) for the example order and (seed, step) for anything inside a step (dropout,
sampled negatives), so a resumed run takes the same steps an uninterrupted one would.
"""
from __future__ import annotations

import json
import shutil
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_serializer
from torch import nn

from . import parallel as ddp
from .contracts import DistillTask
from .errors import SlimcartError
from .outputs import atomic_dir


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
    # after the warm-up: decay to 0 along a line or a half cosine, or keep lr
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    grad_clip: float | None = 1.0
    eval_every: int = Field(100, ge=1)
    patience: int = Field(5, ge=1)
    seed: int = 0
    dropout: bool = False  # train the student with its dropout on (off: a deterministic function to match)
    # batch-norm layers while training: "frozen" normalise with their stored statistics (a fixed affine map,
    # the same function training and serving); "update" normalise with each batch's statistics and update
    # the running averages, as when a CNN is trained from scratch
    batch_norm: Literal["frozen", "update"] = "frozen"
    world_size: int = Field(1, ge=1)  # > 1: data-parallel worker processes (torch.distributed)

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        """`batch_norm` is left out at its default, so the settings (and with them the fingerprints of
        resumable runs) of configs written before the field existed stay the same."""
        out = handler(self)
        if out.get("batch_norm") == "frozen":
            del out["batch_norm"]
        return out


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
    """Learning-rate multiplier at `progress` (0..1 of the budget): linear warm-up over `warmup`, then
    constant, linear decay (1 - u) or cosine decay (1 + cos(pi u)) / 2, u = (progress - warmup) / (1 - warmup)."""
    if cfg.warmup and progress < cfg.warmup:
        return max(progress / cfg.warmup, 0.01)
    u = min(1.0, (progress - cfg.warmup) / (1 - cfg.warmup))
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * u))
    return max(0.0, 1 - u)


def length_bucketed(order: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Reorder one epoch's example permutation into batches of similar length (sorted inside windows
    of 16 batches, then the full batches shuffled; a short last batch goes to the end so batch slices
    stay aligned): mixing short and long sequences would pad every row to the longest."""
    window, batches = batch_size * 16, []
    for a in range(0, len(order), window):
        chunk = order[a : a + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    full = [b for b in batches if len(b) == batch_size]
    rest = [b for b in batches if len(b) < batch_size]
    return np.concatenate([full[j] for j in rng.permutation(len(full))] + rest)


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
    # fused: one kernel per step instead of several passes over the parameters (these models are small)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=all(p.is_floating_point() for p in params))
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
                progress(f"resuming {label} at step {res.steps} from {ckpt_dir}")

    def checkpoint(final: bool) -> None:
        if ckpt_dir is not None and ddp.rank() == 0:
            book = {"fingerprint": fingerprint, "result": res.as_dict(), "done": final}
            atomic_dir(ckpt_dir, lambda f: _save(f, model, best, opt, book, final))
        ddp.barrier()

    losses: list[float] = []  # training losses since the last validation

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
        res.history.append({"step": res.steps, "val": score, "seconds": round(res.seconds, 1),
                            "loss": float(np.mean(losses)) if losses else None})
        losses.clear()
        return res.evals_since_best >= cfg.patience

    batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    reporter = _Reporter(total, progress, label)
    if res.steps == 0:
        evaluate()  # the initial student is a candidate too (and a baseline for the log)
    t0, base_s, epoch_order = time.perf_counter(), res.seconds, [-1, None]
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
            if epoch_order[0] != epoch:  # the epoch's example order: a function of (seed, epoch) only
                rng = np.random.default_rng([cfg.seed, epoch])
                order = rng.permutation(n)
                if hasattr(task, "arrange"):  # e.g. length-bucketed batches: less padding, same examples
                    order = task.arrange(order, cfg.batch_size, rng)
                epoch_order[:] = [epoch, order]
            order = epoch_order[1]
            batch = order[offset * cfg.batch_size : (offset + 1) * cfg.batch_size]
            for g in opt.param_groups:
                g["lr"] = cfg.lr * _lr_factor(cfg, frac)
            torch.manual_seed(cfg.seed * 1_000_003 + res.steps)
            model.train(cfg.dropout)
            for m in batch_norms:
                m.train(cfg.batch_norm == "update")
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
            info = f"loss {np.mean(losses[-20:]):.4f}" if losses else ""  # before evaluate() clears them
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


class TeacherStudentTask:
    """The parts every workload's distillation task shares: loss weights checked against the losses
    the task defines (`LOSSES`, defaults `DEFAULTS`), a frozen teacher, the student plus loss-only
    heads as the trainable module, and the weighted sum of the loss parts."""

    LOSSES: tuple[str, ...] = ()
    DEFAULTS: dict[str, float] = {}
    what = "distillation"

    def setup(self, teacher: nn.Module, weights: dict[str, float] | None) -> None:
        weights = dict(self.DEFAULTS if weights is None else weights)
        unknown = sorted(set(weights) - set(self.LOSSES))
        if unknown:
            raise SlimcartError(f"{self.what} has no loss {unknown} (choose from {', '.join(self.LOSSES)})")
        self.w = {k: v for k, v in weights.items() if v}
        if not self.w:
            raise SlimcartError("all distillation loss weights are zero")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def attach(self, student: nn.Module, **heads: nn.Module) -> None:
        student.requires_grad_(True)  # a copy of the (frozen) teacher must train
        self.heads = nn.ModuleDict({"student": student, **heads})

    def trainable(self) -> nn.Module:
        return self.heads

    def student(self) -> nn.Module:
        return self.heads["student"]

    def fingerprint(self) -> dict:
        return self._fp

    def combine(self, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """(weighted total, each part as a float for the log)."""
        return sum(self.w[k] * v for k, v in parts.items()), {k: float(v.detach()) for k, v in parts.items()}


# ---------------------------------------------------------------- a workload's own model, from scratch
def fit_epochs(task, hp: dict, epochs: int, seed: int, out: Path, resume: bool, progress: Callable[[str], None],
               label: str, score_key: str) -> tuple[TrainResult, dict]:
    """Train a workload's own model from scratch (SASRec, GRU4Rec, DIN) with `fit`: constant learning
    rate `hp["lr"]`, batches of `hp["batch"]`, one validation per epoch, early stopping after
    `hp["patience"]` epochs without a better score, at most `hp["max_minutes"]`; checkpoints in
    `<out>.partial` (resumed when `resume`, else started afresh). Returns the result and the training
    record to save beside the model (its best validation score under `score_key`). Finish with
    `publish_trained`."""
    per_epoch = max(1, math.ceil(task.n_examples() / hp["batch"]))
    cfg = TrainConfig(max_steps=per_epoch * epochs, epochs=epochs, max_minutes=hp["max_minutes"], batch_size=hp["batch"],
                      lr=hp["lr"], weight_decay=0.0, warmup=0.0, schedule="constant", grad_clip=None,
                      eval_every=per_epoch, patience=hp["patience"], seed=seed, dropout=True)
    partial = _partial_of(out)
    if not resume:
        shutil.rmtree(partial, ignore_errors=True)
    # One intra-op thread by default: these batches are small, and on a shared 2-core machine two
    # OpenMP threads waiting on each other ran SASRec's steps ~10x slower than one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(int(hp.get("threads", 1)))
    try:
        res = fit(task, cfg, partial, progress, label=label)
    finally:
        torch.set_num_threads(threads)
    training = {"epochs": round(res.steps / per_epoch, 2), "best_epoch": round(res.best_step / per_epoch, 2),
                "seconds": res.seconds, "cpu_seconds": res.cpu_seconds, "stopped": res.stopped, "history": res.history,
                score_key: res.best_score, "seed": seed, **hp}
    return res, training


def publish_trained(out: Path, save: Callable[[Path], None]) -> Path:
    """Write the trained model to `out` atomically, then drop the checkpoints `fit_epochs` kept."""
    atomic_dir(out, save)
    shutil.rmtree(_partial_of(out), ignore_errors=True)
    return out


def _partial_of(out: Path) -> Path:
    return out.with_name(out.name + ".partial")
