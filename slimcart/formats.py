"""Model folders in formats beyond plain HF/ONNX (e.g. packed int4 weights for a torch kernel).

Such a folder holds `slimcart-format.json` = {"format": NAME, ...}. The module that writes a format
registers its loader here; `load_model_dir` dispatches on the name and falls back to the
workload's own loader (HF folder or model.onnx).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from .errors import SlimcartError

FORMAT_FILE = "slimcart-format.json"
LOADERS: dict[str, Callable[[Any, Path, dict], tuple[Any, Any]]] = {}


def register_format(name: str):
    """Decorator: `loader(workload, folder, meta) -> (runner, bundle)` for folders of this format."""

    def deco(fn):
        LOADERS[name] = fn
        return fn

    return deco


def write_format(folder: Path, name: str, **meta) -> None:
    (Path(folder) / FORMAT_FILE).write_text(json.dumps({"format": name, **meta}, indent=2))


def load_model_dir(workload, folder: Path):
    """(runner, bundle) for a saved model folder of any format slimcart writes."""
    folder = Path(folder)
    meta_file = folder / FORMAT_FILE
    if not meta_file.exists():
        return workload.load_artifact(folder)
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError:
        raise SlimcartError(f"{meta_file} is not valid JSON") from None
    from .recipe import _load_step_modules

    _load_step_modules()  # technique modules register their loaders on import
    loader = LOADERS.get(meta.get("format"))
    if loader is None:
        raise SlimcartError(f"unknown slimcart model format '{meta.get('format')}' in {folder}")
    return loader(workload, folder, meta)
