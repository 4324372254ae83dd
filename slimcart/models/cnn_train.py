"""Training the product-photo ResNet (slimcart/models/cnn.py) from scratch: augmentation and a
resumable loop with early stopping and a wall-clock budget.

Augmentation (all in torch on whole batches of already-decoded uint8 photos, so no image library
runs inside the loop; torchvision's transforms are not available in this torch build):
- geometry: one random affine map per photo applied with `affine_grid` + `grid_sample` —
  zoom s ~ U(zoom) of the side (s < 1 crops in), aspect a ~ exp(U(+-aspect)), rotation
  r ~ U(+-degrees), shift t ~ U(+-shift) and a horizontal flip with probability 1/2:
      [x_in, y_in] = [[f s sqrt(a) cos r, -s/sqrt(a) sin r], [f s sqrt(a) sin r, s/sqrt(a) cos r]] [x_out, y_out] + t
  in the normalised [-1, 1] coordinates of grid_sample; border pixels fill what lies outside.
- colour: brightness b, contrast c (around each photo's mean grey) and saturation g (towards its
  grey image), each ~ U(1 +- jitter):  x <- clamp(mix(grey(x'), x', g)),  x' = (x b - m) c + m.
The photos are stored at the model's input size, the same decode + resize the test images get,
so the un-augmented training input is exactly what serving sees.

Objective: cross-entropy with label smoothing; AdamW, linear warm-up then cosine decay to zero over
`epochs`, the learning rate being a pure function of the step so a resumed run is exact.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cnn import CNNConfig, ResNet, count_params, save_cnn

# SASRec's atomic folder swap is model-agnostic; reused rather than copied.
from .sasrec import _swap_in

AUGMENT_DEFAULTS = {"zoom": (0.7, 1.05), "aspect": 0.15, "degrees": 10.0, "shift": 0.1, "jitter": 0.25}


def to_pixels(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) photos -> the model's input: float32 (N, 3, H, W) in [0, 1]."""
    x = torch.as_tensor(images)
    return x.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def augment(images: torch.Tensor, gen: torch.Generator | None = None, zoom=(0.7, 1.05), aspect: float = 0.15,
            degrees: float = 10.0, shift: float = 0.1, jitter: float = 0.25) -> torch.Tensor:
    """Random geometry + colour of a uint8 (N, H, W, 3) batch -> float (N, 3, H, W) in [0, 1] (see module doc)."""
    x = to_pixels(images)
    n = x.shape[0]

    def u(lo, hi):
        return torch.rand(n, generator=gen) * (hi - lo) + lo

    s, a, r = u(*zoom), torch.exp(u(-aspect, aspect)), u(-degrees, degrees) * (math.pi / 180)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    sx, sy = flip * s * a.sqrt(), s / a.sqrt()
    theta = torch.stack([torch.stack([sx * r.cos(), -sy * r.sin(), u(-shift, shift)], 1),
                         torch.stack([sx * r.sin(), sy * r.cos(), u(-shift, shift)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    b, c, g = (u(1 - jitter, 1 + jitter).view(n, 1, 1, 1) for _ in range(3))
    grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    mean = grey.mean((2, 3), keepdim=True) * b
    x = (x * b - mean) * c + mean
    grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return (grey + (x - grey) * g).clamp_(0.0, 1.0)


def learning_rate(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def epoch_batches(n: int, batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A shuffled pass over n examples; a last batch under half size is dropped (batch norm needs a few samples)."""
    order = rng.permutation(n)
    cuts = [order[i:i + batch] for i in range(0, n, batch)]
    return [c for c in cuts if len(c) >= max(2, batch // 2)] or [order]


def _save_partial(folder: Path, model, best_state: dict, opt, state: dict) -> None:
    """Model, best model and optimizer tensors (safetensors, packed to contiguous: training runs
    channels-last) and the loop state (JSON) of an unfinished run."""
    from safetensors.torch import save_file

    sd = opt.state_dict()
    pack = lambda d: {k: v.contiguous() for k, v in d.items()}
    save_file(pack(model.state_dict()), str(folder / "model.safetensors"))
    save_file(pack(best_state), str(folder / "best.safetensors"))
    save_file(pack({f"{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items()}), str(folder / "optim.safetensors"))
    (folder / "state.json").write_text(json.dumps({**state, "param_groups": sd["param_groups"]}))


def _load_partial(folder: Path, model, opt) -> tuple[dict, dict]:
    """Inverse of `_save_partial`: fills model and optimizer, returns (loop state, best model state)."""
    from safetensors.torch import load_file

    state = json.loads((folder / "state.json").read_text())
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    params = [p for g in opt.param_groups for p in g["params"]]
    optim: dict[int, dict] = {}
    for key, v in load_file(str(folder / "optim.safetensors")).items():
        i, name = key.split(".", 1)
        p = params[int(i)]  # moments back into the parameter's (channels-last) layout
        optim.setdefault(int(i), {})[name] = torch.empty_like(p).copy_(v) if v.shape == p.shape else v
    opt.load_state_dict({"state": optim, "param_groups": state.pop("param_groups")})
    return state, load_file(str(folder / "best.safetensors"))


def fit(config: CNNConfig, images: np.ndarray, labels: np.ndarray, validate: Callable[[ResNet], dict[str, float]],
        out: Path, hp: dict, epochs: int, seed: int, progress: Callable[[str], None], resume: bool, meta: dict) -> Path:
    """Train on uint8 photos (N, H, W, 3) + class indices; validate after every epoch; keep the epoch
    with the best validation `hp["select"]` (accuracy or macro_f1); stop after `patience` epochs without
    improvement or when the next epoch would pass `max_minutes`. The best model is saved to `out`.

    The cosine schedule ends at `epochs`, or earlier when the first epoch's time says the budget
    cannot fit them all: a schedule cut off by the clock mid-decay leaves a worse model than a
    shorter one that anneals. That choice is stored with the checkpoint, so resuming is exact.

    Every epoch's model, best model and optimizer go to `<out>.partial`; each epoch draws its
    randomness from (seed, epoch), so a resumed run continues exactly as an uninterrupted one.
    """
    threads = torch.get_num_threads()
    # One thread by default: on the shared 2-core machine two threads ran each step ~2x slower (measured).
    torch.set_num_threads(hp.get("threads", 1))
    try:
        return _fit(config, images, labels, validate, Path(out), hp, epochs, seed, progress, resume, meta)
    finally:
        torch.set_num_threads(threads)


def _fit(config, images, labels, validate, out, hp, epochs, seed, progress, resume, meta) -> Path:
    partial = out.with_name(out.name + ".partial")
    keys = ("lr", "weight_decay", "batch", "label_smoothing", "warmup_epochs", "select")
    fingerprint = {"config": config.to_dict(), "seed": seed, "epochs": epochs, **meta, **{k: hp[k] for k in keys},
                   "augment": {k: list(v) if isinstance(v, tuple) else v for k, v in hp["augment"].items()}}
    images, labels = torch.from_numpy(np.ascontiguousarray(images)), torch.as_tensor(labels, dtype=torch.long)
    torch.manual_seed(seed)
    model = ResNet(config).to(memory_format=torch.channels_last)  # oneDNN's fastest conv layout on CPU
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    steps_per_epoch = len(epoch_batches(len(labels), hp["batch"], np.random.default_rng(0)))
    warmup = steps_per_epoch * hp["warmup_epochs"]
    # "horizon": epochs the cosine decay spans; fixed after the first epoch (see fit) and resumed as is.
    state = {"fingerprint": fingerprint, "epoch": 0, "best": -1.0, "best_epoch": 0, "seconds": 0.0,
             "cpu_seconds": 0.0, "horizon": epochs, "history": []}
    best_state = {k: v.clone() for k, v in model.state_dict().items()}
    found = partial  # killed mid-swap: the last checkpoint is still under its "old" name
    if not found.exists():
        found = max(partial.parent.glob(f".{partial.name}.old-*"), key=lambda p: p.stat().st_mtime, default=partial)
    if resume and (found / "state.json").exists():
        if json.loads((found / "state.json").read_text()).get("fingerprint") == fingerprint:
            state, best_state = _load_partial(found, model, opt)
            state.setdefault("horizon", epochs)
            progress(f"resuming after epoch {state['epoch']} from {found}")
        else:
            progress(f"ignoring {found}: it was made with other data or settings")
    progress(f"training a {count_params(model) / 1e6:.2f}M-parameter ResNet on {len(labels)} photos")
    while state["epoch"] < state["horizon"]:
        epoch, t0, c0 = state["epoch"], time.perf_counter(), time.process_time()
        rng, gen = np.random.default_rng([seed, epoch]), torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        torch.manual_seed(seed * 1_000_003 + epoch)  # dropout masks
        model.train()
        losses = []
        for i, idx in enumerate(epoch_batches(len(labels), hp["batch"], rng)):
            for group in opt.param_groups:
                group["lr"] = learning_rate(epoch * steps_per_epoch + i, steps_per_epoch * state["horizon"], hp["lr"],
                                            warmup)
            x = augment(images[idx], gen, **hp["augment"]).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), labels[idx], label_smoothing=hp["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        scores = validate(model)
        score = scores[hp["select"]]
        if score > state["best"]:
            state["best"], state["best_epoch"] = score, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        # CPU seconds are kept beside wall seconds: on a shared machine they show the standalone cost.
        took, cpu = time.perf_counter() - t0, time.process_time() - c0
        state["epoch"], state["seconds"] = epoch + 1, state["seconds"] + took
        state["cpu_seconds"] += cpu
        if epoch == 0 and epochs > 1:  # how many epochs the budget allows at this speed (10% margin)
            state["horizon"] = max(2, min(epochs, int(hp["max_minutes"] * 60 / (1.1 * took))))
            if state["horizon"] < epochs:
                progress(f"the {hp['max_minutes']:g} min budget fits ~{state['horizon']} epochs at this speed: "
                         "the learning-rate schedule ends there")
        state["history"].append({"epoch": epoch + 1, "loss": float(np.mean(losses)),
                                 **{f"val_{k}": v for k, v in scores.items()}, "seconds": took, "cpu_seconds": cpu})
        _swap_in(partial, lambda f, best=best_state: _save_partial(f, model, best, opt, state))
        shown = ", ".join(f"val {k} {v:.4f}" for k, v in scores.items())
        progress(f"epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f}, {shown} ({took:.0f}s, {cpu:.0f}s CPU)")
        if state["epoch"] - state["best_epoch"] >= hp["patience"]:
            progress(f"stopping: no better validation {hp['select']} for {hp['patience']} epochs")
            break
        if state["epoch"] < state["horizon"] and state["seconds"] + took > hp["max_minutes"] * 60:
            progress(f"stopping: the next epoch would pass the {hp['max_minutes']:g} min budget")
            break
    model.load_state_dict(best_state)
    model = model.to(memory_format=torch.contiguous_format).eval()
    best = state["history"][state["best_epoch"] - 1] if state["best_epoch"] else {}
    training = {k: state[k] for k in ("epoch", "best_epoch", "seconds", "cpu_seconds", "horizon", "history")}
    training.update({k: v for k, v in best.items() if k.startswith("val_")}, seed=seed, epochs_planned=epochs,
                    **{k: v for k, v in hp.items() if k != "augment"}, augment=fingerprint["augment"])
    extra = {"dataset": meta.get("dataset"), "training": training}
    _swap_in(out, lambda f: save_cnn(model, f, extra))
    shutil.rmtree(partial, ignore_errors=True)
    return out
