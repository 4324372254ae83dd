"""Recipe steps of the pruning family: `prune`, `prune_structured`, `prune_channels`, `prune_gru_units`,
`recover`.

A pruning step keeps a copy of the model before pruning as the teacher when a `recover` or `distill`
step follows. Unstructured and N:M sparsity is labelled size-only (no CPU kernel here skips zeros)
and saved bitmask-encoded; structured and channel pruning need no label: the smaller model runs on
the same runtime as the dense one.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from torch import nn

from ...arch import LayerSelect, detect, first_match, recurrent, run_batch
from ...errors import SlimcartError
from ...recipe import Step, register_step
from ..train import train
from .config import RecoverConfig, SparsityConfig, StructuredConfig, check_fraction
from .gru_units import prune_recurrent
from .masks import apply_masks, sparsity_report, target_linears
from .oneshot import check_targets, magnitude_masks, prune_sparse
from .recover import distill_loss, recover, sensitivity_loss
from .schedule import cubic_sparsity, prune_points
from .storage import SparseBitmask, StructuredHF


@register_step
class PruneStep(SparsityConfig, Step):
    """Unstructured or N:M sparsity (magnitude / Wanda / SparseGPT, one-shot or gradual)."""

    kind: Literal["prune"] = "prune"

    def apply(self, state, ctx):
        module = state.torch_module(self.kind)
        linears = target_linears(module, self.sparsity_of)
        check_targets(linears, self)
        if self.gradual is not None:
            masks = self._gradual(state, ctx, linears)
        else:
            state.keep_teacher(ctx)
            batches = ctx.calibration(state.bundle, self.calibration_batches) if self.method != "magnitude" else None
            masks = prune_sparse(module, self, batches, ctx.progress)
        state.masks.update(masks)
        rep = sparsity_report(linears)
        what = f"{self.method} {self.pattern} pruning" + (" (gradual, cubic schedule)" if self.gradual else "")
        state.size_only.append(f"{what}: {rep['overall']:.1%} of {len(linears)} Linear weights are zero; stored as "
                               "bitmask + packed values (smaller on disk), but dense kernels still compute every weight")
        state.notes.append(f"{what}: {len(linears)} Linear layers, measured sparsity {rep['overall']:.4f}")
        if not isinstance(state.artifact, SparseBitmask):
            state.artifact = SparseBitmask(state.artifact)
        return state

    def _gradual(self, state, ctx, linears):
        g = self.gradual
        module = state.bundle.module
        batches = ctx.calibration(state.bundle, g.calibration_batches)
        cleanup = lambda: None  # noqa: E731
        if g.method == "task":
            loss = ctx.workload.task_loss(state.bundle)
            if loss is None:
                raise SlimcartError("gradual pruning with method 'task' needs a workload with a training loss: use 'distill'")
        else:
            state.keep_teacher(ctx, always=True)  # the gradual run itself learns from it
            loss, cleanup = distill_loss(RecoverConfig(), state.teacher, state.layer_map or list(range(len(detect(module).layers))))
        ramp = max(1, int(g.steps * g.ramp_fraction))
        points, masks = set(prune_points(g.steps, g.prune_every, g.ramp_fraction)), {}

        def on_step(step: int) -> None:
            if step in points:
                masks.clear()
                masks.update(magnitude_masks(linears, self, cubic_sparsity(step, ramp, self.sparsity, g.initial_sparsity)))
                apply_masks(linears, masks)

        for p in module.parameters():
            p.requires_grad_(True)
        module.eval()
        try:
            rep = train(module, batches, loss, g.steps, 1e9, [{"params": list(module.parameters()), "lr": g.lr}],
                        masks=masks, on_step=on_step, progress=ctx.progress, label="gradual pruning")
        finally:
            cleanup()
        masks.update(magnitude_masks(linears, self))  # the final sparsity, whatever the schedule reached
        apply_masks(linears, masks)
        state.notes.append(f"gradual pruning trained {rep['steps']} steps ({rep['seconds']} s): loss "
                           f"{rep['loss_first_10pct']:.4f} -> {rep['loss_last_10pct']:.4f}")
        return dict(masks)


@register_step
class PruneStructuredStep(StructuredConfig, Step):
    """Physically remove heads / KV groups, FFN neurons, layers, or (SASRec) hidden dimensions."""

    kind: Literal["prune_structured"] = "prune_structured"

    def apply(self, state, ctx):
        from .structured import prune_structured

        module = state.torch_module(self.kind)
        if state.masks:
            raise SlimcartError("put prune_structured before unstructured 'prune' steps (their masks would not fit)")
        state.keep_teacher(ctx)
        needs_data = self.criterion != "magnitude" or (isinstance(self.layers, int) and self.layers > 0)
        batches = ctx.calibration(state.bundle, self.calibration_batches) if needs_data else None
        loss_fn = (ctx.workload.task_loss(state.bundle) or sensitivity_loss()) if self.criterion == "taylor" else None
        n_before = len(detect(module).layers)
        rep = prune_structured(module, self, batches, loss_fn, ctx.progress)
        dropped = set(rep["dropped_layers"])
        old = state.layer_map if state.layer_map is not None else list(range(n_before))
        state.layer_map = [t for i, t in enumerate(old) if i not in dropped]
        state.reports[self.kind] = rep
        state.notes.append(
            f"structured pruning ({self.criterion}): parameters inside the transformer blocks "
            f"{rep['block_params_before']:,} -> {rep['block_params_after']:,} ({rep['block_params_removed']:.1%} removed; "
            f"embeddings not counted); shapes {rep['shapes']}")
        if getattr(detect(module).config, "slimcart_structure", None):
            state.notes.append("per-layer shapes are not expressible in the stock HF config: saved as 'structured-hf' "
                               "(safetensors + config.json with slimcart_structure), reloaded by slimcart")
            state.artifact = StructuredHF()
        return state


@register_step
class PruneChannelsStep(LayerSelect, Step):
    """Channel (filter) pruning of a CNN: remove the least important `ratio` of every coupled channel
    group (torch-pruning's dependency graph: batch norm, residual additions, consumers' inputs), then
    re-estimate the batch-norm statistics on calibration batches. `targets` / `exclude` choose the
    Conv / Linear layers whose output channels may go; the layers producing the model's outputs never do.
    The dense model is kept as the teacher of a following `distill` (student `current`) step."""

    kind: Literal["prune_channels"] = "prune_channels"
    ratio: float
    importance: Literal["l1", "l2", "fpgm", "bn_scale", "taylor"] = "l2"
    round_to: int | None = Field(8, ge=1)  # kept channel counts a multiple of this (vectorised GEMM kernels)
    calibration_batches: int = Field(16, ge=1)  # for batch-norm re-estimation and taylor importance
    recalibrate_bn: bool = True

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        return check_fraction(v, "prune_channels ratio")

    def apply(self, state, ctx):
        from .channels import prune_channels, recalibrate_batchnorm

        module = state.torch_module(self.kind)
        if state.masks:
            raise SlimcartError("put prune_channels before unstructured 'prune' steps (their masks would not fit)")
        layers = {n: m for n, m in module.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}
        if not any(isinstance(m, nn.modules.conv._ConvNd) for m in layers.values()):
            raise SlimcartError("prune_channels removes convolution channels and this model has no Conv layer "
                                "(for transformers use prune_structured)")
        if not any(self.selects(n) for n in layers):
            raise SlimcartError(f"prune_channels: targets {self.targets} / exclude {self.exclude} select no Conv or Linear layer")
        loss_fn = None
        if self.importance == "taylor":
            loss_fn = ctx.workload.task_loss(state.bundle)
            if loss_fn is None:
                raise SlimcartError("taylor channel importance needs a workload with a training loss (labelled data)")
        state.keep_teacher(ctx)
        need_data = self.importance == "taylor" or self.recalibrate_bn
        batches = ctx.calibration(state.bundle, self.calibration_batches) if need_data else None
        ctx.progress(f"pruning {self.ratio:.0%} of the channels ({self.importance} importance)")
        rep = prune_channels(module, self.ratio, ctx.workload.example_batch(state.bundle), self.importance,
                             self.round_to, [m for n, m in layers.items() if not self.selects(n)], batches, loss_fn)
        recalibrated = recalibrate_batchnorm(module, batches) if self.recalibrate_bn else 0
        module.eval()
        state.reports[self.kind] = {**rep, "batchnorms_recalibrated": recalibrated}
        state.notes.append(
            f"channel pruning ({self.importance}, ratio {self.ratio:g}, round to {self.round_to}): parameters "
            f"{rep['params_before']:,} -> {rep['params_after']:,}, multiply-adds per example {rep['macs_before']:,} -> "
            f"{rep['macs_after']:,}; " + (f"{recalibrated} batch-norm layers re-estimated on {len(batches)} calibration batches"
                                          if recalibrated else "batch-norm statistics left as they were"))
        return state


@register_step
class PruneGruUnitsStep(LayerSelect, Step):
    """Physically remove hidden units of GRU layers (gru_units.py): each chosen layer keeps its most
    important units, its consumers their matching input columns. Follow with `distill` (student
    `current`) or `recover` (method `task`) to retrain the narrower GRU."""

    kind: Literal["prune_gru_units"] = "prune_gru_units"
    units: float = 0.5  # fraction of each chosen GRU's hidden units removed
    overrides: dict[str, float] = {}  # GRU name pattern -> fraction removed for that layer
    criterion: Literal["magnitude", "activation"] = "activation"
    round_to: int = Field(1, ge=1)  # kept widths a multiple of this
    calibration_batches: int = Field(16, ge=1)

    @field_validator("units")
    @classmethod
    def _fraction(cls, v: float) -> float:
        return check_fraction(v, "units")

    @field_validator("overrides")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        return {k: check_fraction(f, f"overrides[{k}]") for k, f in v.items()}

    def apply(self, state, ctx):
        module = state.torch_module(self.kind)
        rnn = recurrent(module)
        removed = {}
        for name, _ in rnn.layers:
            if self.selects(name):
                over = first_match(name, self.overrides)
                removed[name] = self.units if over is None else over
        if not any(removed.values()):
            raise SlimcartError(f"prune_gru_units: no GRU layer chosen (targets {self.targets}, exclude {self.exclude}; "
                                f"the model's GRUs: {', '.join(n for n, _ in rnn.layers)}) or nothing to remove")
        state.keep_teacher(ctx)
        batches = ctx.calibration(state.bundle, self.calibration_batches) if self.criterion == "activation" else None
        rep = prune_recurrent(module, rnn.layers, removed, self.criterion, batches, run_batch, rnn.positions, self.round_to)
        state.reports[self.kind] = rep
        widths = ", ".join(f"{n} {r['before']} -> {r['after']}" for n, r in rep["layers"].items())
        state.notes.append(f"GRU hidden-unit pruning ({self.criterion}): {widths}; parameters "
                           f"{rep['params_before']:,} -> {rep['params_after']:,} (narrower dense layers, same runtime)")
        return state


@register_step
class RecoverStep(RecoverConfig, Step):
    """Short training after pruning: distillation from the dense model, or the workload's loss."""

    kind: Literal["recover"] = "recover"

    def apply(self, state, ctx):
        module = state.torch_module(self.kind)
        batches = ctx.calibration(state.bundle, self.calibration_batches)
        task = ctx.workload.task_loss(state.bundle) if self.method == "task" else None
        rep = recover(module, batches, self, state.teacher, state.layer_map, task, state.masks or None, ctx.progress)
        module.eval()
        state.notes.append(f"recovery ({self.method}) on {len(batches)} calibration batches: {rep['steps']} steps, "
                           f"{rep['seconds']} s, loss {rep['loss_first_10pct']:.4f} -> {rep['loss_last_10pct']:.4f}")
        state.reports[self.kind] = rep
        return state
