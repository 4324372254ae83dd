"""Frequency-aware mixed precision: the hottest rows at more bits, the long tail at 4 or 2.

Rows are ranked by training-set frequency. Tier t (hottest first) holds the next fraction f_t of all
N rows at b_t bits (32 = a float32 cache of hot rows, as in Yang et al. 2020, "Mixed-Precision
Embedding Using a Cache": int4 plus a 1% float32 cache compresses > 7x without quality loss). Every
row also has a `tail_bits` row in a base table indexed by the raw id, so no id -> tier remap of the
whole table is stored; a tier is a sorted id vector (4 bytes per held row) plus its rows, found by
binary search. Lookup:
    E[i] = tier_t.rows[pos_t(i)]   if i is held by tier t,   else   base[i].
Bytes = N * row_bytes(tail) + sum_t K_t * (row_bytes(b_t) + 4); the base rows shadowed by tiers
(a fraction sum_t f_t of the base) are the price of not storing a remap.
Scoring: base scores for every row (tiled or int-matmul kernel), then each tier's columns overwritten.
"""
from __future__ import annotations

import torch
from torch import nn

from ...errors import SlimcartError
from .base import (
    CompressedEmbedding,
    RowOverrides,
    check_frequencies,
    register_table,
    table_shape,
)
from .int_matmul import IntMatmulScores
from .packed_rows import PackedRows
from .rowwise import SCORE_KERNELS, bag_mode, source_weight


@register_table
class MixedPrecisionEmbedding(CompressedEmbedding):
    """A `tail_bits` base table plus hot-row tiers at higher precision."""

    kind = "mixed_precision"

    def __init__(self, base: PackedRows, tiers: list[tuple[RowOverrides, PackedRows]], padding_idx=None,
                 mode=None, score_kernel: str = "tiled"):
        super().__init__(len(base), base.dim, padding_idx, mode)
        if score_kernel not in SCORE_KERNELS:
            raise SlimcartError(f"score_kernel must be one of {SCORE_KERNELS}, got {score_kernel!r}")
        self.base, self.score_kernel = base, score_kernel
        self.tier_ids = nn.ModuleList(t[0] for t in tiers)
        self.tier_rows = nn.ModuleList(t[1] for t in tiers)
        for ids, rows in tiers:
            if len(ids) != len(rows) or rows.dim != base.dim:
                raise SlimcartError("a mixed-precision tier needs one row of the table's width per id")
            if len(ids) and int(ids.ids[-1]) >= len(base):
                raise SlimcartError("a mixed-precision tier holds an id beyond the table")
        self.score_copy = IntMatmulScores(base) if score_kernel == "int_mm" and base.bits <= 8 else None

    @classmethod
    def from_embedding(cls, emb: nn.Module, config, frequencies=None) -> MixedPrecisionEmbedding:
        w = source_weight(emb)
        n = w.shape[0]
        freq = check_frequencies(frequencies, n)
        order = torch.sort(freq, descending=True, stable=True).indices
        base = PackedRows.pack(w, config.tail_bits, config.optimized_range)
        tiers, start = [], 0
        for tier in config.tiers:
            k = min(n - start, round(tier.fraction * n))
            ids = torch.sort(order[start: start + k]).values
            ids = ids[freq[ids] > 0]  # rows never seen in training gain nothing from precision
            start += k
            rows = PackedRows.pack(w[ids], tier.bits, config.optimized_range and tier.bits in (4, 2))
            tiers.append((RowOverrides(ids), rows))
        return cls(base, tiers, emb.padding_idx, bag_mode(emb), config.score_kernel)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base.lookup(ids)
        for held, rows in zip(self.tier_ids, self.tier_rows):
            where, pos = held.find(ids)
            if pos.numel():
                out.index_copy_(0, where, rows.lookup(pos))
        return out

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        out = self.score_copy(h) if self.score_copy is not None else self.base.scores_tiled(h)
        for held, rows in zip(self.tier_ids, self.tier_rows):
            if len(held):
                out[:, held.ids.long()] = rows.scores_tiled(h)
        return out

    def tier_sizes(self) -> list[dict]:
        return [{"bits": r.bits, "rows": len(r)} for r in self.tier_rows] + [{"bits": self.base.bits, "rows": len(self.base),
                                                                              "base": True}]

    def state_for_save(self):
        tensors = self.base.state("base.")
        for t, (held, rows) in enumerate(zip(self.tier_ids, self.tier_rows)):
            tensors[f"tier{t}.ids"] = held.ids
            tensors.update(rows.state(f"tier{t}."))
        meta = self._meta(tail_bits=self.base.bits, tier_bits=[r.bits for r in self.tier_rows],
                          score_kernel=self.score_kernel)
        return tensors, meta

    @classmethod
    def from_saved(cls, tensors, meta):
        n, d, pad, mode = table_shape(meta)
        base = PackedRows.from_state(tensors, "base.", int(meta.get("tail_bits", 0)), d)
        if len(base) != n:
            raise SlimcartError(f"saved mixed-precision base has {len(base)} rows for a table of {n}")
        tiers = []
        for t, bits in enumerate(meta.get("tier_bits", [])):
            ids = tensors.get(f"tier{t}.ids")
            if ids is None:
                raise SlimcartError(f"saved mixed-precision table lacks tier{t}.ids")
            tiers.append((RowOverrides(ids.clone()), PackedRows.from_state(tensors, f"tier{t}.", int(bits), d)))
        return cls(base, tiers, pad, mode, meta.get("score_kernel", "tiled"))
