"""Training GRU4Rec through slimcart's one trainer (`slimcart.training.fit`), as SASRec is trained.

Examples are the training sessions of 2+ clicks; one step's batch is those sessions right-padded to
the batch's longest (sessions of similar length batched together), and the loss is the next click's
sampled-softmax cross-entropy at every position (`next_item_loss`), i.e. every prefix -> next-click
example of the session, which is what the test rows are. Sessions are not carried across batches
(GRU4Rec's session-parallel mini-batches do that for speed on GPUs; padding a batch of similar-length
sessions gives the same per-position losses and is simpler to checkpoint and resume exactly).
Negatives are drawn from torch's global generator, which the trainer seeds per step: a resumed run
draws the same negatives an uninterrupted one would.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .gru4rec import GRU4Rec, GRU4RecConfig, next_item_loss, save_gru4rec


def sampling_distribution(sessions: list[np.ndarray], n_items: int, alpha: float) -> torch.Tensor | None:
    """q(i) ∝ count(i)^alpha over items 1..n_items (0 for the padding id); None (uniform) when alpha = 0.
    Items never clicked in training get count 1 so every item can be drawn."""
    if alpha == 0:
        return None
    counts = np.bincount(np.concatenate(sessions), minlength=n_items + 1).astype(np.float64)
    q = np.maximum(counts, 1.0) ** alpha
    q[0] = 0.0
    return torch.from_numpy(q / q.sum()).float()


def right_padded_pairs(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(clicks, next clicks) int64 (B, longest - 1), right-padded with 0, of sessions of 2+ clicks."""
    width = max(len(r) for r in rows) - 1
    inp, tgt = np.zeros((len(rows), width), np.int64), np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        inp[i, :len(r) - 1], tgt[i, :len(r) - 1] = r[:-1], r[1:]
    return torch.from_numpy(inp), torch.from_numpy(tgt)


class GRU4RecTask:
    """Next-click training as a task for the shared trainer (trainable, n_examples, loss, validate,
    fingerprint, arrange)."""

    def __init__(self, model: GRU4Rec, sessions: list[np.ndarray], hp: dict, validate: Callable[[GRU4Rec], float],
                 fingerprint: dict):
        self.model, self.hp, self._validate, self._fp = model, hp, validate, fingerprint
        cut = model.config.max_len + 1  # a session's first max_len + 1 clicks: max_len inputs
        self.sessions = [s[:cut] for s in sessions if len(s) >= 2]
        self.lengths = np.array([len(s) for s in self.sessions])
        self.q = sampling_distribution(self.sessions, model.config.n_items, hp["alpha"]) if self.sessions else None

    def trainable(self) -> GRU4Rec:
        return self.model

    def student(self) -> GRU4Rec:
        return self.model

    def n_examples(self) -> int:
        return len(self.sessions)

    def fingerprint(self) -> dict:
        return self._fp

    def arrange(self, order, batch_size: int, rng):
        from ..training import length_bucketed

        return length_bucketed(order, self.lengths, batch_size, rng)

    def loss(self, idx):
        inp, tgt = right_padded_pairs([self.sessions[i] for i in idx])
        return next_item_loss(self.model, inp, tgt, self.hp["negatives"], self.q, None), {}

    def validate(self) -> float:
        return self._validate(self.model)

    def score_undistilled(self, model) -> float:
        return self._validate(model)


def fit(config: GRU4RecConfig, train_sessions: list[np.ndarray], validate: Callable[[GRU4Rec], float], out: Path,
        hp: dict, epochs: int, seed: int, progress: Callable[[str], None], resume: bool, meta: dict) -> Path:
    """Adam (AdamW without decay) on `next_item_loss` at a constant rate, validation (`validate`: higher
    is better, e.g. HR@20) after every epoch, early stop after `patience` epochs without a better score or
    at `max_minutes`; the best epoch is saved to `out`. Checkpoints go to `<out>.partial` and a rerun
    with the same data and settings continues from the last one (`resume`)."""
    from ..training import fit_epochs, publish_trained

    torch.manual_seed(seed)
    model = GRU4Rec(config)
    fingerprint = {"config": config.to_dict(), "seed": seed, **meta,
                   **{k: hp[k] for k in ("lr", "batch", "negatives", "alpha")}}
    task = GRU4RecTask(model, train_sessions, hp, validate, fingerprint)
    res, training = fit_epochs(task, hp, epochs, seed, out, resume, progress, "GRU4Rec", "val_hr@20")
    extra = {"n_items": config.n_items, "dataset": meta.get("dataset"), "training": training}
    return publish_trained(out, lambda f: save_gru4rec(model.eval(), f, extra))
