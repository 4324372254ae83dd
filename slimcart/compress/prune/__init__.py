"""Pruning: one verb, `prune(module, config, batches)`, with a typed config per kind.

- SparsityConfig: unstructured / N:M sparsity by magnitude (layer or global), Wanda or SparseGPT,
  one-shot or gradual (cubic schedule). Size-only on this CPU: stored compressed, no speed claimed.
- StructuredConfig: heads / KV groups, FFN neurons, whole layers, SASRec hidden dims, physically
  removed so the smaller model is faster on any runtime.
- RecoverConfig (via `recover`): short distillation or task-loss training afterwards.
Recipe steps: `prune`, `prune_structured`, `recover` (see steps.py); formats: storage.py.
"""
from __future__ import annotations

from .config import GradualConfig, RecoverConfig, SparsityConfig, StructuredConfig
from .recover import recover


def prune(module, config: SparsityConfig | StructuredConfig, batches: list[dict] | None = None,
          loss_fn=None, progress=lambda m: None) -> dict:
    """Prune `module` in place. Returns sparsity masks (SparsityConfig) or a shape report (StructuredConfig)."""
    if isinstance(config, StructuredConfig):
        from .structured import prune_structured

        return prune_structured(module, config, batches, loss_fn, progress)
    from .oneshot import prune_sparse

    return prune_sparse(module, config, batches, progress)


__all__ = ["prune", "recover", "SparsityConfig", "StructuredConfig", "RecoverConfig", "GradualConfig"]
