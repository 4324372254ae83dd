"""Saving pruned models so that bytes on disk fall and every folder reloads without pickles.

- `sparse-bitmask`: the folder another format wrote (the workload's own, or structured-hf), with every
  mostly-zero tensor of its safetensors files stored as a packed bitmask (1 bit per weight, uint8)
  plus the non-zero values in row-major order; everything else copied unchanged. Exact: decoding
  gives back the same tensors bit for bit.
- `structured-hf`: an ordinary HF folder (config.json + model.safetensors) whose per-layer shapes
  the stock config cannot express (e.g. BERT with fewer heads); config.json records them in
  `slimcart_structure`. The loader zero-pads the tensors to the config's dense shapes, loads the
  model the workload's normal way, and cuts it back to the recorded shapes.
Both loaders decode into a temporary folder and load that the usual way.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from ...contracts import (
    FORMAT_FILE,
    Artifact,
    ModelBundle,
    inside,
    load_saved,
    read_format,
    register_artifact,
    write_format,
)
from ...errors import SlimcartError
from ...outputs import copy_files

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
    """Every regular file except weights and the format marker (tokenizer, config, sentence-transformers files)."""
    copy_files(src, dest, lambda rel: not rel.name.endswith(".safetensors") and rel.name != FORMAT_FILE)


def _relocated(bundle: ModelBundle, folder: Path) -> ModelBundle:
    """The loaded bundle points at the real folder, not the deleted temporary one."""
    bundle.source, bundle.name = folder, str(folder)
    return bundle


@register_artifact
class SparseBitmask(Artifact):
    """Wraps the artifact the model had before pruning (None: the workload's folder): that folder,
    with mostly-zero tensors bitmask-encoded."""

    format = "sparse-bitmask"
    in_torch = True

    def __init__(self, inner: Artifact | None):
        self.inner = inner
        self.runtime = inner.runtime if inner is not None else "torch"

    def save(self, folder: Path, workload, bundle: ModelBundle) -> None:
        from safetensors.torch import load_file, save_file

        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            workload.save_model(bundle, tmp) if self.inner is None else self.inner.save(tmp, workload, bundle)
            inner_meta = read_format(tmp)
            _copy_others(tmp, folder)
            files = {}
            for f in sorted(tmp.rglob("*.safetensors")):
                enc, shapes = encode_sparse(load_file(str(f)))
                name = f.name[: -len(".safetensors")] + SPARSE_SUFFIX
                save_file(enc, str(folder / name), metadata={"format": "pt"})
                files[name] = {"original": f.name, "sparse": shapes}
        write_format(folder, self.format, files=files, inner=inner_meta)

    @classmethod
    def load(cls, folder: Path, meta: dict, workload, threads: int):
        from safetensors.torch import load_file, save_file

        files = meta.get("files")
        if not isinstance(files, dict):
            raise SlimcartError(f"{folder / FORMAT_FILE} has no 'files' table")
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            _copy_others(folder, tmp)
            for name, info in files.items():
                src = inside(folder, name, "weight file")
                if not src.is_file():
                    raise SlimcartError(f"{folder}: weight file {name} named in {FORMAT_FILE} is missing")
                if not isinstance(info, dict) or not isinstance(info.get("sparse"), dict):
                    raise SlimcartError(f"{folder / FORMAT_FILE}: entry {name!r} needs 'original' and 'sparse'")
                dest = inside(tmp, info.get("original"), "original weight file")
                try:
                    dense = decode_sparse(load_file(str(src)), info["sparse"])
                except (KeyError, TypeError, ValueError, RuntimeError) as e:
                    raise SlimcartError(f"{folder}: {name} does not match {FORMAT_FILE} ({type(e).__name__})") from None
                save_file(dense, str(dest), metadata={"format": "pt"})
            if isinstance(meta.get("inner"), dict):
                (tmp / FORMAT_FILE).write_text(json.dumps(meta["inner"]))
            runner, bundle = load_saved(tmp, workload, threads)
        return runner, _relocated(bundle, folder)


@register_artifact
class StructuredHF(Artifact):
    """The workload's folder of a structurally pruned model whose per-layer shapes the stock config
    cannot hold; config.json records them in `slimcart_structure`."""

    format = "structured-hf"
    in_torch = True

    def save(self, folder: Path, workload, bundle: ModelBundle) -> None:
        workload.save_model(bundle, folder)
        cfg = json.loads((folder / "config.json").read_text())
        if "slimcart_structure" in cfg:  # else the shapes became stock again: a plain folder is right
            write_format(folder, self.format, structure=cfg["slimcart_structure"])

    @classmethod
    def load(cls, folder: Path, meta: dict, workload, threads: int):
        from safetensors.torch import load_file, save_file

        from .structured import apply_structure

        structure = meta.get("structure")
        if not isinstance(structure, dict) or not {"heads", "intermediate"} <= set(structure):
            raise SlimcartError(f"{folder / FORMAT_FILE}: 'structure' needs per-layer 'heads' and 'intermediate'")
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            _copy_others(folder, tmp)
            cfg = json.loads((tmp / "config.json").read_text())
            if "dense_heads" in structure:  # BERT: build with the dense head count, cut back below
                cfg["num_attention_heads"] = structure["dense_heads"]
                (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
            expected = dense_shapes(tmp)
            for f in folder.glob("*.safetensors"):
                tensors = load_file(str(f))
                save_file({k: pad_to(v, expected[k]) if k in expected else v for k, v in tensors.items()},
                          str(tmp / f.name), metadata={"format": "pt"})
            bundle = workload.load_model(str(tmp))
        try:
            apply_structure(bundle.module, structure)
        except (IndexError, KeyError, TypeError) as e:
            raise SlimcartError(f"{folder}: recorded structure does not fit the model ({type(e).__name__})") from None
        return workload.torch_runner(bundle), _relocated(bundle, folder)


# Model classes a structured-hf config may name: the architectures structured pruning produces.
ARCHITECTURES = ("BertModel", "BertForMaskedLM", "LlamaForCausalLM", "LlamaModel", "MistralForCausalLM", "Qwen2ForCausalLM")


def dense_shapes(config_dir: Path) -> dict[str, tuple[int, ...]]:
    """Parameter shapes the stock model class builds from config.json (on the meta device: no memory)."""
    import transformers

    try:
        cfg = transformers.AutoConfig.from_pretrained(str(config_dir), trust_remote_code=False)
    except Exception as e:
        raise SlimcartError(f"cannot read {config_dir}/config.json: {str(e).splitlines()[0]}") from None
    arch = (cfg.architectures or [None])[0]
    if arch not in ARCHITECTURES:
        raise SlimcartError(f"{config_dir}/config.json names architecture {arch!r}; structured-hf folders hold one of "
                            f"{', '.join(ARCHITECTURES)}")
    with torch.device("meta"):
        skeleton = getattr(transformers, arch)(cfg)
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
