"""Structured pruning that physically removes heads, KV groups, FFN neurons, layers, hidden dims.

Dependency groups: a head is its Q/K/V rows plus its O columns; in a GQA decoder a key-value group
is its K/V rows plus the rows of every query head that reads it (and their O columns), or, with
gqa="queries", the same number of query heads is removed from every group; an FFN neuron is its
up/gate rows plus its down column; a SASRec hidden dimension is that column of both embeddings,
every LayerNorm entry and every projection row/column that reads or writes the residual stream.
Removing a group is exactly the same function as zeroing its output projection slice (tested),
except hidden dims, whose LayerNorms then normalise over fewer entries.

Afterwards the config follows the weights: uniform shapes become ordinary config fields (a stock
Hugging Face folder); per-layer shapes that the HF config cannot express (BERT with fewer heads,
since transformers 5 derives head size from hidden_size / num_attention_heads) are recorded in
`config.slimcart_structure` and reloaded by storage.load_structured.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ...arch import Arch, detect
from ...errors import SlimcartError
from .config import StructuredConfig
from .importance import CRITERIA, Activation, block_influence

Slice = tuple[nn.Module, str, int, torch.Tensor]


def _rows(lin: nn.Linear, idx: torch.Tensor) -> list[Slice]:
    return [(lin, "weight", 0, idx)] + ([(lin, "bias", 0, idx)] if lin.bias is not None else [])


def _span(i: int, width: int) -> torch.Tensor:
    return torch.arange(i * width, (i + 1) * width)


def head_units(arch: Arch, layer: nn.Module, gqa: str) -> tuple[list[list[Slice]], list[torch.Tensor]]:
    """Units of one attention block and, per unit, the O-projection input columns it feeds."""
    a = arch.attn(layer)
    hd, nq, nkv = a.head_dim, a.n_heads, a.n_kv
    if nq == nkv or gqa == "queries":  # one unit per query head (K/V kept when GQA groups stay)
        shared_kv = nq != nkv
        units, cols = [], []
        for h in range(nq):
            r = _span(h, hd)
            kv = [] if shared_kv else _rows(a.k, r) + _rows(a.v, r)
            units.append(_rows(a.q, r) + kv + [(a.o, "weight", 1, r)])
            cols.append(r)
        return units, cols
    per = nq // nkv
    units, cols = [], []
    for g in range(nkv):
        rq = torch.cat([_span(h, hd) for h in range(g * per, (g + 1) * per)])
        units.append(_rows(a.q, rq) + _rows(a.k, _span(g, hd)) + _rows(a.v, _span(g, hd)) + [(a.o, "weight", 1, rq)])
        cols.append(rq)
    return units, cols


def ffn_units(arch: Arch, layer: nn.Module) -> list[list[Slice]]:
    f = arch.ffn(layer)
    return [sum((_rows(u, torch.tensor([j])) for u in f.ups), []) + [(f.down, "weight", 1, torch.tensor([j]))]
            for j in range(f.width)]


def hidden_units(arch: Arch) -> tuple[list[list[Slice]], list[nn.Module]]:
    """SASRec residual-stream dimensions, and the LayerNorms whose inputs are that stream."""
    m = arch.base
    units, norms = [], [n for b in m.blocks for n in (b.ln1, b.ln2)] + [m.ln]
    for d in range(m.item_emb.embedding_dim):
        i = torch.tensor([d])
        s: list[Slice] = [(m.item_emb, "weight", 1, i), (m.pos_emb, "weight", 1, i)]
        s += [(n, p, 0, i) for n in norms for p in ("weight", "bias")]
        for b in m.blocks:
            s += [(b.attn.q, "weight", 1, i), (b.attn.k, "weight", 1, i), (b.attn.v, "weight", 1, i), (b.fc1, "weight", 1, i)]
            s += _rows(b.attn.o, i) + _rows(b.fc2, i)
        units.append(s)
    return units, norms


@torch.no_grad()
def remove_units(units: list[list[Slice]], keep: list[int]) -> None:
    """Keep only units `keep` (original order preserved) in every parameter they span."""
    picked: dict[tuple[int, str, int], tuple[nn.Module, str, int, list[torch.Tensor]]] = {}
    for u in sorted(keep):
        for m, p, d, idx in units[u]:
            picked.setdefault((id(m), p, d), (m, p, d, []))[3].append(idx)
    for m, p, d, idxs in picked.values():
        old = getattr(m, p)
        setattr(m, p, nn.Parameter(old.detach().index_select(d, torch.cat(idxs)).clone(), requires_grad=old.requires_grad))
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.Embedding):
            m.embedding_dim = m.weight.shape[1]
        elif isinstance(m, nn.LayerNorm):
            m.normalized_shape = (m.weight.shape[0],)


def _fix_attention(arch: Arch, layer: nn.Module) -> None:
    a = arch.attn(layer)
    if arch.kind == "bert":
        a.owner.num_attention_heads, a.owner.all_head_size = a.n_heads, a.q.out_features
    elif arch.kind == "llama":
        a.owner.num_key_value_groups = a.n_heads // a.n_kv


def drop_layers(arch: Arch, drop: list[int]) -> None:
    """Remove whole blocks and renumber what indexes them (KV-cache slots, config)."""
    kept = [blk for i, blk in enumerate(arch.layers) if i not in set(drop)]
    layers = arch.layers
    while len(layers):
        del layers[0]
    layers.extend(kept)
    for i, blk in enumerate(layers):
        for m in blk.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = i
    types = getattr(arch.config, "layer_types", None)
    if types:
        arch.config.layer_types = [t for i, t in enumerate(types) if i not in set(drop)]


def _keep_count(n: int, frac: float, round_to: int) -> int:
    k = n - int(round(frac * n))
    return min(n, max(round_to, int(round(k / round_to)) * round_to)) if round_to > 1 else k


def _choose(scores: dict[int, torch.Tensor], frac: float, allocation: str, round_to: int) -> dict[int, list[int]]:
    """Per layer, the unit indices to keep: the same count everywhere, or ranked across layers."""
    if allocation == "uniform":
        return {li: sorted(torch.argsort(s, descending=True, stable=True)[: _keep_count(len(s), frac, round_to)].tolist())
                for li, s in scores.items()}
    norm = {li: s / s.sum().clamp_min(1e-30) for li, s in scores.items()}  # layers on one scale
    flat = torch.cat([norm[li] for li in norm])
    n_drop = int(round(frac * len(flat)))
    thresh_rank = torch.argsort(flat, stable=True)[:n_drop]
    dropped = torch.zeros(len(flat), dtype=torch.bool)
    dropped[thresh_rank] = True
    out, start = {}, 0
    for li, s in norm.items():
        k = int((~dropped[start : start + len(s)]).sum())
        k = min(len(s), int(round(k / round_to)) * round_to) if round_to > 1 else k
        out[li] = sorted(torch.argsort(s, descending=True, stable=True)[:k].tolist())
        start += len(s)
    return out


def plan_layers(cfg: StructuredConfig, n_layers: int) -> list[int] | int:
    """Validated layer request: explicit indices, or a count to choose by block influence."""
    if isinstance(cfg.layers, int):
        if cfg.layers >= n_layers:
            raise SlimcartError(f"cannot drop {cfg.layers} of {n_layers} layers (at least one must stay)")
        return cfg.layers
    bad = [i for i in cfg.layers if not -n_layers <= i < n_layers]
    if bad:
        raise SlimcartError(f"layer indices {bad} out of range for a model with {n_layers} layers")
    drop = sorted({i % n_layers for i in cfg.layers})
    if len(drop) >= n_layers:
        raise SlimcartError("dropping every layer would leave no model")
    return drop


def validate(arch: Arch, cfg: StructuredConfig) -> None:
    """Everything that can be checked from shapes, before any weight changes."""
    if cfg.hidden and arch.kind != "sasrec":
        raise SlimcartError("hidden-dimension pruning is implemented for SASRec only")
    if cfg.heads and arch.kind == "sasrec":
        raise SlimcartError("SASRec head pruning is not supported (prune ffn / hidden instead)")
    if cfg.heads and cfg.allocation == "global":
        raise SlimcartError("heads are pruned uniformly (an HF config holds one head count per model); "
                            "use allocation: uniform")
    for li, layer in enumerate(arch.layers):
        a = arch.attn(layer)
        n = a.n_heads if (arch.kind != "llama" or cfg.gqa == "queries" or a.n_heads == a.n_kv) else a.n_kv
        if cfg.heads and n - int(round(cfg.heads * n)) < 1:
            raise SlimcartError(f"pruning {cfg.heads:.0%} of heads would remove every head of layer {li} ({n} heads)")
        if cfg.heads and arch.kind == "llama" and cfg.gqa == "queries" and a.n_heads != a.n_kv:
            per = a.n_heads // a.n_kv
            if (int(round(cfg.heads * a.n_heads))) % a.n_kv or per - int(round(cfg.heads * per)) < 1:
                raise SlimcartError(f"gqa 'queries' must remove the same number of query heads from each of the "
                                    f"{a.n_kv} KV groups of layer {li}, leaving at least one per group")
    plan_layers(cfg, len(arch.layers))


def prune_structured(module: nn.Module, cfg: StructuredConfig, batches: list[dict] | None = None,
                     loss_fn: Callable | None = None, progress=lambda m: None) -> dict:
    """Physically prune `module` in place; returns a report of parameter counts and new shapes."""
    arch = detect(module)
    validate(arch, cfg)
    before = sum(p.numel() for p in arch.layers.parameters())
    drop = plan_layers(cfg, len(arch.layers))
    if isinstance(drop, int) and drop:
        bi = block_influence(module, arch.layers, batches or [])
        drop = sorted(torch.argsort(bi, stable=True)[:drop].tolist())
        progress(f"block influence {[round(float(x), 4) for x in bi]} -> dropping layers {drop}")
    if drop:
        drop_layers(arch, drop)
    crit_cls = CRITERIA[cfg.criterion]
    if crit_cls.needs_data and not batches:
        raise SlimcartError(f"criterion '{cfg.criterion}' needs calibration batches")
    kept: dict[str, dict[int, list[int]]] = {}
    for kind, frac in (("heads", cfg.heads), ("ffn", cfg.ffn), ("hidden", cfg.hidden)):
        if not frac:
            continue
        units, consumers, residual = {}, {}, {}
        for li, layer in enumerate(arch.layers):
            if kind == "heads":
                units[li], cols = head_units(arch, layer, cfg.gqa)
                consumers[li] = (arch.attn(layer).o, cols)
            elif kind == "ffn":
                units[li] = ffn_units(arch, layer)
                consumers[li] = (arch.ffn(layer).down, [torch.tensor([j]) for j in range(len(units[li]))])
        if kind == "hidden":
            units[0], residual[0] = hidden_units(arch)
        crit = Activation(consumers, residual) if cfg.criterion == "activation" else crit_cls()
        scores = crit.scores(module, units, batches, loss_fn)
        round_to = 1 if kind == "heads" else cfg.round_to
        if kind == "heads" and arch.kind == "llama" and cfg.gqa == "queries":
            keep = _keep_per_group(arch, scores, cfg.heads)
        elif kind == "heads":
            k = head_keep_count(arch, cfg.heads)
            keep = {li: sorted(torch.argsort(sc, descending=True, stable=True)[:k].tolist()) for li, sc in scores.items()}
        else:
            keep = _choose(scores, frac, cfg.allocation, round_to)
        for li, k in keep.items():
            if not k:
                raise SlimcartError(f"{kind} pruning would remove every unit of layer {li}; lower the fraction "
                                    "or use allocation: uniform")
        old_hidden = arch.base.item_emb.embedding_dim if kind == "hidden" else None
        for li, k in keep.items():
            remove_units(units[li], k)
            if kind == "heads":
                _fix_attention(arch, arch.layers[li])
        if kind == "hidden":
            _rescale_sasrec(arch, old_hidden)
        kept[kind] = keep
        progress(f"{kind}: kept {[len(k) for k in keep.values()]} units per layer")
    sync_config(arch)
    after = sum(p.numel() for p in arch.layers.parameters())
    return {"block_params_before": before, "block_params_after": after, "block_params_removed": 1 - after / before,
            "dropped_layers": drop if isinstance(drop, list) else [], "shapes": shapes(arch), "kept": kept}


def head_keep_count(arch: Arch, frac: float) -> int:
    """Heads (or KV groups) kept per layer. For BERT the count is moved to the nearest divisor of
    hidden_size: ONNX Runtime's attention fusion asserts hidden_size % num_heads == 0, and the config
    must state the real head count (a stale count makes that fusion build a wrong graph silently)."""
    a = arch.attn(arch.layers[0])
    n = a.n_heads if (arch.kind != "llama" or a.n_heads == a.n_kv) else a.n_kv
    k = n - int(round(frac * n))
    if arch.kind == "bert":
        hidden = arch.config.hidden_size
        k = min((d for d in range(1, n + 1) if hidden % d == 0), key=lambda d: (abs(d - k), -d))
    return k


def _keep_per_group(arch: Arch, scores: dict[int, torch.Tensor], frac: float) -> dict[int, list[int]]:
    """gqa='queries': the best heads inside each KV group, the same number in every group."""
    out = {}
    for li, s in scores.items():
        a = arch.attn(arch.layers[li])
        per = a.n_heads // a.n_kv
        k = per - int(round(frac * per))
        out[li] = sorted(g * per + int(j) for g in range(a.n_kv)
                         for j in torch.argsort(s[g * per:(g + 1) * per], descending=True, stable=True)[:k])
    return out


@torch.no_grad()
def _rescale_sasrec(arch: Arch, old_hidden: int) -> None:
    """Older SASRec code scales item embeddings by sqrt(current hidden): keep the kept dims' values and
    the scores unchanged. A model that carries its own fixed `emb_scale` needs nothing."""
    m, new = arch.base, arch.base.item_emb.embedding_dim
    if getattr(m, "emb_scale", None) is not None:
        return
    c = math.sqrt(old_hidden / new)
    m.item_emb.weight.mul_(c)  # input: E' * sqrt(new) == E * sqrt(old)
    m.ln.weight.div_(c)  # output: (h / c) @ (c E)^T == h @ E^T
    m.ln.bias.div_(c)


def shapes(arch: Arch) -> dict:
    out = {"layers": len(arch.layers), "ffn": [arch.ffn(layer).width for layer in arch.layers]}
    if arch.kind != "sasrec":
        out["heads"] = [arch.attn(layer).n_heads for layer in arch.layers]
        out["kv_heads"] = [arch.attn(layer).n_kv for layer in arch.layers]
    else:
        out["hidden"] = arch.base.item_emb.embedding_dim
    return out


def sync_config(arch: Arch) -> None:
    """Make the config describe the pruned weights (stock fields where they can, else slimcart_structure)."""
    c, s = arch.config, shapes(arch)
    if arch.kind == "sasrec":
        c.layers, c.ffn, c.hidden = s["layers"], s["ffn"], s["hidden"]
        return
    c.num_hidden_layers = s["layers"]
    uniform_ffn = len(set(s["ffn"])) == 1
    c.intermediate_size = max(s["ffn"])
    structure = {"heads": s["heads"], "intermediate": s["ffn"]}
    heads_stock = True
    if arch.kind == "llama":
        hd = arch.attn(arch.layers[0]).head_dim
        c.head_dim, c.num_attention_heads, c.num_key_value_heads = hd, s["heads"][0], s["kv_heads"][0]
    else:  # BERT derives head size from hidden_size / num_attention_heads: remember the dense count
        dense = getattr(c, "slimcart_structure", {}).get("dense_heads", c.num_attention_heads)
        heads_stock = all(h == dense for h in s["heads"])
        c.num_attention_heads = s["heads"][0]  # the real count (uniform), for exporters and readers
        structure["dense_heads"] = dense
    if uniform_ffn and heads_stock:
        if hasattr(c, "slimcart_structure"):
            del c.slimcart_structure
    else:
        c.slimcart_structure = structure


def apply_structure(module: nn.Module, structure: dict) -> None:
    """Cut a zero-padded reload back to the recorded shapes (real units were stored first)."""
    arch = detect(module)
    for li, layer in enumerate(arch.layers):
        heads, width = structure["heads"][li], structure["intermediate"][li]
        units, _ = head_units(arch, layer, "groups")
        if arch.kind == "bert" and heads < len(units):
            remove_units(units, list(range(heads)))
            _fix_attention(arch, layer)
        f_units = ffn_units(arch, layer)
        if width < len(f_units):
            remove_units(f_units, list(range(width)))
    arch.config.slimcart_structure = structure
    if arch.kind == "bert":
        arch.config.num_attention_heads = structure["heads"][0]
