"""What one shard of a batch job computes. A task is a small picklable description; each worker
(process or Ray actor) calls `load()` once to hold the model, then `compute(state, shard)` per shard.

EmbedTask  shard (row, [id], text)     -> (row, [id], embedding: fixed_size_list<float32>[dim])
ScoreTask  shard (row, user, history)  -> (row, user, items: list<id>, scores: list<float32>)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa


def _vectors(mat: np.ndarray) -> pa.FixedSizeListArray:
    mat = np.ascontiguousarray(mat, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1)), mat.shape[1])


@dataclass(frozen=True)
class EmbedTask:
    workload: str
    model: str
    threads: int
    batch_size: int = 64

    def identity(self) -> dict:
        return {"task": "embed", "workload": self.workload, "model": self.model, "batch_size": self.batch_size}

    def load(self) -> Any:
        from ..serve.loading import load_model

        wl, runner, bundle = load_model(self.workload, self.model, self.threads)
        if not hasattr(wl, "embed"):
            from ..errors import SlimcartError

            raise SlimcartError(f"workload '{self.workload}' does not produce embeddings (use --workload search)")
        return wl, runner, bundle

    def compute(self, state: Any, shard: pa.Table) -> pa.Table:
        wl, runner, bundle = state
        texts = shard.column("text").to_pylist()
        # The workload's own embedding path (length-sorted batches), so vectors equal what serving computes.
        vecs = wl.embed(runner, bundle.tokenizer, texts, batch_size=self.batch_size)
        cols = {"row": shard.column("row")}
        if "id" in shard.column_names:
            cols["id"] = shard.column("id")
        cols["embedding"] = _vectors(vecs)
        return pa.table(cols)


@dataclass(frozen=True)
class ScoreTask:
    """Top-k recommendations per user from a sequential recommender (recsys workload)."""

    workload: str
    model: str
    threads: int
    vocab: tuple  # the log's item id of model item k at position k - 1
    k: int = 10
    exclude_seen: bool = True
    batch_size: int = 256

    def identity(self) -> dict:
        return {"task": "score", "workload": self.workload, "model": self.model, "k": self.k,
                "exclude_seen": self.exclude_seen, "batch_size": self.batch_size}

    def load(self) -> Any:
        from ..errors import SlimcartError
        from ..serve.loading import load_model

        wl, runner, bundle = load_model(self.workload, self.model, self.threads)
        if not hasattr(wl, "max_len"):
            raise SlimcartError(f"workload '{self.workload}' has no per-user scoring (use --workload recsys)")
        n_model = int(bundle.extra.get("config", {}).get("model", {}).get("n_items", len(self.vocab)))
        if n_model != len(self.vocab):
            raise SlimcartError(f"the model scores {n_model} items but the log has {len(self.vocab)}: score the "
                                "interaction log the model was trained on (item ids are numbered from it)")
        return wl, runner, bundle

    def compute(self, state: Any, shard: pa.Table) -> pa.Table:
        from ..workloads.recsys import left_pad

        wl, runner, bundle = state
        histories = [np.asarray(h, np.int64) for h in shard.column("history").to_pylist()]
        vocab = np.asarray(self.vocab)
        top_items, top_scores = [], []
        for a in range(0, len(histories), self.batch_size):
            hist = histories[a:a + self.batch_size]
            scores = np.asarray(runner({"seq": left_pad(hist, wl.max_len(bundle))}), np.float32).copy()
            if scores.shape[1] != len(vocab) + 1:
                from ..errors import SlimcartError

                raise SlimcartError(f"the model scores {scores.shape[1] - 1} items but the log has {len(vocab)}")
            scores[:, 0] = -np.inf  # padding id
            if self.exclude_seen:
                rows = np.repeat(np.arange(len(hist)), [len(h) for h in hist])
                scores[rows, np.concatenate(hist)] = -np.inf
            k = min(self.k, scores.shape[1] - 1)
            idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(scores, idx, 1), axis=1, kind="stable")
            idx = np.take_along_axis(idx, order, 1)
            top = np.take_along_axis(scores, idx, 1)
            for i, s in zip(idx, top):  # tiny catalogues: fewer unseen items than k, drop the excluded ones
                keep = np.isfinite(s)
                top_items.append(vocab[i[keep] - 1].tolist())
                top_scores.append(s[keep].tolist())
        item_type = pa.int64() if vocab.dtype.kind in "iu" else pa.string()
        return pa.table({
            "row": shard.column("row"), "user": shard.column("user"),
            "items": pa.array(top_items, pa.list_(item_type)),
            "scores": pa.array(top_scores, pa.list_(pa.float32())),
        })
