"""Training GRU4Rec with resumable checkpoints (same pattern as `sasrec.fit`).

One epoch = every training session once, in right-padded batches; the loss is the next click's
sampled-softmax cross-entropy at every position (`next_item_loss`), i.e. every prefix -> next-click
example of the session, which is what the test rows are. Sessions are not carried across batches
(GRU4Rec's session-parallel mini-batches do that for speed on GPUs; padding a batch of similar-length
sessions gives the same per-position losses and is simpler to checkpoint and resume exactly).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .gru4rec import GRU4Rec, GRU4RecConfig, next_item_loss, save_gru4rec

# The checkpoint helpers are model-agnostic (state dicts + optimizer state as safetensors + JSON).
from .sasrec import _load_partial, _save_partial, _swap_in


def session_batches(sessions: list[np.ndarray], max_len: int, batch: int, rng: np.random.Generator):
    """Yield (input, target) int64 (B, L) batches, right-padded to each batch's longest session.

    Sessions are shuffled, then sorted by length inside windows of 32 batches, so a batch carries
    little padding without a fixed grouping; a session is cut to its first max_len + 1 clicks.
    """
    order = [s for s in rng.permutation(len(sessions)) if len(sessions[s]) >= 2]
    window, batches = batch * 32, []
    for a in range(0, len(order), window):
        chunk = sorted(order[a:a + window], key=lambda s: len(sessions[s]))
        batches += [chunk[i:i + batch] for i in range(0, len(chunk), batch)]
    for j in rng.permutation(len(batches)):
        rows = [sessions[s][:max_len + 1] for s in batches[j]]
        L = max(len(r) for r in rows) - 1
        inp, tgt = np.zeros((len(rows), L), np.int64), np.zeros((len(rows), L), np.int64)
        for i, r in enumerate(rows):
            inp[i, :len(r) - 1], tgt[i, :len(r) - 1] = r[:-1], r[1:]
        yield torch.from_numpy(inp), torch.from_numpy(tgt)


def sampling_distribution(sessions: list[np.ndarray], n_items: int, alpha: float) -> torch.Tensor | None:
    """q(i) ∝ count(i)^alpha over items 1..n_items (0 for the padding id); None (uniform) when alpha = 0.
    Items never clicked in training get count 1 so every item can be drawn."""
    if alpha == 0:
        return None
    counts = np.bincount(np.concatenate(sessions), minlength=n_items + 1).astype(np.float64)
    q = np.maximum(counts, 1.0) ** alpha
    q[0] = 0.0
    return torch.from_numpy(q / q.sum()).float()


def fit(config: GRU4RecConfig, train_sessions: list[np.ndarray], validate: Callable[[GRU4Rec], dict[str, float]],
        out: Path, hp: dict, epochs: int, seed: int, progress: Callable[[str], None], resume: bool, meta: dict,
        metric: str = "hr@20") -> Path:
    """Adam on `next_item_loss`; validation each epoch; early stop after `patience` epochs without a
    better `metric`, or when the next epoch would pass `max_minutes`; the best epoch is saved to `out`.

    Every epoch's model, best model and optimizer go to `<out>.partial`; each epoch draws its
    randomness from (seed, epoch), so a resumed run continues exactly as an uninterrupted one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(hp.get("threads", 1))  # small batches: one thread avoids spin-waiting on a shared machine
    try:
        return _fit(config, train_sessions, validate, out, hp, epochs, seed, progress, resume, meta, metric)
    finally:
        torch.set_num_threads(threads)


def _fit(config, train_sessions, validate, out, hp, epochs, seed, progress, resume, meta, metric) -> Path:
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    fingerprint = {"config": config.to_dict(), "seed": seed, **meta,
                   **{k: hp[k] for k in ("lr", "batch", "negatives", "alpha")}}
    torch.manual_seed(seed)
    model = GRU4Rec(config)
    q = sampling_distribution(train_sessions, config.n_items, hp["alpha"])
    opt = torch.optim.Adam(model.parameters(), lr=hp["lr"], fused=True)  # one kernel per step: the item tables are most of the weights
    state = {"fingerprint": fingerprint, "epoch": 0, "best": -1.0, "best_epoch": 0, "best_metrics": {},
             "seconds": 0.0, "cpu_seconds": 0.0, "history": []}
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
    while state["epoch"] < epochs:
        epoch, t0, c0 = state["epoch"], time.perf_counter(), time.process_time()
        rng, gen = np.random.default_rng([seed, epoch]), torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        torch.manual_seed(seed * 1_000_003 + epoch)  # dropout masks
        model.train()
        losses = []
        for inp, tgt in session_batches(train_sessions, config.max_len, hp["batch"], rng):
            loss = next_item_loss(model, inp, tgt, hp["negatives"], q, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        scores = validate(model)
        if scores[metric] > state["best"]:
            state["best"], state["best_epoch"], state["best_metrics"] = scores[metric], epoch + 1, scores
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        took, cpu = time.perf_counter() - t0, time.process_time() - c0
        state["epoch"], state["seconds"] = epoch + 1, state["seconds"] + took
        state["cpu_seconds"] += cpu
        state["history"].append({"epoch": epoch + 1, "loss": float(np.mean(losses)), **{f"val_{k}": v for k, v in scores.items()},
                                 "seconds": took, "cpu_seconds": cpu, "loadavg": os.getloadavg()[0]})
        _swap_in(partial, lambda f, best=best_state: _save_partial(f, model, best, opt, state))
        shown = ", ".join(f"val {k.upper()} {v:.4f}" for k, v in scores.items())
        progress(f"epoch {epoch + 1}: loss {np.mean(losses):.4f}, {shown} ({took:.0f}s, {cpu:.0f}s CPU)")
        if state["epoch"] - state["best_epoch"] >= hp["patience"]:
            break
        if state["seconds"] + took > hp["max_minutes"] * 60:
            progress(f"stopping: the next epoch would pass the {hp['max_minutes']:g} min budget")
            break
    model.load_state_dict(best_state)
    training = {k: state[k] for k in ("epoch", "best_epoch", "seconds", "cpu_seconds", "history")}
    training.update({f"val_{k}": v for k, v in state["best_metrics"].items()}, seed=seed, **hp)
    extra = {"n_items": config.n_items, "dataset": meta.get("dataset"), "training": training}
    _swap_in(out, lambda f: save_gru4rec(model.eval(), f, extra))
    shutil.rmtree(partial, ignore_errors=True)
    return out
