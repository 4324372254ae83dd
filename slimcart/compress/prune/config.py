"""Typed configs of the pruning family: what to prune, how much, and which criterion decides.

Validation happens here, before any weight is touched, so a bad recipe fails with one clear line
and nothing is written. Per-layer overrides are data: fnmatch patterns over module names.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from ...arch import LayerSelect, first_match
from ...errors import SlimcartError


def check_fraction(value: float, what: str) -> float:
    """A pruned fraction must lie in [0, 1): pruning everything leaves no model."""
    if not (0.0 <= float(value) < 1.0):
        raise SlimcartError(f"{what} must be in [0, 1), got {value}")
    return float(value)


def parse_nm(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M): keep N weights in every M consecutive inputs."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise SlimcartError(f"sparsity pattern must be 'unstructured' or 'N:M' like '2:4', got '{pattern}'") from None
    if not (0 < n < m):
        raise SlimcartError(f"N:M pattern needs 0 < N < M, got '{pattern}'")
    return n, m


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GradualConfig(_Cfg):
    """Zhu & Gupta gradual pruning: sparsity rises on a cubic curve while the model trains."""

    steps: int = 300  # training steps in total
    prune_every: int = 25  # masks are recomputed every this many steps
    initial_sparsity: float = 0.0
    ramp_fraction: float = 0.75  # the cubic ramp ends here; the rest of training recovers at full sparsity
    lr: float = 2e-5
    calibration_batches: int = 64
    method: Literal["distill", "task"] = "distill"  # train against the dense model, or the workload's loss

    @field_validator("initial_sparsity")
    @classmethod
    def _s0(cls, v: float) -> float:
        return check_fraction(v, "gradual.initial_sparsity")


class SparsityConfig(LayerSelect):
    """Unstructured or N:M sparsity of Linear weights (the `prune` step): Linears in `targets`, not in
    `exclude`; `overrides` maps a pattern to its own sparsity (0 = leave dense; first match wins)."""

    method: Literal["magnitude", "wanda", "sparsegpt"] = "magnitude"
    sparsity: float = 0.5
    pattern: str = "unstructured"  # or "N:M", e.g. "2:4"
    scope: Literal["layer", "global"] = "layer"  # global: one magnitude threshold over all targets
    # Tied output heads share their weight with the input embedding: pruning them would prune both.
    exclude: list[str] = ["*lm_head*"]
    overrides: dict[str, float] = {}
    calibration_batches: int = 32
    block_size: int = 128  # SparseGPT columns per lazy update block
    damp: float = 0.01  # SparseGPT: fraction of mean diag(H) added for numerical stability
    sequential: bool = True  # Wanda/SparseGPT: calibrate each sub-layer on the already-pruned ones before it
    gradual: GradualConfig | None = None

    @field_validator("sparsity")
    @classmethod
    def _s(cls, v: float) -> float:
        return check_fraction(v, "sparsity")

    @field_validator("overrides")
    @classmethod
    def _o(cls, v: dict[str, float]) -> dict[str, float]:
        for pat, s in v.items():
            check_fraction(s, f"override sparsity for '{pat}'")
        return v

    @model_validator(mode="after")
    def _combos(self) -> "SparsityConfig":
        nm = parse_nm(self.pattern)
        if self.scope == "global" and (self.method != "magnitude" or nm is not None):
            raise SlimcartError("scope 'global' is for unstructured magnitude pruning only (Wanda/SparseGPT/N:M are per layer)")
        if nm is not None and self.overrides:
            raise SlimcartError("per-layer sparsity overrides do not apply to an N:M pattern (its sparsity is fixed)")
        if self.gradual is not None and (self.method != "magnitude" or nm is not None or self.sparsity == 0):
            raise SlimcartError("gradual pruning is defined for unstructured magnitude pruning with sparsity > 0")
        if self.calibration_batches < 1:
            raise SlimcartError("calibration_batches must be >= 1")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_nm(self.pattern)

    def sparsity_of(self, name: str) -> float:
        """Target sparsity of one module (overrides first, then targets/exclude, else 0)."""
        over = first_match(name, self.overrides)
        if over is not None:
            return over
        if not self.selects(name):
            return 0.0
        return 1.0 - self.nm[0] / self.nm[1] if self.nm else self.sparsity


class StructuredConfig(_Cfg):
    """Structured pruning that physically removes heads, FFN neurons, layers or hidden dims."""

    heads: float = 0.0  # fraction of attention heads removed (Llama: whole key-value groups)
    gqa: Literal["groups", "queries"] = "groups"  # Llama: remove whole KV groups, or query heads evenly per group
    ffn: float = 0.0  # fraction of FFN / MLP neurons removed
    hidden: float = 0.0  # fraction of the residual / embedding width removed (SASRec)
    layers: list[int] | int = []  # layer indices to drop, or how many (chosen by block influence)
    criterion: Literal["magnitude", "taylor", "activation"] = "activation"
    allocation: Literal["uniform", "global"] = "uniform"  # same count per layer, or ranked across layers
    round_to: int = 1  # FFN / hidden widths kept as a multiple of this (8 or 16 suit SIMD kernels)
    calibration_batches: int = 16

    @field_validator("heads", "ffn", "hidden")
    @classmethod
    def _f(cls, v: float, info) -> float:
        return check_fraction(v, info.field_name)

    @model_validator(mode="after")
    def _any(self) -> "StructuredConfig":
        if self.round_to < 1:
            raise SlimcartError("round_to must be >= 1")
        if isinstance(self.layers, int) and self.layers < 0:
            raise SlimcartError("layers must be a list of indices or a non-negative count")
        if not (self.heads or self.ffn or self.hidden or self.layers):
            raise SlimcartError("structured pruning needs at least one of heads, ffn, hidden, layers")
        return self


class RecoverConfig(_Cfg):
    """Short training after pruning: distillation from the dense model, or the workload's own loss."""

    method: Literal["distill", "task"] = "distill"
    steps: int = 400
    max_minutes: float = 5.0
    lr: float = 5e-5
    calibration_batches: int = 128
    hidden_weight: float = 1.0  # distill: weight of the per-layer hidden-state MSE next to the output loss
    output_loss: Literal["auto", "cosine", "mse", "kl"] = "auto"  # auto: kl for causal-LM logits, else cosine

    @model_validator(mode="after")
    def _pos(self) -> "RecoverConfig":
        if self.steps < 1 or self.max_minutes <= 0 or self.lr <= 0 or self.calibration_batches < 1:
            raise SlimcartError("recover needs steps >= 1, max_minutes > 0, lr > 0 and calibration_batches >= 1")
        return self
