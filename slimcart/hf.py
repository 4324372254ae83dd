"""Every Hugging Face `from_pretrained` slimcart makes goes through here, so a model folder never runs
its own Python (`auto_map` / custom code) unless the user said so with `--trust-remote-code`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import SlimcartError

_TRUST = {"remote_code": False}


def allow_remote_code(allow: bool) -> None:
    """Set by the CLI's --trust-remote-code (off by default): whether model folders may run their own code."""
    _TRUST["remote_code"] = bool(allow)


def load(cls_name: str, folder: Path | str, **kwargs: Any) -> Any:
    """`transformers.<cls_name>.from_pretrained(folder, trust_remote_code=<the user's choice>, **kwargs)`,
    with any loading failure turned into one clear line."""
    import transformers

    cls = getattr(transformers, cls_name)
    try:
        return cls.from_pretrained(str(folder), trust_remote_code=_TRUST["remote_code"], **kwargs)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for bad folders
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SlimcartError(f"cannot load {cls_name.removeprefix('Auto').lower() or 'model'} from {folder}: {msg}") from None
