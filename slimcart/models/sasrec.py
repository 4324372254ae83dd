"""SASRec: self-attentive sequential recommendation (Kang & McAuley, 2018) as a plain nn.Module.

Every projection is an explicit nn.Linear (q/k/v/o and a two-layer FFN) rather than
nn.MultiheadAttention, so structured pruning and quantization passes can find and reshape them.
The FFN width is stored per block and the hidden size is read back from the weights on load,
so a pruned model round-trips through safetensors without code changes.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Large finite negative rather than -inf: a query whose keys are all padding then gets a uniform
# (harmless, later zeroed) attention row instead of NaNs that would leak into the gradients.
MASK_VALUE = -1e9


@dataclass
class SASRecConfig:
    """Model shape; JSON-serialisable. `ffn` is the inner FFN width per block (None = hidden)."""

    n_items: int
    max_len: int = 50
    hidden: int = 64
    heads: int = 2
    layers: int = 2
    dropout: float = 0.2
    ffn: list[int] | None = None
    # Scales fixed at training time (None = sqrt(hidden) and 1/sqrt(head dim)); recorded so that a
    # model whose widths were pruned still computes the same function after a reload.
    emb_scale: float | None = None
    attn_scale: float | None = None

    def ffn_dims(self) -> list[int]:
        """Inner FFN width of each block."""
        return list(self.ffn) if self.ffn else [self.hidden] * self.layers

    def to_dict(self) -> dict:
        """Plain dict for config.json."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SASRecConfig":
        """Build from a config.json dict, ignoring keys this version does not know."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with explicit q/k/v/o projections and an additive mask."""

    def __init__(self, hidden: int, heads: int, dropout: float, inner: int | None = None, scale: float | None = None):
        super().__init__()
        inner = inner or hidden
        self.heads, self.scale = heads, scale or (inner // heads) ** -0.5
        self.q, self.k, self.v = nn.Linear(hidden, inner), nn.Linear(hidden, inner), nn.Linear(hidden, inner)
        self.o = nn.Linear(inner, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, L, _ = x.shape

        def split(t):  # (B, L, inner) -> (B, heads, L, inner/heads); -1 so pruned widths still work
            return t.reshape(b, L, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = (q @ k.transpose(-1, -2)) * self.scale + bias
        att = self.drop(att.softmax(-1))
        return self.o((att @ v).transpose(1, 2).reshape(b, L, -1))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN x), then x + FFN(LN x)."""

    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float, attn_inner: int | None = None,
                 attn_scale: float | None = None):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = CausalSelfAttention(hidden, heads, dropout, attn_inner, attn_scale)
        self.fc1, self.fc2 = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), bias))
        return x + self.drop(self.fc2(self.drop(F.relu(self.fc1(self.ln2(x))))))


class SASRec(nn.Module):
    """Left-padded item history (B, L) int64 -> next-item scores (B, n_items + 1); column 0 is padding."""

    def __init__(self, config: SASRecConfig, attn_inner: list[int] | None = None):
        super().__init__()
        c = self.config = config
        self.item_emb = nn.Embedding(c.n_items + 1, c.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(c.max_len, c.hidden)
        inner = attn_inner or [c.hidden] * c.layers
        self.blocks = nn.ModuleList(
            Block(c.hidden, c.heads, f, c.dropout, a, c.attn_scale) for f, a in zip(c.ffn_dims(), inner)
        )
        self.emb_scale = c.emb_scale or math.sqrt(c.hidden)
        self.ln = nn.LayerNorm(c.hidden)
        self.drop = nn.Dropout(c.dropout)
        self.register_buffer("causal", torch.ones(c.max_len, c.max_len, dtype=torch.bool).tril(), persistent=False)
        nn.init.normal_(self.item_emb.weight, std=c.hidden**-0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        """Hidden state at every position (B, L, hidden); position t only sees items 0..t."""
        seq = seq[:, -self.config.max_len :]
        L = seq.shape[1]
        keep = (seq > 0).unsqueeze(-1)
        # Left padding: the newest item always sits at the last position embedding, whatever L is,
        # so training on batches cut to their longest history matches serving at max_len.
        pos = self.pos_emb.weight[self.config.max_len - L :]
        x = self.item_emb(seq) * self.emb_scale + pos
        x = self.drop(x) * keep
        allowed = self.causal[:L, :L].unsqueeze(0) & keep.transpose(1, 2)  # (B, L query, L key)
        bias = torch.where(allowed, 0.0, MASK_VALUE).unsqueeze(1)  # broadcast over heads
        for block in self.blocks:
            x = block(x, bias) * keep
        return self.ln(x)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """Scores of every item as the user's next interaction, from the last position's state."""
        h = self.encode(seq)[:, -1]
        # A compressed item table (slimcart.compress.embeddings) scores all rows on its own kernel;
        # looked up by duck typing, as models/ sits below compress/ and never imports it.
        scores = getattr(self.item_emb, "scores", None)
        return scores(h) if scores is not None else h @ self.item_emb.weight.T


def actual_config(model: SASRec) -> SASRecConfig:
    """The config matching the module's current weights (after any pruning of hidden/FFN widths)."""
    c, hidden, attn = model.config, model.item_emb.embedding_dim, model.blocks[0].attn
    # Scales are written only when they differ from what the widths imply, so a fresh config built
    # from this one (e.g. a narrower student) gets the defaults for its own widths.
    emb_scale = None if math.isclose(model.emb_scale, math.sqrt(hidden)) else model.emb_scale
    attn_scale = None if math.isclose(attn.scale, (attn.q.out_features // attn.heads) ** -0.5) else attn.scale
    return SASRecConfig(
        n_items=model.item_emb.num_embeddings - 1, max_len=c.max_len, hidden=hidden, heads=attn.heads,
        layers=len(model.blocks), dropout=c.dropout, ffn=[b.fc1.out_features for b in model.blocks],
        emb_scale=emb_scale, attn_scale=attn_scale,
    )


def build_from_state_dict(config: SASRecConfig, state: dict[str, torch.Tensor]) -> SASRec:
    """Instantiate with widths taken from the weights themselves, then load them strictly."""
    layers = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    cfg = SASRecConfig.from_dict({
        **config.to_dict(), "n_items": state["item_emb.weight"].shape[0] - 1,
        "hidden": state["item_emb.weight"].shape[1], "layers": layers,
        "ffn": [int(state[f"blocks.{i}.fc1.weight"].shape[0]) for i in range(layers)],
    })
    inner = [int(state[f"blocks.{i}.attn.q.weight"].shape[0]) for i in range(layers)]
    model = SASRec(cfg, attn_inner=inner)
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_sasrec(model: SASRec, folder: Path, extra: dict | None = None) -> None:
    """Write model.safetensors + config.json into `folder` (which must exist)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    cfg = {"model_type": "sasrec", "model": actual_config(model).to_dict(), **(extra or {})}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def load_sasrec(folder: Path) -> tuple[SASRec, dict]:
    """Load a folder written by `save_sasrec`; returns (module in eval mode, config.json dict)."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("model_type") != "sasrec" or "model" not in cfg:
        raise ValueError(f"{folder / 'config.json'} is not a SASRec config (model_type != 'sasrec')")
    state = load_file(str(folder / "model.safetensors"))
    return build_from_state_dict(SASRecConfig.from_dict(cfg["model"]), state), cfg


def sequence_loss(
    model: SASRec, seq: torch.Tensor, targets: torch.Tensor, loss: str, negatives: int, gen: torch.Generator
) -> torch.Tensor:
    """Next-item loss at every non-padding position of a batch (seq and targets both (B, L)).

    loss="bce": one uniformly sampled negative per position (the original SASRec objective).
    loss="sampled_softmax": softmax over the positive and `negatives` uniform items shared by the
    batch, accidental hits masked out; with negatives >= n_items it is the full softmax.
    """
    h = model.encode(seq)
    mask = targets > 0
    h, pos = h[mask], targets[mask]
    W = model.item_emb.weight
    n_items = W.shape[0] - 1
    pos_logit = (h * W[pos]).sum(-1)
    if loss == "bce":
        neg = torch.randint(1, n_items + 1, pos.shape, generator=gen)
        neg_logit = (h * W[neg]).sum(-1)
        return F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit)) + \
            F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit))
    if loss != "sampled_softmax":
        raise ValueError(f"unknown loss '{loss}' (bce or sampled_softmax)")
    if negatives >= n_items:
        return F.cross_entropy(h @ W[1:].T, pos - 1)
    neg = torch.randint(1, n_items + 1, (negatives,), generator=gen)
    neg_logit = (h @ W[neg].T).masked_fill(neg.unsqueeze(0) == pos.unsqueeze(1), MASK_VALUE)
    logits = torch.cat([pos_logit.unsqueeze(1), neg_logit], 1)
    return F.cross_entropy(logits, torch.zeros(len(pos), dtype=torch.long))


