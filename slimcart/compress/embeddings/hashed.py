"""The hashing trick: N ids share B < N rows, E[i] = H[h(i)] (Weinberger et al. 2009; the baseline of
Shi et al. 2020). Unlike quotient-remainder, colliding ids get identical vectors.

    universal  h(i) = ((a * i + b) mod p) mod B,  p = 2**31 - 1 (a Mersenne prime), a in [1, p), b in [0, p)
               drawn from `seed`: a Carter-Wegman family, so any two ids collide with probability
               about 1/B whatever their values (needs ids < 2**31; a * i < 2**62 fits int64).
    modulo     h(i) = i mod B (what Shi et al. call the hashing trick; hot ids that are numbered
               close together then spread over distinct rows).
Starting point from a trained table: H[b] = weighted mean of the rows hashing to b (weights: training
counts + 1), the least-squares optimum for a fixed hash; retraining then adapts the shared rows.
Bytes: B * d * 4. Scoring: s = (h H^T)[:, h(0..N-1)], one [B, d] x [d, B_rows] product and a gather.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...errors import SlimcartError
from .base import (
    CompressedEmbedding,
    check_frequencies,
    register_table,
    table_shape,
    tensor,
)
from .rowwise import bag_mode, source_weight

PRIME = 2**31 - 1
HASHES = ("universal", "modulo")


@register_table
class HashedEmbedding(CompressedEmbedding):
    kind = "hash"

    def __init__(self, num_embeddings: int, embedding_dim: int, buckets: int, hash: str = "universal",
                 a: int = 1, b: int = 0, padding_idx=None, mode=None):
        super().__init__(num_embeddings, embedding_dim, padding_idx, mode)
        if hash not in HASHES:
            raise SlimcartError(f"hash must be one of {HASHES}, got {hash!r}")
        if not 1 <= buckets <= num_embeddings:
            raise SlimcartError(f"hash buckets must be between 1 and the table's {num_embeddings} rows, got {buckets}")
        if hash == "universal" and num_embeddings > PRIME:
            raise SlimcartError(f"the universal hash takes ids below {PRIME}")
        if not (1 <= a < PRIME and 0 <= b < PRIME):
            raise SlimcartError("hash constants out of range")
        self.buckets, self.hash, self.a, self.b = int(buckets), hash, int(a), int(b)
        self.H = nn.Parameter(torch.zeros(buckets, embedding_dim))

    def bucket(self, ids: torch.Tensor) -> torch.Tensor:
        """The shared row of each id."""
        if self.hash == "modulo":
            return torch.remainder(ids, self.buckets)
        return torch.remainder(torch.remainder(ids * self.a + self.b, PRIME), self.buckets)

    @classmethod
    def from_embedding(cls, emb: nn.Module, config, frequencies=None) -> HashedEmbedding:
        w = source_weight(emb).float()
        n, d = w.shape
        buckets = config.buckets if config.buckets is not None else max(1, round(config.ratio * n))
        a, b = 1, 0
        if config.hash == "universal":
            rng = np.random.default_rng(config.seed)
            a, b = int(rng.integers(1, PRIME)), int(rng.integers(0, PRIME))
        new = cls(n, d, min(buckets, n), config.hash, a, b, emb.padding_idx, bag_mode(emb))
        with torch.no_grad():
            if config.init == "random":
                new.H.normal_(0, float(w.std()), generator=torch.Generator().manual_seed(config.seed))
                return new
            weight = torch.ones(n) if frequencies is None else (check_frequencies(frequencies, n) + 1).float()
            if emb.padding_idx is not None:
                weight[emb.padding_idx] = 0.0
            slot = new.bucket(torch.arange(n))
            total = torch.zeros(new.buckets).index_add_(0, slot, weight)
            sums = torch.zeros(new.buckets, d).index_add_(0, slot, w * weight[:, None])
            new.H.copy_(sums / total.clamp_min(1e-12)[:, None])
        return new

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.H[self.bucket(ids)]

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        slot = self.bucket(torch.arange(self.num_embeddings))
        return self._zero_padding_column((h @ self.H.t())[:, slot])

    def state_for_save(self):
        return {"H": self.H.detach()}, self._meta(buckets=self.buckets, hash=self.hash, a=self.a, b=self.b)

    @classmethod
    def from_saved(cls, tensors, meta):
        n, d, pad, mode = table_shape(meta)
        new = cls(n, d, int(meta.get("buckets", 0)), meta.get("hash", ""), int(meta.get("a", 1)),
                  int(meta.get("b", 0)), pad, mode)
        with torch.no_grad():
            new.H.copy_(tensor(tensors, "H", torch.float32, tuple(new.H.shape)))
        return new
