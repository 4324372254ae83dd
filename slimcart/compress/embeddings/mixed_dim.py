"""Mixed-dimension embeddings by frequency (Ginart et al. 2021, "Mixed Dimension Embeddings with
Application to Memory-Efficient Recommendation Systems": same accuracy with 16x fewer parameters).

Rows ranked by training-set frequency fall into blocks, hottest first; block j holds a fraction f_j of
the rows at width d_j <= d and a projection P_j in R^{d_j x d} back to the model's width:
    E[i] = A_j[pos_j(i)] P_j      (P_j = identity, not stored, when d_j = d).
The last (coldest) block is the base: A_base has a d_base-wide row for every id, indexed by the raw
id, and hotter blocks override their ids through a sorted id vector (4 bytes per held row), so no
N-long remap is stored. Bytes = 4 * (N d_base + sum_j K_j (d_j + 1) + sum_j d_j d [projected blocks]).

Starting point from a trained table: the best rank-d_j approximation of each block's rows,
P_j = top-d_j right singular vectors of the block (eigenvectors of its d x d Gram matrix in float64;
the coldest block's Gram is the whole table's minus the hot blocks', so the tail is never copied),
A_j = rows P_j^T; exact when the block's rows have
rank <= d_j. Both A_j and P_j are parameters for a short retraining.
Scoring: h E^T = (h P_j^T) A_j^T per block: [B, d_j] x [d_j, K_j] products, never the [N, d] table.
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
from .rowwise import bag_mode, source_weight

GRAM_CHUNK_ROWS = 1 << 18


def gram(w: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i w_i^T w_i over the rows `ids` (all rows if None) in float64, a chunk of rows at a time."""
    n = w.shape[0] if ids is None else ids.numel()
    g = torch.zeros(w.shape[1], w.shape[1], dtype=torch.float64)
    for s in range(0, n, GRAM_CHUNK_ROWS):
        c = (w[s: s + GRAM_CHUNK_ROWS] if ids is None else w[ids[s: s + GRAM_CHUNK_ROWS]]).double()
        g += c.t() @ c
    return g


def principal_directions(g: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k eigenvectors of a Gram matrix (= top-k right singular vectors of its rows) as P [k, d]."""
    _, vecs = torch.linalg.eigh(g)  # ascending eigenvalues
    return vecs[:, -k:].flip(1).t().float().contiguous()


@register_table
class MixedDimEmbedding(CompressedEmbedding):
    kind = "mixed_dim"

    def __init__(self, num_embeddings: int, embedding_dim: int, dims: list[int], sizes: list[int],
                 padding_idx=None, mode=None):
        """`dims` per block (hottest first, the last is the base); `sizes` the rows of each hot block."""
        super().__init__(num_embeddings, embedding_dim, padding_idx, mode)
        if not dims or len(sizes) != len(dims) - 1 or any(not 1 <= x <= embedding_dim for x in dims):
            raise SlimcartError(f"mixed-dim blocks need widths between 1 and {embedding_dim} and one size per hot block")
        self.dims, self.sizes = [int(x) for x in dims], [int(x) for x in sizes]
        self.held = nn.ModuleList(RowOverrides(torch.zeros(0, dtype=torch.long)) for _ in sizes)
        self.A = nn.ParameterList([nn.Parameter(torch.zeros(k, dj)) for k, dj in zip(sizes, dims)]
                                  + [nn.Parameter(torch.zeros(num_embeddings, dims[-1]))])
        self.P = nn.ParameterList([nn.Parameter(torch.zeros(dj, embedding_dim)) for dj in dims if dj < embedding_dim])

    def _projection(self, j: int) -> torch.Tensor | None:
        if self.dims[j] == self.embedding_dim:
            return None
        return self.P[sum(1 for x in self.dims[:j] if x < self.embedding_dim)]

    def _set_ids(self, j: int, ids: torch.Tensor) -> None:
        if ids.numel() != self.sizes[j]:
            raise SlimcartError(f"mixed-dim block {j} expects {self.sizes[j]} ids, got {ids.numel()}")
        self.held[j] = RowOverrides(ids)

    @classmethod
    def from_embedding(cls, emb: nn.Module, config, frequencies=None) -> MixedDimEmbedding:
        w = source_weight(emb).float()
        n, d = w.shape
        freq = check_frequencies(frequencies, n)
        order = torch.sort(freq, descending=True, stable=True).indices
        dims = [b.dim if b.dim is not None else d for b in config.blocks]
        if any(x > d for x in dims):
            raise SlimcartError(f"mixed-dim block width {max(dims)} exceeds the table's width {d}")
        sizes, start, groups = [], 0, []
        for b in config.blocks[:-1]:
            k = min(n - start, round(b.fraction * n))
            groups.append(torch.sort(order[start: start + k]).values)
            sizes.append(k)
            start += k
        groups.append(order[start:])
        new = cls(n, d, dims, sizes, emb.padding_idx, bag_mode(emb))
        with torch.no_grad():
            tail_gram = gram(w)  # the coldest block's Gram = all rows' minus the hot blocks': no copy of the tail
            for j, ids in enumerate(groups[:-1]):
                g = gram(w, ids)
                tail_gram -= g
                P = new._projection(j)
                new._set_ids(j, ids)
                if P is not None:
                    P.copy_(principal_directions(g, dims[j]))
                new.A[j].copy_(w[ids] if P is None else w[ids] @ P.t())
            j = len(groups) - 1
            P = new._projection(j)
            if P is None:
                new.A[j].copy_(w)
            else:  # the base has a row for every id; only the tail's rows shaped P
                P.copy_(principal_directions(tail_gram, dims[j]))
                for s in range(0, n, GRAM_CHUNK_ROWS):
                    new.A[j][s: s + GRAM_CHUNK_ROWS] = w[s: s + GRAM_CHUNK_ROWS] @ P.t()
        return new

    def _rows(self, j: int, idx: torch.Tensor) -> torch.Tensor:
        a = self.A[j][idx]
        P = self._projection(j)
        return a if P is None else a @ P

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        base = len(self.dims) - 1
        out = self._rows(base, ids)
        for j, held in enumerate(self.held):
            where, pos = held.find(ids)
            if pos.numel():
                out = out.index_put((where,), self._rows(j, pos))  # out of place: autograd-safe
        return out

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        def block(j):
            P = self._projection(j)
            return (h if P is None else h @ P.t()) @ self.A[j].t()

        out = block(len(self.dims) - 1)
        for j, held in enumerate(self.held):
            if len(held):
                out[:, held.ids.long()] = block(j)
        return self._zero_padding_column(out)

    def state_for_save(self):
        t = {f"A{j}": a.detach() for j, a in enumerate(self.A)}
        t.update({f"P{j}": p.detach() for j, p in enumerate(self.P)})
        t.update({f"ids{j}": h.ids for j, h in enumerate(self.held)})
        return t, self._meta(dims=self.dims, sizes=self.sizes)

    @classmethod
    def from_saved(cls, tensors, meta):
        n, d, pad, mode = table_shape(meta)
        new = cls(n, d, list(meta.get("dims", [])), list(meta.get("sizes", [])), pad, mode)
        with torch.no_grad():
            for j, a in enumerate(new.A):
                a.copy_(tensor(tensors, f"A{j}", torch.float32, tuple(a.shape)))
            for j, p in enumerate(new.P):
                p.copy_(tensor(tensors, f"P{j}", torch.float32, tuple(p.shape)))
        for j in range(len(new.held)):
            new._set_ids(j, tensor(tensors, f"ids{j}").clone())
        return new
