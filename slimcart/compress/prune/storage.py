"""Saving pruned models so that bytes on disk fall and every folder reloads without pickles.

- `sparse-bitmask`: the workload's own folder, with every mostly-zero tensor of its safetensors
  files stored as a packed bitmask (1 bit per weight, uint8) plus the non-zero values in row-major
  order; everything else copied unchanged. Exact: decoding gives back the same tensors bit for bit.
- `structured-hf`: an ordinary HF folder (config.json + model.safetensors) whose per-layer shapes
  the stock config cannot express (e.g. BERT with fewer heads); config.json records them in
  `slimcart_structure`. The loader zero-pads the tensors to the config's dense shapes, loads the
  model the workload's normal way, and cuts it back to the recorded shapes.
Both loaders decode into a temporary folder and call the workload's own loader on it.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ...errors import SlimcartError
from ...formats import FORMAT_FILE, load_model_dir, register_format, write_format

SPARSE_SUFFIX = ".sparse.safetensors"
MASK, VALUES = ".__mask", ".__values"


def encode_sparse(tensors: dict[str, torch.Tensor], min_gain: float = 0.9) -> tuple[dict[str, torch.Tensor], dict]:
    """Bitmask-encode tensors whose encoded size is < min_gain * dense size; returns (tensors, shapes)."""
    out, shapes = {}, {}
    for name, t in tensors.items():
        t = t.detach().contiguous()
        nz = t != 0
        n_nz = int(nz.sum())
        encoded = n_nz * t.element_size() + (t.numel() + 7) // 8
        if t.ndim < 2 or encoded >= min_gain * t.numel() * t.element_size():
            out[name] = t
            continue
        bits = np.packbits(nz.flatten().numpy())
        out[name + MASK] = torch.from_numpy(bits)
        out[name + VALUES] = t[nz].contiguous()  # boolean indexing reads row-major: the decoding order
        shapes[name] = list(t.shape)
    return out, shapes


def decode_sparse(tensors: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Inverse of encode_sparse."""
    out = {k: v for k, v in tensors.items() if not (k.endswith(MASK) or k.endswith(VALUES))}
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        nz = torch.from_numpy(np.unpackbits(tensors[name + MASK].numpy(), count=n).astype(bool)).view(shape)
        values = tensors[name + VALUES]
        dense = torch.zeros(shape, dtype=values.dtype)
        dense[nz] = values
        out[name] = dense
    return out


def _copy_others(src: Path, dest: Path) -> None:
    """Every file except weights and the format marker (tokenizer, config, sentence-transformers files)."""
    for f in src.rglob("*"):
        rel = f.relative_to(src)
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != FORMAT_FILE:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest / rel)


def sparse_saver(workload, bundle, inner=None):
    """A ModelState.saver writing the workload's folder (or `inner`'s) with bitmask-encoded weights."""
    from safetensors.torch import load_file, save_file

    def save(folder: Path) -> None:
        folder = Path(folder)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            inner(tmp) if inner is not None else workload.save_model(bundle, tmp)
            inner_meta = json.loads((tmp / FORMAT_FILE).read_text()) if (tmp / FORMAT_FILE).exists() else None
            folder.mkdir(parents=True, exist_ok=True)
            _copy_others(tmp, folder)
            files = {}
            for f in sorted(tmp.rglob("*.safetensors")):
                enc, shapes = encode_sparse(load_file(str(f)))
                name = f.name[: -len(".safetensors")] + SPARSE_SUFFIX
                save_file(enc, str(folder / name), metadata={"format": "pt"})
                files[name] = {"original": f.name, "sparse": shapes}
        write_format(folder, "sparse-bitmask", files=files, inner=inner_meta)

    return save


@register_format("sparse-bitmask")
def load_sparse(workload, folder: Path, meta: dict):
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _copy_others(folder, tmp)
        for name, info in meta.get("files", {}).items():
            if not (folder / name).exists():
                raise SlimcartError(f"{folder}: weight file {name} named in {FORMAT_FILE} is missing")
            save_file(decode_sparse(load_file(str(folder / name)), info["sparse"]), str(tmp / info["original"]),
                      metadata={"format": "pt"})
        if meta.get("inner"):
            (tmp / FORMAT_FILE).write_text(json.dumps(meta["inner"]))
        runner, bundle = load_model_dir(workload, tmp)
    return _relocated(workload, runner, bundle, folder)


def _relocated(workload, runner, bundle, folder: Path):
    """The loaded bundle points at the real folder, not the deleted temporary one."""
    if bundle is not None:
        bundle.source, bundle.name = folder, str(folder)
    return runner, bundle


def structured_saver(workload, bundle):
    """Saver for shapes the stock config cannot hold: the workload's folder plus a format marker."""

    def save(folder: Path) -> None:
        workload.save_model(bundle, Path(folder))
        cfg = json.loads((Path(folder) / "config.json").read_text())
        if "slimcart_structure" in cfg:  # else the shapes became stock again: a plain folder is right
            write_format(folder, "structured-hf", structure=cfg["slimcart_structure"])

    return save


def dense_shapes(config_dir: Path) -> dict[str, tuple[int, ...]]:
    """Parameter shapes the stock model class builds from config.json (on the meta device: no memory)."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(str(config_dir))
    arch = (cfg.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise SlimcartError(f"{config_dir}/config.json names no known architecture ({arch})")
    with torch.device("meta"):
        skeleton = cls(cfg)
    return {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}


def pad_to(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad at the end of every dimension (the real units of a pruned tensor are stored first)."""
    if tuple(t.shape) == tuple(shape):
        return t
    if len(shape) != t.ndim or any(a > b for a, b in zip(t.shape, shape)):
        raise SlimcartError(f"stored tensor of shape {tuple(t.shape)} does not fit the config's {tuple(shape)}")
    out = torch.zeros(shape, dtype=t.dtype)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


@register_format("structured-hf")
def load_structured(workload, folder: Path, meta: dict):
    from safetensors.torch import load_file, save_file

    from .structured import apply_structure

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _copy_others(folder, tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        if "dense_heads" in meta["structure"]:  # BERT: build with the dense head count, cut back below
            cfg["num_attention_heads"] = meta["structure"]["dense_heads"]
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        expected = dense_shapes(tmp)
        for f in folder.glob("*.safetensors"):
            tensors = load_file(str(f))
            save_file({k: pad_to(v, expected[k]) if k in expected else v for k, v in tensors.items()},
                      str(tmp / f.name), metadata={"format": "pt"})
        _, bundle = workload.load_artifact(tmp)
    apply_structure(bundle.module, meta["structure"])
    return _relocated(workload, workload.torch_runner(bundle), bundle, folder)
