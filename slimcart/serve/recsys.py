"""Sequential recommender over HTTP: `POST /score` (a user's history -> top-k items, or the scores
of given candidate items).

Item ids are the model's own item numbers 1..n_items: SASRec checkpoints do not yet store the
catalogue's ids (see the report to the lead); an id outside that range is a 422 naming it.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field, create_model

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


@register_servable("recsys")
class RecsysServable(Servable):
    workload = "recsys"

    def __init__(self, runner: Any, bundle: Any, limits: Limits, wl: Any, **_):
        super().__init__(limits)
        self.runner, self.bundle, self.wl = runner, bundle, wl
        self.max_len = wl.max_len(bundle)
        self.n_items = int(self._scores([np.array([1])]).shape[1] - 1)  # what the model really scores
        self.ScoreRequest = create_model(
            "ScoreRequest", __base__=Strict,
            history=(list[int], Field(min_length=1, max_length=limits.max_history)),
            k=(int, Field(10, ge=1, le=limits.max_k)),
            items=(list[int] | None, Field(None, min_length=1, max_length=limits.max_k)),
            exclude_seen=(bool, True),
        )
        self.endpoints.append(Endpoint("/score", self.ScoreRequest, self._prepare, self._respond,
                                       summary="history -> top-k items (or scores of `items`)"))

    def _scores(self, histories: list[np.ndarray]) -> np.ndarray:
        from ..workloads.recsys import left_pad

        return np.asarray(self.runner({"seq": left_pad(histories, self.max_len)}), np.float32)

    def _check_ids(self, ids: list[int], field: str) -> None:
        bad = [i for i in ids if not 1 <= i <= self.n_items]
        if bad:
            raise RequestError(f"{field}: unknown item id(s) {bad[:5]}{' ...' if len(bad) > 5 else ''} "
                               f"(this model knows items 1..{self.n_items})")

    def _prepare(self, req) -> Prepared:
        self._check_ids(req.history, "history")
        if req.items is not None:
            self._check_ids(req.items, "items")
        return Prepared((np.asarray(req.history, np.int64), req.k, req.items, req.exclude_seen), size=1)

    @staticmethod
    def _respond(out: dict) -> dict:
        return out

    def run(self, items: list[tuple]) -> list[dict]:
        scores = self._scores([h for h, _, _, _ in items])
        outs = []
        for row, (hist, k, candidates, exclude_seen) in zip(scores, items):
            if candidates is not None:
                outs.append({"items": candidates, "scores": row[candidates].astype(float).tolist()})
                continue
            row = row.copy()
            row[0] = -np.inf  # padding id
            if exclude_seen:
                row[hist] = -np.inf
            k = min(k, self.n_items)
            top = np.argpartition(-row, k - 1)[:k]
            top = top[np.argsort(-row[top], kind="stable")]
            top = top[np.isfinite(row[top])]
            outs.append({"items": top.tolist(), "scores": row[top].astype(float).tolist()})
        return outs

    def warmup(self, max_batch: int) -> tuple[float, float]:
        hist = [np.arange(1, self.max_len + 1) % self.n_items + 1] * max_batch
        return timed_pair(self._scores, hist[:1], hist)

    def info(self) -> dict:
        return {"workload": self.workload, "model": str(self.bundle.name), "runtime": getattr(self.runner, "runtime", "?"),
                "n_items": self.n_items, "max_len": self.max_len}
