"""Saved format "embeddings-compressed": the workload's own folder without its compressed tables, plus
the tables as tensors and a JSON description.

    folder/
      slimcart-format.json     {"format": "embeddings-compressed", "tables": {name: description},
                                "stand_ins": [{"file", "key", "shape"}], "model_dir": "model"}
      embeddings.safetensors   every table's tensors, keyed "<module name>/<tensor name>"
      model/                   what workload.save_model wrote, less the float tables

Saving: each compressed table is swapped for a zero float nn.Embedding / nn.EmbeddingBag of its shape
while `workload.save_model` writes its folder (the workload never learns the table was compressed),
then those zero tables are removed from the folder's safetensors files, so the folder holds the
compressed bytes only. Loading: the zero tables are put back in a temporary copy for
`workload.load_model`, and the compressed tables are swapped in; quantized rows stay memory-mapped.

Limitation (needs a contract change, see docs/embeddings-at-scale.md): the zero stand-in is allocated
in float32 for a moment during save and load, since a workload builds its model with float tables.
It also assumes the workload stores tensors in safetensors files keyed by module path (SASRec and
Hugging Face folders do); anything else is refused with one clear error.
"""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ...contracts import Artifact, inside, register_artifact, write_format
from ...errors import SlimcartError
from ...outputs import copy_files
from .. import stand_ins as stand_in_files
from .base import CompressedEmbedding, load_table

TABLES_FILE = "embeddings.safetensors"


def compressed_tables(model: nn.Module) -> dict[str, CompressedEmbedding]:
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedEmbedding)}


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def _stand_in(t: CompressedEmbedding) -> nn.Module:
    zeros = torch.zeros(t.num_embeddings, t.embedding_dim)
    if t.mode is None:
        return nn.Embedding(t.num_embeddings, t.embedding_dim, padding_idx=t.padding_idx, _weight=zeros)
    return nn.EmbeddingBag(t.num_embeddings, t.embedding_dim, mode=t.mode, padding_idx=t.padding_idx, _weight=zeros)


@contextmanager
def float_stand_ins(model: nn.Module, tables: dict[str, CompressedEmbedding]):
    """Zero float tables in place of the compressed ones, restored afterwards whatever happens."""
    try:
        for name, t in tables.items():
            _swap(model, name, _stand_in(t))
        yield
    finally:
        for name, t in tables.items():
            _swap(model, name, t)


def _params(tables: dict[str, CompressedEmbedding]) -> dict[str, dict[str, tuple[int, ...]]]:
    return {n: {"weight": (t.num_embeddings, t.embedding_dim)} for n, t in tables.items()}


@register_artifact
class EmbeddingsCompressedArtifact(Artifact):
    """The model with compressed embedding tables, in the workload's folder plus the tables' tensors."""

    format = "embeddings-compressed"
    in_torch = True
    runtime = "torch"

    def save(self, folder: Path, workload, bundle) -> None:
        folder = Path(folder)
        tables = compressed_tables(bundle.module)
        if not tables:
            raise SlimcartError("embeddings-compressed: the model has no compressed embedding table")
        with float_stand_ins(bundle.module, tables):
            workload.save_model(bundle, folder / "model")
        stand_ins = stand_in_files.strip(folder / "model", _params(tables), "a compressed table")
        tensors, described = {}, {}
        for name, t in tables.items():
            ts, meta = t.state_for_save()
            tensors.update({f"{name}/{k}": v.detach().contiguous() for k, v in ts.items()})
            described[name] = meta
        save_file(tensors, str(folder / TABLES_FILE))
        write_format(folder, self.format, tables=described, stand_ins=stand_ins, model_dir="model")

    @classmethod
    def load(cls, folder: Path, meta: dict, workload, threads: int):
        folder = Path(folder)
        tables, stand_ins = meta.get("tables"), meta.get("stand_ins")
        if not isinstance(tables, dict) or not tables or not isinstance(stand_ins, list):
            raise SlimcartError(f"{folder}: embeddings-compressed format file lacks its tables or stand-ins")
        model_dir = inside(folder, meta.get("model_dir", "model"), "model folder")
        if not model_dir.is_dir():
            raise SlimcartError(f"{folder}: no model folder '{model_dir.name}'")
        saved = load_file(str(inside(folder, TABLES_FILE, "tables file")))
        built = {}
        for name, desc in tables.items():
            prefix = f"{name}/"
            built[name] = load_table({k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}, desc)
        with tempfile.TemporaryDirectory(prefix="slimcart-emb-load-") as tmp:
            work = Path(tmp) / "model"
            copy_files(model_dir, work)  # regular files only: links in a model folder are never followed
            stand_in_files.restore(work, stand_ins, _params(built), folder, "a compressed table")
            bundle = workload.load_model(str(work))
        for name, t in built.items():
            _swap(bundle.module, name, t)
        bundle = replace(bundle, source=folder, name=str(folder))
        return workload.torch_runner(bundle), bundle

    def describe(self) -> str:
        return "workload folder + compressed embedding tables"
