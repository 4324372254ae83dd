"""Ranking metrics and helpers shared by the recommender workloads: leave-last-out splits, left-padded
histories, the rank of each user's target item among all items, HR@k / NDCG@k / sampled AUC."""
from __future__ import annotations

from typing import Callable

import numpy as np

SERVING_BATCH = 256


def leave_last_out(histories: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """(training items, validation item, test item) per user; users with < 3 items only train (0 = none)."""
    train, valid, test = [], np.zeros(len(histories), np.int64), np.zeros(len(histories), np.int64)
    for u, h in enumerate(histories):
        if len(h) < 3:
            train.append(h)
        else:
            train.append(h[:-2])
            valid[u], test[u] = h[-2], h[-1]
    return train, valid, test


def left_pad(seqs: list[np.ndarray], max_len: int) -> np.ndarray:
    """(B, max_len) int64, each history's newest `max_len` items right-aligned, zeros before."""
    out = np.zeros((len(seqs), max_len), np.int64)
    for i, s in enumerate(seqs):
        s = s[-max_len:]
        if len(s):
            out[i, -len(s):] = s
    return out


# ---------------------------------------------------------------- metrics
def target_ranks(scores: np.ndarray, targets: np.ndarray, exclude: list[np.ndarray]) -> np.ndarray:
    """0-based rank of each target among all items; column 0 (padding) and each row's `exclude`
    items other than the target are left out. Ties count against the target; NaN scores as -inf."""
    s = np.nan_to_num(np.asarray(scores, np.float32), nan=-np.inf, copy=True)
    rows = np.arange(len(s))
    t = s[rows, targets].copy()
    lens = [len(e) for e in exclude]
    if sum(lens):
        s[np.repeat(rows, lens), np.concatenate(exclude).astype(np.int64)] = -np.inf
    s[rows, targets] = t
    s = s[:, 1:]
    return (s > t[:, None]).sum(1) + (s == t[:, None]).sum(1) - 1


def hit_rate(ranks: np.ndarray, k: int = 10) -> float:
    """Share of users whose target is in the top k."""
    return float(np.mean(ranks < k))


def ndcg_per_user(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """Each user's NDCG@k with one relevant item: 1/log2(rank + 2) if rank < k else 0."""
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def ndcg_at(ranks: np.ndarray, k: int = 10) -> float:
    """Mean NDCG@k over users (see ndcg_per_user)."""
    return float(np.mean(ndcg_per_user(ranks, k)))


def sampled_auc(scores: np.ndarray, targets: np.ndarray, negatives: np.ndarray) -> float:
    """Mean per-user AUC of the target's score vs the scores of that user's negative items (ties = 1/2)."""
    rows = np.arange(len(scores))
    t = scores[rows, targets][:, None]
    n = scores[rows[:, None], negatives]
    return float(np.mean((t > n).mean(1) + 0.5 * (t == n).mean(1)))


def rank_users(score_fn: Callable[[np.ndarray], np.ndarray], inputs: list[np.ndarray], targets: np.ndarray,
               max_len: int, negatives: np.ndarray | None = None, keep_top: int = 0) -> dict:
    """Score `inputs` histories in serving batches; ranks (history excluded), AUC, optional top items."""
    ranks, aucs, top_i, top_s = [], [], [], []
    for a in range(0, len(inputs), SERVING_BATCH):
        hist, tgt = inputs[a:a + SERVING_BATCH], targets[a:a + SERVING_BATCH]
        scores = np.asarray(score_fn(left_pad(hist, max_len)), np.float32)
        ranks.append(target_ranks(scores, tgt, hist))
        if negatives is not None:
            aucs.append(sampled_auc(scores, tgt, negatives[a:a + SERVING_BATCH]) * len(tgt))
        if keep_top:  # partition first: a full sort of 256 x n_items rows would dominate evaluation
            scores[:, 0] = -np.inf
            idx = np.argpartition(-scores, keep_top - 1, 1)[:, :keep_top]
            idx = np.take_along_axis(idx, np.argsort(-np.take_along_axis(scores, idx, 1), 1, kind="stable"), 1)
            top_i.append(idx.astype(np.int32))
            top_s.append(np.take_along_axis(scores, idx, 1))
    out = {"ranks": np.concatenate(ranks)}
    if negatives is not None:
        out["auc"] = float(sum(aucs) / len(targets))
    if keep_top:
        out["top_items"], out["top_scores"] = np.concatenate(top_i), np.concatenate(top_s)
    return out


