"""Row pruning: ids never (or rarely) seen in training share one fallback row.

Kept rows K = { i : count_i >= min_count } (or the `keep_fraction` most frequent), stored as a sorted
id vector (4 bytes per kept row) and their rows at `bits` bits (packed_rows.py; 32 = float32, trainable);
every other id looks up the fallback f:
    E'[i] = rows[pos(i)]  if i in K  else  f,
    f = the count-weighted mean of the pruned rows ("mean"; their plain mean if none was seen), or 0.
Rows seen too rarely in training carry little signal of their own, so the quality cost is small where
the id distribution is long-tailed; at serving time unseen ids (cold start) get f rather than noise.
Bytes = |K| (row_bytes(bits) + 4) + 4 d. Scoring: every column starts at h f, kept columns overwritten
by the kept rows' scores.
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
    tensor,
)
from .packed_rows import PackedRows
from .rowwise import bag_mode, source_weight


@register_table
class PrunedRowsEmbedding(CompressedEmbedding):
    kind = "prune_rows"

    def __init__(self, num_embeddings: int, kept: RowOverrides, rows: PackedRows, fallback: torch.Tensor,
                 padding_idx=None, mode=None):
        super().__init__(num_embeddings, rows.dim, padding_idx, mode)
        if len(kept) != len(rows) or fallback.shape != (rows.dim,):
            raise SlimcartError("pruned table: one row per kept id and a fallback of the table's width")
        if len(kept) and int(kept.ids[-1]) >= num_embeddings:
            raise SlimcartError("pruned table keeps an id beyond the table")
        self.kept, self.rows = kept, rows
        self.fallback = nn.Parameter(fallback.float().clone())

    @classmethod
    def from_embedding(cls, emb: nn.Module, config, frequencies=None) -> PrunedRowsEmbedding:
        w = source_weight(emb).float()
        n, d = w.shape
        freq = check_frequencies(frequencies, n)
        if config.keep_fraction is not None:
            k = round(config.keep_fraction * n)
            keep = torch.zeros(n, dtype=torch.bool)
            keep[torch.sort(freq, descending=True, stable=True).indices[:k]] = True
            keep &= freq > 0
        else:
            keep = freq >= config.min_count
        if emb.padding_idx is not None:
            keep[emb.padding_idx] = False  # looks up zero anyway
        ids = keep.nonzero().squeeze(1)
        dropped = ~keep
        if emb.padding_idx is not None:
            dropped[emb.padding_idx] = False
        fallback = torch.zeros(d)
        if config.fallback == "mean" and bool(dropped.any()):
            wt = torch.where(dropped, freq, 0.0).float()  # a weight per row of the whole table: no copy of the rows
            if float(wt.sum()) == 0:
                wt = dropped.float()
            fallback = (wt @ w) / wt.sum()
        rows = PackedRows.pack(w[ids], config.bits, trainable=config.bits == 32, copy=False)
        return cls(n, RowOverrides(ids), rows, fallback, emb.padding_idx, bag_mode(emb))

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        where, pos = self.kept.find(ids)
        out = self.fallback.expand(ids.shape[0], -1)
        if pos.numel():
            out = out.index_put((where,), self.rows.lookup(pos))
        return out.contiguous()

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        out = (h @ self.fallback)[:, None].expand(-1, self.num_embeddings).clone()
        if len(self.kept):
            out[:, self.kept.ids.long()] = self.rows.scores_tiled(h)
        return self._zero_padding_column(out)

    def state_for_save(self):
        t = {"kept": self.kept.ids, "fallback": self.fallback.detach(), **self.rows.state("rows.")}
        return t, self._meta(bits=self.rows.bits)

    @classmethod
    def from_saved(cls, tensors, meta):
        n, d, pad, mode = table_shape(meta)
        bits = int(meta.get("bits", 0))
        rows = PackedRows.from_state(tensors, "rows.", bits, d, trainable=bits == 32)
        return cls(n, RowOverrides(tensor(tensors, "kept").clone()), rows,
                   tensor(tensors, "fallback", torch.float32, (d,)), pad, mode)
