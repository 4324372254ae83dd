"""Gradual pruning schedule of Zhu & Gupta (2017): sparsity rises fast early, slowly near the end.

    s_t = s_f + (s_i - s_f) * (1 - t / T)^3   for 0 <= t <= T, then s_f

Pruning early when many weights are redundant and gently later gives the network time to recover.
"""
from __future__ import annotations

from .config import check_fraction


def cubic_sparsity(step: int, ramp_steps: int, final: float, initial: float = 0.0) -> float:
    """Target sparsity after `step` of `ramp_steps` steps of the ramp (constant at `final` afterwards)."""
    check_fraction(final, "final sparsity")
    check_fraction(initial, "initial sparsity")
    if ramp_steps <= 0 or step >= ramp_steps:
        return final
    frac = max(step, 0) / ramp_steps
    return final + (initial - final) * (1.0 - frac) ** 3


def prune_points(total_steps: int, every: int, ramp_fraction: float) -> list[int]:
    """Steps at which masks are recomputed: every `every` steps during the ramp, and at its end."""
    ramp = max(1, int(total_steps * ramp_fraction))
    points = list(range(0, ramp, max(1, every)))
    return points + [ramp] if points[-1] != ramp else points