# ---------------------------------------------------------------- training with resumable checkpoints
def training_batches(seqs: list[np.ndarray], max_len: int, batch: int, rng: np.random.Generator):
    """Yield (input, target) int64 batches, left-padded only to each batch's longest history.

    Users are shuffled, then sorted by length inside windows of 32 batches: most histories are far
    shorter than max_len, so this cuts the attention work several-fold without a fixed user grouping.
    """
    users = [u for u in rng.permutation(len(seqs)) if len(seqs[u]) >= 2]
    window, batches = batch * 32, []
    for a in range(0, len(users), window):
        chunk = sorted(users[a:a + window], key=lambda u: len(seqs[u]))
        batches += [chunk[i:i + batch] for i in range(0, len(chunk), batch)]
    for j in rng.permutation(len(batches)):
        rows = [seqs[u][-(max_len + 1):] for u in batches[j]]
        L = max(len(r) for r in rows) - 1
        inp, tgt = np.zeros((len(rows), L), np.int64), np.zeros((len(rows), L), np.int64)
        for i, r in enumerate(rows):
            inp[i, L - len(r) + 1:], tgt[i, L - len(r) + 1:] = r[:-1], r[1:]
        yield torch.from_numpy(inp), torch.from_numpy(tgt)


def _swap_in(final: Path, write: Callable[[Path], None]) -> None:
    """Write a folder under a temporary name, then rename it over `final` (never a half-written folder)."""
    tmp, old = final.with_name(f".{final.name}.tmp-{os.getpid()}"), final.with_name(f".{final.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _save_partial(folder: Path, model, best_state, opt, state: dict) -> None:
    from safetensors.torch import save_file

    sd = opt.state_dict()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in best_state.items()}, str(folder / "best.safetensors"))
    save_file({f"{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items()}, str(folder / "optim.safetensors"))
    (folder / "state.json").write_text(json.dumps({**state, "param_groups": sd["param_groups"]}))


def _load_partial(folder: Path, model, opt) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    state = json.loads((folder / "state.json").read_text())
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    optim: dict[int, dict] = {}
    for key, v in load_file(str(folder / "optim.safetensors")).items():
        i, name = key.split(".", 1)
        optim.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": optim, "param_groups": state.pop("param_groups")})
    return state, load_file(str(folder / "best.safetensors"))


def fit(config: SASRecConfig, train_seqs: list[np.ndarray], validate: Callable[[SASRec], float], out: Path,
        hp: dict, epochs: int, seed: int, progress: Callable[[str], None], resume: bool, meta: dict) -> Path:
    """Adam on `sequence_loss`, validation each epoch, early stop after `patience` epochs without a
    better score or when `max_minutes` would be exceeded; the best epoch is saved to `out`.

    Every epoch's model, best model and optimizer go to `<out>.partial`; each epoch draws its
    randomness from (seed, epoch), so a resumed run continues exactly as an uninterrupted one.
    """
    # One intra-op thread by default: these batches are tiny, and on a shared 2-core machine two
    # OpenMP threads waiting on each other ran each step ~10x slower than one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(hp.get("threads", 1))
    try:
        return _fit(config, train_seqs, validate, out, hp, epochs, seed, progress, resume, meta)
    finally:
        torch.set_num_threads(threads)


def _fit(config, train_seqs, validate, out, hp, epochs, seed, progress, resume, meta) -> Path:
    partial = out.with_name(out.name + ".partial")
    fingerprint = {"config": config.to_dict(), "seed": seed, **meta,
                   **{k: hp[k] for k in ("lr", "batch", "loss", "negatives")}}
    torch.manual_seed(seed)
    model = SASRec(config)
    opt = torch.optim.Adam(model.parameters(), lr=hp["lr"], fused=True)  # one kernel per step, not ~10 passes
    state = {"fingerprint": fingerprint, "epoch": 0, "best": -1.0, "best_epoch": 0, "seconds": 0.0, "cpu_seconds": 0.0,
             "history": []}
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
        for inp, tgt in training_batches(train_seqs, config.max_len, hp["batch"], rng):
            loss = sequence_loss(model, inp, tgt, hp["loss"], hp["negatives"], gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        score = validate(model)
        if score > state["best"]:
            state["best"], state["best_epoch"] = score, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        # CPU seconds are kept beside wall seconds: on a shared machine they show the standalone cost.
        took, cpu = time.perf_counter() - t0, time.process_time() - c0
        state["epoch"], state["seconds"] = epoch + 1, state["seconds"] + took
        state["cpu_seconds"] += cpu
        state["history"].append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_ndcg@10": score,
                                 "seconds": took, "cpu_seconds": cpu})
        _swap_in(partial, lambda f: _save_partial(f, model, best_state, opt, state))
        progress(f"epoch {epoch + 1}: loss {np.mean(losses):.4f}, val NDCG@10 {score:.4f} ({took:.0f}s, {cpu:.0f}s CPU)")
        if state["epoch"] - state["best_epoch"] >= hp["patience"]:
            break
        if state["seconds"] + took > hp["max_minutes"] * 60:
            progress(f"stopping: the next epoch would pass the {hp['max_minutes']:g} min budget")
            break
    model.load_state_dict(best_state)
    training = {k: state[k] for k in ("epoch", "best_epoch", "seconds", "cpu_seconds", "history")}
    training.update(val_ndcg_at_10=state["best"], seed=seed, **{k: hp[k] for k in hp})
    extra = {"n_items": config.n_items, "dataset": meta.get("dataset"), "training": training}
    _swap_in(out, lambda f: save_sasrec(model.eval(), f, extra))
    shutil.rmtree(partial, ignore_errors=True)
    return out
