"""What every compressed embedding table shares: the nn.Embedding / nn.EmbeddingBag calling
conventions, scoring against all rows, byte counting, saving as tensors + a small JSON dict, and the
sorted-id index that lets a few rows override a cheaper base table.

A table E in R^{N x d} answers three questions:
    lookup   forward(ids)                     -> E[ids]                          (nn.Embedding)
    bags     forward(ids, offsets)            -> sum_or_mean_{i in bag} w_i E[i] (nn.EmbeddingBag)
    scoring  scores(h)  for h in R^{B x d}    -> h E^T in R^{B x N}              (e.g. SASRec's output layer)
Each technique implements `lookup` (rows for a flat id vector) and `scores`; bags default to
`F.embedding_bag` over the looked-up rows (a kernel, not a Python loop). Only the looked-up rows are
ever produced in float32, never the whole table (scoring works in row tiles or on a factored form).

`padding_idx` keeps nn.Embedding's meaning: that id looks up a zero row, and bags skip it.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import SlimcartError

TABLE_KINDS: dict[str, type[CompressedEmbedding]] = {}
BAG_MODES = ("sum", "mean")


def register_table(cls: type[CompressedEmbedding]) -> type[CompressedEmbedding]:
    """Class decorator: make a table kind loadable by `load_table`."""
    TABLE_KINDS[cls.kind] = cls
    return cls


def load_table(tensors: dict[str, torch.Tensor], meta: dict) -> CompressedEmbedding:
    """Rebuild any registered table from what its `state_for_save` returned."""
    cls = TABLE_KINDS.get(meta.get("kind")) if isinstance(meta, dict) else None
    if cls is None:
        raise SlimcartError(f"unknown compressed embedding kind {meta.get('kind') if isinstance(meta, dict) else meta!r}")
    return cls.from_saved(tensors, meta)


class CompressedEmbedding(nn.Module):
    """Base class. `mode` None behaves as nn.Embedding; "sum"/"mean" as nn.EmbeddingBag."""

    kind: ClassVar[str] = ""
    lookup_zeroes_padding: ClassVar[bool] = False  # True: `lookup` writes the padding row as zeros itself

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 mode: str | None = None):
        super().__init__()
        if mode is not None and mode not in BAG_MODES:
            raise SlimcartError(f"embedding bag mode '{mode}' is not supported (sum or mean)")
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.padding_idx, self.mode = padding_idx, mode

    # ------------------------------------------------------------ what a technique implements
    def lookup(self, ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Rows [n, d] float32 for a flat int64 id vector [n]."""
        raise NotImplementedError

    def scores(self, h: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """h [B, d] -> h E^T [B, N]."""
        raise NotImplementedError

    def state_for_save(self) -> tuple[dict[str, torch.Tensor], dict]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], meta: dict) -> CompressedEmbedding:  # pragma: no cover
        raise NotImplementedError

    def __getattr__(self, name: str):
        if name == "weight":  # code that reads the float table directly cannot run on a compressed one
            raise AttributeError(f"a compressed '{self.kind}' table has no float .weight: look rows up by calling it, "
                                 "score every row with .scores(h), or leave this table out of the compression")
        return super().__getattr__(name)

    # ------------------------------------------------------------ shared behaviour
    def forward(self, ids: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode is None:
            if offsets is not None or per_sample_weights is not None:
                raise SlimcartError("this table replaces an nn.Embedding: it takes ids only, no offsets")
            flat = ids.reshape(-1)
            out = self.lookup(flat)
            if not self.lookup_zeroes_padding:
                out = self._zero_padding(out, flat)
            return out.reshape(*ids.shape, self.embedding_dim)
        if ids.dim() == 2:  # nn.EmbeddingBag's fixed-length bags
            if offsets is not None:
                raise SlimcartError("2-D ids are fixed-length bags: pass no offsets")
            offsets = torch.arange(0, ids.numel(), ids.shape[1], dtype=torch.long)
            ids = ids.reshape(-1)
            per_sample_weights = None if per_sample_weights is None else per_sample_weights.reshape(-1)
        elif offsets is None:
            raise SlimcartError("1-D ids in bag mode need offsets")
        return self.bag(ids, offsets, per_sample_weights)

    def bag(self, ids: torch.Tensor, offsets: torch.Tensor, per_sample_weights: torch.Tensor | None) -> torch.Tensor:
        """Pooled bags from the looked-up rows. Padding ids point at an appended zero row that
        F.embedding_bag is told to skip, so "mean" divides by the non-padding count as nn.EmbeddingBag does."""
        rows = self.lookup(ids)
        n = rows.shape[0]
        pos = torch.arange(n, dtype=torch.long)
        pad = None
        if self.padding_idx is not None:
            rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
            pos = torch.where(ids == self.padding_idx, n, pos)
            pad = n
        return F.embedding_bag(pos, rows, offsets, mode=self.mode, per_sample_weights=per_sample_weights,
                               padding_idx=pad)

    def _zero_padding(self, out: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.padding_idx is None:
            return out
        return out.masked_fill((ids == self.padding_idx).unsqueeze(-1), 0.0)

    def _zero_padding_column(self, s: torch.Tensor) -> torch.Tensor:
        if self.padding_idx is not None:
            s[:, self.padding_idx] = 0.0
        return s

    def nbytes(self) -> int:
        """Bytes of every tensor the table holds in memory (parameters and buffers, including any
        derived copy a scoring kernel needs); scratch index vectors are not storage and not counted."""
        seen, total = set(), 0
        for t in list(self.parameters()) + list(self.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        # kernel-owned copies (FBGEMM-packed scoring weights, int8_gemm.py) are neither parameters nor buffers
        return total + sum(m.packed_nbytes() for m in self.modules() if hasattr(m, "packed_nbytes"))

    def saved_nbytes(self) -> int:
        """Bytes of the tensors `state_for_save` writes (what goes to disk, less the JSON)."""
        return sum(t.numel() * t.element_size() for t in self.state_for_save()[0].values())

    def dequantize(self) -> torch.Tensor:
        """The whole table in float32: for tests and small tables only (this is what serving avoids)."""
        with torch.no_grad():
            return self._zero_padding(self.lookup(torch.arange(self.num_embeddings)), torch.arange(self.num_embeddings))

    def _meta(self, **extra) -> dict:
        return {"kind": self.kind, "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx, "mode": self.mode, **extra}

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, kind={self.kind}, mode={self.mode}"


def table_shape(meta: dict) -> tuple[int, int, int | None, str | None]:
    """(N, d, padding_idx, mode) from a saved description, checked."""
    try:
        n, d = int(meta["num_embeddings"]), int(meta["embedding_dim"])
    except (KeyError, TypeError, ValueError):
        raise SlimcartError("saved embedding description lacks num_embeddings/embedding_dim") from None
    if n < 1 or d < 1:
        raise SlimcartError(f"saved embedding shape {n} x {d} is empty")
    return n, d, meta.get("padding_idx"), meta.get("mode")


def tensor(tensors: dict[str, torch.Tensor], name: str, dtype: torch.dtype | None = None,
           shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A saved tensor by name, checked for dtype and shape (a corrupt file is one clear error)."""
    t = tensors.get(name)
    if t is None:
        raise SlimcartError(f"saved embedding table lacks tensor '{name}'")
    if dtype is not None and t.dtype != dtype:
        raise SlimcartError(f"saved tensor '{name}' is {t.dtype}, expected {dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise SlimcartError(f"saved tensor '{name}' has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


class RowOverrides(nn.Module):
    """A sorted id vector: which of the N ids a smaller table holds, and at which position.

    Membership and position by binary search (torch.searchsorted): O(log K) per id and 4 bytes per
    held row (int32 while N < 2**31), instead of an N-long remap of 4 bytes per row of the whole table.
    """

    def __init__(self, ids: torch.Tensor):
        super().__init__()
        ids = torch.as_tensor(ids).reshape(-1)
        if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
            raise SlimcartError("override ids must be strictly increasing")
        small = ids.numel() == 0 or int(ids.max()) < 2**31 - 1
        self.register_buffer("ids", ids.to(torch.int32 if small else torch.int64).contiguous())

    def __len__(self) -> int:
        return self.ids.numel()

    def locate(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(held [n] bool, position [n]) for every entry of `ids` (positions of unheld ids are valid
        but meaningless): no nonzero(), so a caller can blend with torch.where at any batch size."""
        q = ids if ids.dtype == self.ids.dtype else ids.to(self.ids.dtype)
        pos = torch.searchsorted(self.ids, q).clamp_(max=len(self) - 1)
        return self.ids[pos] == q, pos

    def find(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(where [n_hit], position [n_hit]): which entries of `ids` are held, and their rows here."""
        if len(self) == 0:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        q = ids if ids.dtype == self.ids.dtype else ids.to(self.ids.dtype)
        pos = torch.searchsorted(self.ids, q).clamp_(max=len(self) - 1)
        where = (self.ids[pos] == q).nonzero().squeeze(1)
        return where, pos[where]


def check_frequencies(frequencies, n: int) -> torch.Tensor:
    """Training-set counts as a float64 tensor [n], refused unless finite, non-negative and n long."""
    if frequencies is None:
        raise SlimcartError("this technique ranks rows by training-set frequency: pass frequencies")
    f = torch.as_tensor(frequencies).reshape(-1)
    if f.numel() != n:
        raise SlimcartError(f"frequencies have {f.numel()} entries for a table of {n} rows")
    if not (f.dtype.is_floating_point or f.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise SlimcartError(f"frequencies must be numbers, not {f.dtype}")
    f = f.to(torch.float64)
    if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
        raise SlimcartError("frequencies must be finite and non-negative")
    return f
