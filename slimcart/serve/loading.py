"""The one place serving and batch jobs load a model."""
from __future__ import annotations

from typing import Any


def load_model(workload: str, model: str, threads: int) -> tuple[Any, Any, Any]:
    """(workload object, runner, bundle) for an alias, a model folder or a slimcart output folder,
    with intra-op threads pinned to `threads` first (so the runtime is created with that budget)."""
    from .. import api
    from ..bench import set_threads
    from ..workloads import get_workload

    set_threads(threads)
    wl = get_workload(workload)
    runner, bundle = api.load(wl, model, threads)
    return wl, runner, bundle
