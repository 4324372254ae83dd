"""Output folders written atomically, and the metrics.json schema (see docs/metrics.md)."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from .errors import SlimcartError

WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".data", ".bin", ".gguf", ".xml", ".npz")


def model_bytes(folder: Path) -> int:
    """Bytes on disk of the weight-bearing files of a model folder (tokenizer and config excluded)."""
    folder = Path(folder)
    if folder.is_file():
        return folder.stat().st_size
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


def check_output_path(out: Path, overwrite: bool) -> None:
    """Refuse an existing output unless --overwrite; make sure the parent can be written."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SlimcartError(f"output folder {out} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise SlimcartError(f"output path {out} exists and is not a folder")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SlimcartError(f"cannot create output parent folder {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise SlimcartError(f"output folder {parent} is not writable")


def partial_dir(out: Path) -> Path:
    """Where an unfinished run writes; kept after an interruption so the run can resume."""
    out = Path(out).resolve()
    return out.parent / f".{out.name}.partial"


def publish(tmp: Path, out: Path) -> None:
    """Move a finished temp folder into place; an old output is only removed once the new one is complete."""
    out = Path(out).resolve()
    trash = None
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(trash)
    tmp.rename(out)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
