"""Zero stand-ins: how a saved format holds layers no standard folder can (dynamic int8 modules,
compressed embedding tables) on top of another format's folder.

Saving: each special layer is swapped for an all-zero float layer of its shape while the inner format
(or the workload) writes its folder; `strip` then cuts those zero tensors out of the folder's
safetensors files, so the folder holds only the compressed bytes, and records where each one was.
Loading: `restore` checks every recorded entry against the layers being rebuilt and puts the zeros back
in a temporary copy, which the inner format then loads as it was saved.

`params` = {module name: {parameter name: shape}} of the stand-ins. A safetensors key belongs to a
stand-in when it is `<module>.<param>`, possibly under a prefix (a wrapper's path).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..contracts import inside
from ..errors import SlimcartError

Params = dict[str, dict[str, tuple[int, ...]]]


def owner(key: str, params: Params) -> tuple[str, str] | None:
    """(module name, parameter name) the safetensors `key` belongs to, or None."""
    for name, shapes in params.items():
        for p in shapes:
            if key == f"{name}.{p}" or key.endswith(f".{name}.{p}"):
                return name, p
    return None


def _rewrite(f: Path, state: dict[str, torch.Tensor], meta) -> None:
    tmp = f.with_suffix(".tmp")  # load_file maps the old file: write a new one, then rename over it
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
    os.replace(tmp, f)


def strip(folder: Path, params: Params, what: str) -> list[dict]:
    """Remove the zero stand-ins' tensors from the safetensors files under `folder`; returns
    [{"file", "key", "shape"}] for the format file. `what` names the layers in errors."""
    folder = Path(folder)
    found, left = [], {(n, p) for n, shapes in params.items() for p in shapes}
    for f in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            keys, meta = list(sf.keys()), sf.metadata()
            drop = [k for k in keys if (o := owner(k, params)) and tuple(sf.get_slice(k).get_shape()) == params[o[0]][o[1]]]
        if not drop:
            continue
        kept = load_file(str(f))
        for k in drop:
            if bool(kept[k].any()):
                raise SlimcartError(f"{f.name}: '{k}' is not the zero stand-in of {what}")
            left.discard(owner(k, params))
            found.append({"file": str(f.relative_to(folder)), "key": k, "shape": list(kept.pop(k).shape)})
        _rewrite(f, kept, meta)
    if left:
        raise SlimcartError(f"the saved folder keeps {sorted(left)} where the format cannot find them "
                            "(it needs safetensors keyed by module name)")
    return found


def restore(work: Path, stand_ins: list, params: Params, folder: Path, what: str) -> None:
    """Put the zero stand-ins back into the copied folder `work`; every entry of the format file
    (read from `folder`, untrusted) must name a file inside it and match a layer's shape."""
    by_file: dict[str, list[dict]] = {}
    for s in stand_ins:
        if not isinstance(s, dict) or not isinstance(s.get("key"), str) or not isinstance(s.get("shape"), list):
            raise SlimcartError(f"{folder}: a stand-in entry in the format file is malformed")
        o = owner(s["key"], params)
        try:
            shape = tuple(int(x) for x in s["shape"])
        except (TypeError, ValueError):
            shape = None
        if o is None or shape != params[o[0]][o[1]]:
            raise SlimcartError(f"{folder}: stand-in {s['key']} does not match the shape of {what}")
        by_file.setdefault(s.get("file"), []).append(s)
    for rel, entries in by_file.items():
        f = inside(work, rel, "stand-in file")
        with safe_open(str(f), "pt") as sf:
            meta = sf.metadata()
        state = load_file(str(f))
        state.update({s["key"]: torch.zeros(*[int(x) for x in s["shape"]]) for s in entries})
        _rewrite(f, state, meta)
