"""Recipe steps of the pruning family: `prune`, `prune_structured`, `recover`.

The first pruning step keeps a copy of the dense model as the teacher for `recover`. Unstructured
and N:M sparsity is labelled size-only (no CPU kernel here skips zeros) and saved bitmask-encoded;
structured pruning needs no label: the smaller model runs on the same runtime as the dense one.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

from ...errors import SlimcartError
from ...recipe import Step, register_step
from ...runtime.onnx_runtime import copy_onnx
from .arch import detect
from .config import RecoverConfig, SparsityConfig, StructuredConfig
from .masks import apply_masks, sparsity_report, target_linears
from .oneshot import magnitude_masks, prune_sparse
from .recover import distill_loss, recover, sensitivity_loss, task_loss, train
from .schedule import cubic_sparsity, prune_points
from .storage import sparse_saver, structured_saver


def _torch_model(state, kind: str):
    if not state.runtime.startswith("torch") or state.bundle.module is None:
        raise SlimcartError(f"'{kind}' works on the PyTorch model: put it before export/quantization steps")
    return state.bundle.module


def _stash_teacher(state) -> None:
    if "dense_teacher" not in state.extra:
        state.extra["dense_teacher"] = copy.deepcopy(state.bundle.module).eval()
        state.extra["layer_map"] = list(range(len(detect(state.bundle.module).layers)))


def _torch_saver(state, saver):
    """Use `saver` while the result is a torch model; once exported, the ONNX file is the artifact."""

    def save(folder: Path) -> None:
        if state.runtime == "onnxruntime":
            copy_onnx(state.onnx_path, folder)
        else:
            saver(folder)

    return save


def _task_or_none(ctx, bundle):
    try:
        return task_loss(ctx.workload.name, bundle)
    except SlimcartError:
        return None


@register_step
class PruneStep(SparsityConfig, Step):
    """Unstructured or N:M sparsity (magnitude / Wanda / SparseGPT, one-shot or gradual)."""

    kind: Literal["prune"] = "prune"

    def apply(self, state, ctx):
        module = _torch_model(state, self.kind)
        linears = target_linears(module, self.sparsity_of)
        from .oneshot import check_targets

        check_targets(linears, self)
        if self.gradual is not None or ctx.later("recover", "distill"):
            _stash_teacher(state)  # distillation learns from the model as it was before pruning (a full copy)
        if self.gradual is not None:
            masks = self._gradual(state, ctx, linears)
        else:
            batches = ctx.calibration(state.bundle, self.calibration_batches) if self.method != "magnitude" else None
            masks = prune_sparse(module, self, batches, ctx.progress)
        state.extra["prune_masks"] = {**state.extra.get("prune_masks", {}), **masks}
        rep = sparsity_report(linears)
        what = f"{self.method} {self.pattern} pruning" + (" (gradual, cubic schedule)" if self.gradual else "")
        state.size_only.append(f"{what}: {rep['overall']:.1%} of {len(linears)} Linear weights are zero; stored as "
                               "bitmask + packed values (smaller on disk), but dense kernels still compute every weight")
        state.notes.append(f"{what}: {len(linears)} Linear layers, measured sparsity {rep['overall']:.4f}")
        state.saver = _torch_saver(state, sparse_saver(ctx.workload, state.bundle, inner=state.saver))
        return state

    def _gradual(self, state, ctx, linears):
        g = self.gradual
        module = state.bundle.module
        batches = ctx.calibration(state.bundle, g.calibration_batches)
        cleanup = lambda: None  # noqa: E731
        if g.method == "task":
            loss = task_loss(ctx.workload.name, state.bundle)
        else:
            loss, cleanup = distill_loss(RecoverConfig(), state.extra["dense_teacher"], state.extra["layer_map"])
        ramp = max(1, int(g.steps * g.ramp_fraction))
        points, masks = set(prune_points(g.steps, g.prune_every, g.ramp_fraction)), {}

        def on_step(step: int) -> None:
            if step in points:
                masks.clear()
                masks.update(magnitude_masks(linears, self, cubic_sparsity(step, ramp, self.sparsity, g.initial_sparsity)))
                apply_masks(linears, masks)

        try:
            rep = train(module, batches, loss, g.steps, g.lr, max_minutes=1e9, masks=masks, on_step=on_step,
                        progress=ctx.progress)
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

        module = _torch_model(state, self.kind)
        if state.extra.get("prune_masks"):
            raise SlimcartError("put prune_structured before unstructured 'prune' steps (their masks would not fit)")
        _stash_teacher(state)
        needs_data = self.criterion != "magnitude" or (isinstance(self.layers, int) and self.layers > 0)
        batches = ctx.calibration(state.bundle, self.calibration_batches) if needs_data else None
        loss_fn = (_task_or_none(ctx, state.bundle) or sensitivity_loss) if self.criterion == "taylor" else None
        rep = prune_structured(module, self, batches, loss_fn, ctx.progress)
        old = state.extra["layer_map"]
        state.extra["layer_map"] = [t for i, t in enumerate(old) if i not in set(rep["dropped_layers"])]
        state.extra["structure"] = rep
        state.notes.append(
            f"structured pruning ({self.criterion}): parameters inside the transformer blocks "
            f"{rep['block_params_before']:,} -> {rep['block_params_after']:,} ({rep['block_params_removed']:.1%} removed; "
            f"embeddings not counted); shapes {rep['shapes']}")
        cfg = getattr(detect(module), "config", None)
        if getattr(cfg, "slimcart_structure", None):
            state.notes.append("per-layer shapes are not expressible in the stock HF config: saved as 'structured-hf' "
                               "(safetensors + config.json with slimcart_structure), reloaded by slimcart")
            state.saver = _torch_saver(state, structured_saver(ctx.workload, state.bundle))
        return state


@register_step
class RecoverStep(RecoverConfig, Step):
    """Short training after pruning: distillation from the dense model, or the workload's loss."""

    kind: Literal["recover"] = "recover"

    def apply(self, state, ctx):
        module = _torch_model(state, self.kind)
        batches = ctx.calibration(state.bundle, self.calibration_batches)
        task = task_loss(ctx.workload.name, state.bundle) if self.method == "task" else None
        rep = recover(module, batches, self, state.extra.get("dense_teacher"), state.extra.get("layer_map"), task,
                      state.extra.get("prune_masks"), ctx.progress)
        module.eval()
        state.notes.append(f"recovery ({self.method}) on {len(batches)} calibration batches: {rep['steps']} steps, "
                           f"{rep['seconds']} s, loss {rep['loss_first_10pct']:.4f} -> {rep['loss_last_10pct']:.4f}")
        state.extra["recover_report"] = rep
        return state
