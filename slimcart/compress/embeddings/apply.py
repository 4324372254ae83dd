"""The verb: `compress_embeddings_(model, config, frequencies)` swaps matching nn.Embedding /
nn.EmbeddingBag modules for compressed tables in place and reports bytes before and after per table.

Everything is checked, and every new table built, before the first swap: a bad pattern, a missing
frequency vector or an impossible factorisation leaves the model untouched.
"""
from __future__ import annotations

import fnmatch

from torch import nn

from ...errors import SlimcartError
from .config import EmbeddingCompressConfig, chosen_patterns, parse_embedding_config
from .hashed import HashedEmbedding
from .mixed_dim import MixedDimEmbedding
from .mixed_precision import MixedPrecisionEmbedding
from .pq import ProductQuantizedEmbedding
from .pruned import PrunedRowsEmbedding
from .qr import QREmbedding
from .rowwise import RowwiseQuantEmbedding
from .tt import TTEmbedding

BUILDERS = {"rowwise": RowwiseQuantEmbedding, "mixed_precision": MixedPrecisionEmbedding, "qr": QREmbedding,
            "hash": HashedEmbedding, "mixed_dim": MixedDimEmbedding, "tt": TTEmbedding,
            "prune_rows": PrunedRowsEmbedding, "pq": ProductQuantizedEmbedding}
NEEDS_FREQUENCIES = ("mixed_precision", "mixed_dim", "prune_rows")


def plan_tables(model: nn.Module, config: EmbeddingCompressConfig) -> list[tuple[str, nn.Module, object]]:
    """(module name, table, technique config) for every table the config chooses."""
    plan, patterns = [], chosen_patterns(config)
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) or mod.num_embeddings < config.min_rows:
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in config.exclude):
            continue
        tech = next((t for p, t in config.per_table.items() if fnmatch.fnmatchcase(name, p)), None)
        if tech is None and any(fnmatch.fnmatchcase(name, p) for p in patterns):
            tech = config.technique
        if tech is not None:
            plan.append((name, mod, tech))
    return plan


def _check_not_tied(model: nn.Module, name: str, table: nn.Module) -> None:
    """A weight shared with another layer (a tied output head) would keep the float table alive."""
    for pname, p in model.named_parameters(remove_duplicate=False):
        owner = model.get_submodule(pname.rsplit(".", 1)[0]) if "." in pname else model
        if p is table.weight and owner is not table:  # the same module under a second name is fine
            raise SlimcartError(f"{name}.weight is tied to {pname}: untie it or exclude the table")


def _parents(model: nn.Module, table: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every (parent, attribute) holding this module (a module may be registered under two names)."""
    out, seen = [], set()
    for _, parent in model.named_modules(remove_duplicate=False):
        if id(parent) in seen:
            continue
        seen.add(id(parent))
        for attr, child in parent._modules.items():  # named_children() would hide the second name
            if child is table:
                out.append((parent, attr))
    return out


def compress_embeddings_(model: nn.Module, config, frequencies: dict | None = None) -> dict:
    """Replace the chosen tables in place; returns {"tables": {name: {...}}, "bytes_before", "bytes_after"}.

    `frequencies` maps a table's module name to its training-set counts per row (length N); the
    frequency-aware techniques need them, the others use them (when given) to weight their fit."""
    cfg = parse_embedding_config(config)
    frequencies = dict(frequencies or {})
    plan = plan_tables(model, cfg)
    if not plan:
        raise SlimcartError(f"no nn.Embedding / nn.EmbeddingBag module matches tables={chosen_patterns(cfg)} "
                            f"per_table={list(cfg.per_table)}" + (f" with at least {cfg.min_rows} rows" if cfg.min_rows else ""))
    names = {n for n, _, _ in plan}
    unknown = sorted(set(frequencies) - names)
    if unknown:
        raise SlimcartError(f"frequencies given for {unknown}, which are not tables chosen for compression")
    for name, table, tech in plan:
        _check_not_tied(model, name, table)
        if tech.method in NEEDS_FREQUENCIES and name not in frequencies:
            raise SlimcartError(f"{name}: '{tech.method}' ranks rows by training-set frequency: pass frequencies['{name}']")
    built = {}
    for name, table, tech in plan:
        try:
            built[name] = BUILDERS[tech.method].from_embedding(table, tech, frequencies.get(name))
        except SlimcartError as e:
            raise SlimcartError(f"{name}: {e}") from None
    report, before, after = {}, 0, 0
    for name, table, tech in plan:
        new = built[name]
        for parent, attr in _parents(model, table):
            setattr(parent, attr, new)
        b = table.weight.numel() * table.weight.element_size()
        a = new.nbytes()
        before, after = before + b, after + a
        report[name] = {"method": tech.method, "rows": new.num_embeddings, "dim": new.embedding_dim,
                        "bytes_before": b, "bytes_after": a, "saved_bytes": new.saved_nbytes(),
                        "fraction": a / b, "config": tech.model_dump()}
    return {"tables": report, "bytes_before": before, "bytes_after": after}
