"""The `distill` recipe step: build a student, label transfer data with the teacher, train, hand on the student.

    - kind: distill
      student: {type: layer_drop, n_layers: 3, selection: measured}
      losses: {embedding_cosine: 1.0, listwise: 1.0}
      train: {max_minutes: 15, batch_size: 32, lr: 1e-4}

Students: `layer_drop` (teacher layers `layers`, or `n_layers` chosen uniformly or by measuring
each candidate's undistilled closeness to the teacher), `narrow` (`width` of the heads / FFN
neurons / SASRec hidden size, kept by structured pruning; or SASRec with PCA-projected item
embeddings), `current` (the model as the previous step left it, e.g. after `lowrank` or
`prune_structured`, recovering towards the unmodified model), `model` (any model folder the
workload loads, e.g. a smaller pretrained encoder with the same tokenizer).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ... import parallel as ddp
from ...arch import detect, matches
from ...contracts import DistillOptions
from ...errors import SlimcartError
from ...paths import home
from ...recipe import Step, register_step
from ...training import TrainConfig, fit
from ..prune.storage import StructuredHF
from . import students


class StudentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["layer_drop", "narrow", "current", "model"] = "layer_drop"
    layers: list[int] | None = None  # layer_drop: teacher layers to keep, in order
    n_layers: int | None = Field(None, ge=1)  # layer_drop: depth when `layers` is not given
    selection: Literal["uniform", "measured"] = "uniform"
    width: float = Field(0.5, gt=0, lt=1)  # narrow: fraction of heads / FFN / (SASRec) hidden width kept
    init: Literal["prune", "pca"] = "prune"  # narrow: structured pruning, or (SASRec) PCA-projected embeddings
    path: str | None = None  # model


class TransferSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    extra_titles: int = Field(0, ge=0)  # search: PriceRunner product titles added to the calibration texts
    windows: int = Field(256, ge=2)  # llm: train-split token windows
    window_tokens: int = Field(256, ge=8)
    kd_positions: int = Field(4, ge=1)  # recsys: newest positions per user that get the teacher's distribution


def _tensor_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha1()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _ckpt_root() -> Path:
    return home() / "distill"


def _ddp_worker(task, cfg: TrainConfig, ckpt_dir: Path | None, out: Path) -> None:
    """One data-parallel rank: train; rank 0 writes the trained weights and the result for the parent."""
    from safetensors.torch import save_file

    res = fit(task, cfg, ckpt_dir)
    if ddp.rank() == 0:
        save_file({k: v.contiguous() for k, v in task.trainable().state_dict().items()}, str(out / "trained.safetensors"))
        (out / "result.json").write_text(json.dumps(res.as_dict()))


def train_task(task, cfg: TrainConfig, ckpt_dir: Path | None, workdir: Path, progress) -> dict:
    """fit() here, or in `cfg.world_size` spawned processes (gloo/nccl) whose rank 0 returns the weights."""
    if cfg.world_size == 1 or ddp.is_distributed():
        return fit(task, cfg, ckpt_dir, progress).as_dict()
    from safetensors.torch import load_file

    if hasattr(task, "prepare"):
        task.prepare()
    progress(f"distilling with {cfg.world_size} data-parallel processes ({ddp.backend()})")
    workdir.mkdir(parents=True, exist_ok=True)
    ddp.spawn(_ddp_worker, cfg.world_size, args=(task, cfg, ckpt_dir, workdir))
    task.trainable().load_state_dict(load_file(str(workdir / "trained.safetensors")))
    return json.loads((workdir / "result.json").read_text())


@register_step
class Distill(Step):
    """Knowledge distillation into a smaller (or repaired) student, bounded by `train.max_minutes`."""

    kind: Literal["distill"] = "distill"
    student: StudentSpec = StudentSpec()
    losses: dict[str, float] | None = None  # loss name -> weight; None = the workload's defaults
    temperature: float = Field(1.0, gt=0)  # soft-label / token KL
    score_temperature: float = Field(0.05, gt=0)  # search listwise KL over cosine scores
    transfer: TransferSpec = TransferSpec()
    train: TrainConfig = TrainConfig()
    freeze: list[str] = []  # fnmatch patterns of student parameter names kept fixed (e.g. "*word_embeddings*")
    checkpoint: bool = True  # resumable checkpoints under $SLIMCART_HOME/distill/<fingerprint>

    def apply(self, state, ctx):
        start, cpu_start = time.perf_counter(), time.process_time()
        if self.losses is not None and any(v < 0 for v in self.losses.values()):
            raise SlimcartError("distill: loss weights must be >= 0")
        teacher, student = self._models(state, ctx)
        options = DistillOptions(self.losses, self.temperature, self.score_temperature, self.train.seed,
                                 self.transfer.model_dump(), ctx.progress)
        task = ctx.workload.distill_task(teacher, student, state.bundle, ctx.data, options)
        key = {"step": self.model_dump(mode="json"), "teacher": _tensor_digest(teacher),
               "student": _tensor_digest(student), "task": task.fingerprint()}
        ckpt = _ckpt_root() / hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] if self.checkpoint else None
        chosen = self._choose_layers(task, teacher, ckpt, state, ctx)
        frozen = [n for n, p in task.student().named_parameters() if matches(n, self.freeze)]
        if self.freeze and not frozen:
            raise SlimcartError(f"distill: freeze patterns {self.freeze} match no student parameter")
        for n, p in task.student().named_parameters():
            p.requires_grad_(n not in frozen)
        res = train_task(task, self.train, ckpt, ctx.workdir / "ddp", ctx.progress)
        new = task.student().eval()
        for p in new.parameters():
            p.requires_grad_(True)
        state.bundle.module = new
        state.teacher = None  # used up: the student is the model now
        if self.student.type == "narrow" and getattr(detect(new).config, "slimcart_structure", None):
            state.artifact = StructuredHF()  # per-layer head counts a stock HF config cannot hold
        params = (students.param_count(teacher), students.param_count(new))
        state.notes.append(
            f"distillation ({self.student.type}{'' if chosen is None and not self.student.layers else f' {chosen or self.student.layers}'}): "
            f"{res['steps']} steps in {res['seconds'] / 60:.1f} min of training ({res['stopped']}), best validation "
            f"{res['best_score']:.4f} at step {res['best_step']}; {task.n_examples()} transfer examples; "
            f"parameters {params[0]:,} -> {params[1]:,}; step total {(time.perf_counter() - start) / 60:.1f} min "
            f"wall clock, {(time.process_time() - cpu_start) / 60:.1f} CPU-min at {torch.get_num_threads()} threads "
            "(teacher labelling, layer choice and training)")
        state.reports[self.kind] = {**res, "n_examples": task.n_examples(), "params": params, "layers": chosen or self.student.layers}
        return state

    def _choose_layers(self, task, teacher, ckpt: Path | None, state, ctx) -> list[int] | None:
        """Measured layer choice (remembered next to the checkpoint, so a rerun need not measure again)."""
        if not (self.student.type == "layer_drop" and self.student.layers is None and self.student.selection == "measured"):
            return None
        memo = ckpt.with_name(ckpt.name + ".layers.json") if ckpt is not None else None
        if memo is not None and memo.exists():
            chosen = json.loads(memo.read_text())["layers"]
            state.notes.append(f"student layers chosen by measurement (earlier run): {chosen}")
        else:
            chosen, tried = students.choose_layers(teacher, self.student.n_layers or 1, task.score_undistilled, ctx.progress)
            top = ", ".join(f"[{k}] {v:.4f}" for k, v in students.score_summary(tried)[:3])
            state.notes.append(f"student layers chosen by measurement: {chosen} (best undistilled scores: {top})")
            if memo is not None:
                memo.parent.mkdir(parents=True, exist_ok=True)
                memo.write_text(json.dumps({"layers": chosen, "tried": tried}))
        task.set_student(students.drop_layers(teacher, chosen))
        return chosen

    def _models(self, state, ctx):
        module, spec = state.torch_module(self.kind), self.student
        if spec.type == "current":
            if state.teacher is None:
                raise SlimcartError("distill student 'current' needs an earlier step that changed the model (e.g. "
                                    "lowrank, prune_structured): it recovers towards the model before that step")
            return state.teacher, module
        if spec.type == "layer_drop":
            n = students.num_layers(module)
            if spec.layers is not None:
                keep = spec.layers
            elif spec.n_layers is not None:
                if not 1 <= spec.n_layers < n:
                    raise SlimcartError(f"student n_layers must be 1..{n - 1} for this {n}-layer teacher, got {spec.n_layers}")
                keep = students.uniform_layers(n, spec.n_layers)
            else:
                raise SlimcartError("layer_drop student needs `layers` or `n_layers`")
            return module, students.drop_layers(module, keep)
        if spec.type == "narrow":
            if spec.init == "pca":
                return module, students.narrow_sasrec(module, spec.width, self.train.seed)
            return module, students.narrow_structured(module, spec.width, ctx.calibration(state.bundle, 16))
        if not spec.path:
            raise SlimcartError("distill student type 'model' needs `path`")
        other = ctx.workload.load_model(spec.path)
        tok_t, tok_s = state.bundle.tokenizer, other.tokenizer
        if tok_t is not None and tok_s is not None and tok_t.get_vocab() != tok_s.get_vocab():
            raise SlimcartError(f"student {spec.path} uses another tokenizer than the teacher: distillation here needs one vocabulary")
        return module, other.module
