"""Search encoder over HTTP: `/embed` (texts -> vectors) and `/search` (query -> top-k product ids).

Both go through one micro-batch queue: a batch may mix /embed texts and /search queries, all
embedded in one model call (the workload's `embed`, so vectors equal offline ones); the batch's
queries are then looked up in the index together (FAISS searches a query matrix faster than one
query at a time).
"""
from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import Field, StringConstraints, create_model

from .index import PROBE_TEXT, CatalogueIndex
from .servable import (
    Endpoint,
    Limits,
    Prepared,
    RequestError,
    Servable,
    Strict,
    register_servable,
    timed_pair,
)


def _check_texts(texts: list[str], field: str) -> None:
    for i, t in enumerate(texts):
        if not t.strip():
            raise RequestError(f"{field}[{i}] is empty or only whitespace")


@register_servable("search")
class SearchServable(Servable):
    workload = "search"

    def __init__(self, runner: Any, bundle: Any, limits: Limits, wl: Any, index: CatalogueIndex | None = None, **_):
        super().__init__(limits)
        self.runner, self.bundle, self.wl, self.index = runner, bundle, wl, index
        text = Annotated[str, StringConstraints(min_length=1, max_length=limits.max_chars)]
        self.EmbedRequest = create_model("EmbedRequest", __base__=Strict,
                                         texts=(list[text], Field(min_length=1, max_length=limits.max_items)))
        self.endpoints.append(Endpoint("/embed", self.EmbedRequest, self._prepare_embed, self._respond_embed,
                                       summary="texts -> L2-normalised vectors"))
        self.probe_cosine = None
        if index is not None:
            self.probe_cosine = index.check_encoder(self.embed([PROBE_TEXT])[0])
            self.SearchRequest = create_model("SearchRequest", __base__=Strict, query=(text, ...),
                                              k=(int, Field(10, ge=1, le=limits.max_k)))
            self.endpoints.append(Endpoint("/search", self.SearchRequest, self._prepare_search, self._respond_search,
                                           summary="query -> top-k product ids from the catalogue index"))

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.wl.embed(self.runner, self.bundle.tokenizer, texts, batch_size=max(1, len(texts)))

    # ---------------------------------------------------------------- requests
    def _prepare_embed(self, req) -> Prepared:
        _check_texts(req.texts, "texts")
        return Prepared(("embed", req.texts, 0), size=len(req.texts))

    def _prepare_search(self, req) -> Prepared:
        if not req.query.strip():
            raise RequestError("query is empty or only whitespace")
        return Prepared(("search", [req.query], req.k), size=1)

    @staticmethod
    def _respond_embed(out: np.ndarray) -> dict:
        return {"vectors": out.tolist(), "dim": int(out.shape[1])}

    def _respond_search(self, out: tuple) -> dict:
        ids, scores, rows = out
        titles = self.index.titles
        return {"results": [{"id": i, "score": s, **({"title": titles[r]} if titles else {})}
                            for i, s, r in zip(ids, scores, rows)]}

    # ---------------------------------------------------------------- model thread
    def run(self, items: list[tuple]) -> list[Any]:
        texts = [t for _, ts, _ in items for t in ts]
        vecs = self.embed(texts)
        outs, at, queries, search_at = [], 0, [], []
        for i, (op, ts, k) in enumerate(items):
            outs.append(vecs[at:at + len(ts)])
            if op == "search":
                queries.append(vecs[at])
                search_at.append(i)
            at += len(ts)
        if queries:
            k_max = max(items[i][2] for i in search_at)
            ids, scores, rows = self.index.search(np.stack(queries), k_max)
            for j, i in enumerate(search_at):
                k = items[i][2]
                outs[i] = (ids[j][:k], scores[j][:k], rows[j][:k])
        return outs

    def warmup(self, max_batch: int) -> tuple[float, float]:
        texts = ["wireless noise cancelling over-ear headphones"] * max_batch  # a typical title's length
        return timed_pair(self.embed, texts[:1], texts)

    def info(self) -> dict:
        info = {"workload": self.workload, "model": str(self.bundle.name), "runtime": getattr(self.runner, "runtime", "?")}
        if self.index is not None:
            info["index"] = {k: self.index.meta.get(k) for k in ("kind", "dim", "count", "model")}
            info["index"]["probe_cosine"] = self.probe_cosine
        return info

