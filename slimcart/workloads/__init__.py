"""Workload registry: `get_workload("search" | "llm" | "recsys" | "ctr")`."""
from __future__ import annotations

import importlib

from ..errors import SlimcartError
from .base import BenchInputs, DataInfo, EvalResult, ModelBundle, Runner, Workload

_MODULES = {"search": "slimcart.workloads.search", "llm": "slimcart.workloads.llm", "recsys": "slimcart.workloads.recsys",
            "ctr": "slimcart.workloads.ctr"}
WORKLOADS = tuple(_MODULES)


def get_workload(name: str) -> Workload:
    """Return a fresh workload object by name; unknown names are a user error."""
    if name not in _MODULES:
        raise SlimcartError(f"unknown workload '{name}' (choose one of: {', '.join(_MODULES)})")
    return importlib.import_module(_MODULES[name]).WORKLOAD_CLASS()


__all__ = ["get_workload", "WORKLOADS", "Workload", "Runner", "ModelBundle", "DataInfo", "BenchInputs", "EvalResult"]
