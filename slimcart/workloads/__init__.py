"""Workload registry: `get_workload("search" | "llm" | "recsys" | "vision" | "session" | "ctr")`, or any
object that follows the `slimcart.contracts.Workload` protocol (a user's own workload needs no file here)."""
from __future__ import annotations

import importlib
from typing import Any

from ..contracts import Workload
from ..errors import SlimcartError

_MODULES = {"search": "slimcart.workloads.search", "llm": "slimcart.workloads.llm", "recsys": "slimcart.workloads.recsys",
            "vision": "slimcart.workloads.vision", "session": "slimcart.workloads.session",
            "ctr": "slimcart.workloads.ctr"}
WORKLOADS = tuple(_MODULES)


def get_workload(name: str | Any) -> Workload:
    """A fresh workload object by name (unknown names are a user error); a workload object passes through."""
    if not isinstance(name, str):
        return name
    if name not in _MODULES:
        raise SlimcartError(f"unknown workload '{name}' (choose one of: {', '.join(_MODULES)})")
    return importlib.import_module(_MODULES[name]).WORKLOAD_CLASS()


__all__ = ["get_workload", "WORKLOADS"]
