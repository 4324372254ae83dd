"""Training a DIN through slimcart's one trainer (slimcart.training.fit), then Platt scaling on the
validation split.

    loss = BCE(sigmoid(logit), label) + emb_l2 * mean over the batch of ||looked-up rows||^2
    calibrated logit = a * logit + c,  (a, c) = argmin validation logloss   (Platt, 1999)

The L2 term only touches the rows a batch looks up (DIN's "mini-batch aware" regularisation in its
simplest form): a global weight decay would shrink millions of rows the batch never saw, so the
trainer's weight decay is 0 (AdamW with no decay is Adam).

Examples: for behaviour data, example i < P is training positive i and example P*k + i (k >= 1) a
negative of positive i whose item is drawn inside the step from the trainer's per-step seed, so every
epoch meets fresh negatives and a resumed run draws the ones an uninterrupted run would. Field data
(iPinYou, Criteo) are the labelled rows as they are. Batches hold examples of similar history length.
One validation (AUC on the validation split) per epoch; early stop after `patience` epochs without a
better one, or at `epochs` / `max_minutes`.

Why the calibration: the best-AUC epoch is over-confident (on Video Games its validation logloss
was above that of always predicting the base rate); a shop bids and ranks on the predicted CTR, so the
saved model should predict rates, not only an order. (a, c) are folded into the MLP's output layer,
so the saved model is still a plain DIN and the AUC is unchanged (a > 0 keeps the order).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .ctr import DIN, DINConfig, fold_into_output, save_din


def _logloss(labels, logits) -> float:
    z, y = torch.as_tensor(np.asarray(logits), dtype=torch.float64), torch.as_tensor(np.asarray(labels), dtype=torch.float64)
    return float(F.binary_cross_entropy_with_logits(z, y))


def platt_scaling(labels: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """(a, c) minimising the logloss of sigmoid(a * logit + c); a is kept positive (a = e^u)."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.float64)
    u = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([u], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z * u[0].exp() + u[1], y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(u[0].detach().exp()), float(u[1].detach())


def batch_loss(model: DIN, batch: dict, emb_l2: float = 0.0) -> torch.Tensor:
    """Mean BCE of one labelled batch (+ L2 on the rows it looked up)."""
    sparse = torch.as_tensor(batch["sparse"])
    hist = torch.as_tensor(batch["hist"]) if "hist" in batch else None
    dense = torch.as_tensor(batch["dense"]) if "dense" in batch else None
    rows, h = model.lookup(sparse, hist)
    mask = (hist > 0).to(rows[0].dtype) if hist is not None else None
    logits = model.score(rows, h, mask, dense)
    loss = F.binary_cross_entropy_with_logits(logits, torch.as_tensor(batch["label"], dtype=logits.dtype))
    if emb_l2:
        reg = sum((r * r).sum(-1).mean() for r in rows)
        if h is not None:
            reg = reg + ((h * h).sum(-1) * mask).sum(1).mean()
        loss = loss + emb_l2 * reg
    return loss


class DINTask:
    """A DIN's click-prediction training as a task for slimcart.training.fit.

    `data` is the ctr workload's CTRData (its `train` rows and `batch`); `negative_items(users, rng)`
    draws, per user, an item that user never touched (None for field data, which carries its own
    non-clicks); `validate(model)` returns the validation AUC."""

    def __init__(self, model: DIN, data: Any, negatives: int, emb_l2: float, validate: Callable[[DIN], float],
                 fingerprint: dict, negative_items: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None):
        self.model, self.data, self.emb_l2, self._validate, self._fp = model, data, emb_l2, validate, fingerprint
        self.pos, self.negative_items = data.train, negative_items
        self.k = int(negatives) if negative_items is not None else 0
        ends = self.pos.end if self.pos.end is not None else np.zeros(len(self.pos), np.int64)
        self.lengths = np.tile(np.minimum(ends, model.config.max_len), 1 + self.k)

    def trainable(self) -> DIN:
        return self.model

    def student(self) -> DIN:
        return self.model

    def n_examples(self) -> int:
        return len(self.pos) * (1 + self.k)

    def fingerprint(self) -> dict:
        return self._fp

    def arrange(self, order: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        """Batches of similar history length (far less padding), in shuffled order."""
        if self.pos.end is None:
            return order
        from ..training import length_bucketed

        return length_bucketed(order, self.lengths, batch_size, rng)

    def rows(self, idx: np.ndarray):
        """The labelled rows of examples `idx`: positives as stored, negatives with a freshly drawn item
        (from the trainer's per-step torch seed, so a resumed run draws the same ones)."""
        idx = np.asarray(idx)
        n = len(self.pos)
        rows = self.pos.take(idx % n)
        neg = idx >= n
        if neg.any():
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))
            rows.sparse[neg, self.model.config.target_field] = self.negative_items(rows.user[neg], rng)
            rows.label[neg] = 0.0
        return rows

    def loss(self, idx):
        rows = self.rows(idx)
        batch = self.data.batch(rows, np.arange(len(rows)), self.model.config.max_len, labels=True)
        loss = batch_loss(self.model, batch, self.emb_l2)
        return loss, {}

    def validate(self) -> float:
        with torch.inference_mode():
            return self._validate(self.model)

    def score_undistilled(self, model) -> float:
        with torch.inference_mode():
            return self._validate(model)


def fit(config: DINConfig, data: Any, validation: Callable[[DIN], tuple[float, np.ndarray, np.ndarray]], out: Path,
        hp: dict, epochs: int, seed: int, progress: Callable[[str], None], resume: bool, meta: dict,
        negative_items: Callable | None = None, frequencies: dict | None = None) -> Path:
    """Train with slimcart.training.fit (checkpoints in `<out>.partial`, resumed when `resume` and the
    data and settings match), keep the best-validated epoch, calibrate it (hp["calibrate"]), write `out`
    atomically (config, weights, frequencies). `validation(model)` gives (validation AUC, labels, logits)."""
    from ..training import fit_epochs, publish_trained

    torch.manual_seed(seed)
    model = DIN(config)
    fingerprint = {"config": config.to_dict(), "seed": seed, **meta,
                   **{k: hp[k] for k in ("lr", "batch", "emb_l2", "negatives") if k in hp}}
    task = DINTask(model, data, int(hp.get("negatives", 1)), float(hp.get("emb_l2", 0.0)),
                   lambda m: validation(m)[0], fingerprint, negative_items)
    _, training = fit_epochs(task, hp, epochs, seed, out, resume, progress, "DIN", "val_auc")
    model.eval()
    if hp.get("calibrate", True):
        with torch.inference_mode():
            _, labels, logits = validation(model)
        a, c = platt_scaling(labels, logits)
        fold_into_output(model, a, c)
        with torch.inference_mode():
            _, _, calibrated = validation(model)
        before, after = _logloss(labels, logits), _logloss(labels, calibrated)
        training["platt"] = {"scale": a, "shift": c, "val_logloss_before": before, "val_logloss_after": after}
        progress(f"calibrated on validation: logit * {a:.3f} + {c:.3f}, logloss {before:.4f} -> {after:.4f}")
    publish_trained(out, lambda f: save_din(model.eval(), f, {**meta, "training": training}, frequencies))
    return out
