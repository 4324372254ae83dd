"""Training a DIN: Adam on binary cross-entropy, early stopping on validation AUC, resumable,
then Platt scaling on the validation split.

    loss = BCE(sigmoid(logit), label) + emb_l2 * mean over the batch of ||looked-up rows||^2
    calibrated logit = a * logit + c,  (a, c) = argmin validation logloss   (Platt, 1999)

The L2 term only touches the rows a batch looks up (DIN's "mini-batch aware" regularisation in its
simplest form): a global weight decay would shrink millions of rows the batch never saw.
Each epoch draws its batches (and, for behaviour data, its sampled negatives) from (seed, epoch),
and the model, best model and optimizer are checkpointed after every epoch to `<out>.partial`, so a
resumed run continues exactly as an uninterrupted one. Stops after `patience` epochs without a
better validation AUC, at `epochs`, or when the next epoch would pass `max_minutes`.

Why the calibration: the best-AUC epoch is over-confident (on Video Games its validation logloss
was above that of always predicting the base rate); a shop bids and ranks on the predicted CTR, so the
saved model should predict rates, not only an order. (a, c) are folded into the MLP's output layer,
so the saved model is still a plain DIN and the AUC is unchanged (a > 0 keeps the order).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from .ctr import DIN, DINConfig, fold_into_output, save_din
# Checkpoint helpers are shared with SASRec's trainer (same partial-folder layout).
from .sasrec import _load_partial, _save_partial, _swap_in



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


def fit(config: DINConfig, epoch_batches: Callable[[np.random.Generator], Iterable[dict]],
        validation: Callable[[DIN], tuple[float, np.ndarray, np.ndarray]], out, hp: dict, epochs: int, seed: int,
        progress: Callable[[str], None], resume: bool, meta: dict, frequencies: dict | None = None):
    """Train, keep the epoch with the best validation score, calibrate it (hp["calibrate"]), write `out`
    (config, weights, frequencies). `validation(model)` gives (score to maximise, e.g. AUC; labels; logits)
    on the validation split."""
    threads = torch.get_num_threads()
    # One thread by default: batches are small, and on a shared 2-core machine two OpenMP threads
    # waiting on each other slowed SASRec's steps ~10x (see models/sasrec.py).
    torch.set_num_threads(int(hp.get("threads", 1)))
    try:
        return _fit(config, epoch_batches, validation, out, hp, epochs, seed, progress, resume, meta, frequencies)
    finally:
        torch.set_num_threads(threads)


def _fit(config, epoch_batches, validation, out, hp, epochs, seed, progress, resume, meta, frequencies):
    partial = out.with_name(out.name + ".partial")
    fingerprint = {"config": config.to_dict(), "seed": seed, **meta,
                   **{k: hp[k] for k in ("lr", "batch", "emb_l2", "negatives") if k in hp}}
    torch.manual_seed(seed)
    model = DIN(config)
    opt = torch.optim.Adam(model.parameters(), lr=hp["lr"])
    state = {"fingerprint": fingerprint, "epoch": 0, "best": -1.0, "best_epoch": 0, "seconds": 0.0,
             "cpu_seconds": 0.0, "history": []}
    best_state = {k: v.clone() for k, v in model.state_dict().items()}
    found = partial  # killed mid-swap: the last checkpoint is still under its "old" name
    if not found.exists():
        found = max(partial.parent.glob(f".{partial.name}.old-*"), key=os.path.getmtime, default=partial)
    if resume and (found / "state.json").exists():
        if json.loads((found / "state.json").read_text()).get("fingerprint") == fingerprint:
            state, best_state = _load_partial(found, model, opt)
            progress(f"resuming after epoch {state['epoch']} from {found}")
        else:
            progress(f"ignoring {found}: it was made with other data or settings")
    while state["epoch"] < epochs and state["epoch"] - state["best_epoch"] < hp["patience"]:
        epoch, t0, c0 = state["epoch"], time.perf_counter(), time.process_time()
        torch.manual_seed(seed * 1_000_003 + epoch)  # dropout masks
        model.train()
        losses = []
        for batch in epoch_batches(np.random.default_rng([seed, epoch])):
            loss = batch_loss(model, batch, hp["emb_l2"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        with torch.inference_mode():
            score = validation(model)[0]
        if score > state["best"]:
            state["best"], state["best_epoch"] = score, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        # CPU seconds beside wall seconds: on a shared machine they show the standalone cost.
        took, cpu = time.perf_counter() - t0, time.process_time() - c0
        state["epoch"], state["seconds"], state["cpu_seconds"] = epoch + 1, state["seconds"] + took, state["cpu_seconds"] + cpu
        state["history"].append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_auc": score,
                                 "seconds": took, "cpu_seconds": cpu, "loadavg": os.getloadavg()[0]})
        _swap_in(partial, lambda f: _save_partial(f, model, best_state, opt, state))
        progress(f"epoch {epoch + 1}: loss {np.mean(losses):.4f}, val AUC {score:.4f} ({took:.0f}s, {cpu:.0f}s CPU)")
        if state["seconds"] + took > hp["max_minutes"] * 60 and state["epoch"] < epochs:
            progress(f"stopping: the next epoch would pass the {hp['max_minutes']:g} min budget")
            break
    model.load_state_dict(best_state)
    training = {k: state[k] for k in ("epoch", "best_epoch", "seconds", "cpu_seconds", "history")}
    training.update(val_auc=state["best"], seed=seed, **hp)
    if hp.get("calibrate", True):
        model.eval()
        with torch.inference_mode():
            _, labels, logits = validation(model)
        a, c = platt_scaling(labels, logits)
        fold_into_output(model, a, c)
        with torch.inference_mode():
            _, _, calibrated = validation(model)
        before, after = _logloss(labels, logits), _logloss(labels, calibrated)
        training["platt"] = {"scale": a, "shift": c, "val_logloss_before": before, "val_logloss_after": after}
        progress(f"calibrated on validation: logit * {a:.3f} + {c:.3f}, logloss {before:.4f} -> {after:.4f}")
    extra = {**meta, "training": training}
    _swap_in(out, lambda f: save_din(model.eval(), f, extra, frequencies))
    shutil.rmtree(partial, ignore_errors=True)
    return out
