"""Recipe steps of the pruning family: `prune`, `prune_structured`, `recover`.

A pruning step keeps a copy of the model before pruning as the teacher when a `recover` or `distill`
step follows. Unstructured and N:M sparsity is labelled size-only (no CPU kernel here skips zeros)
and saved bitmask-encoded; structured pruning needs no label: the smaller model runs on the same
runtime as the dense one.
"""
from __future__ import annotations

from typing import Literal

from ...arch import detect
from ...errors import SlimcartError
from ...recipe import Step, register_step
from ..train import train
from .config import RecoverConfig, SparsityConfig, StructuredConfig
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
