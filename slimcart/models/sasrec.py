"""SASRec: self-attentive sequential recommendation (Kang & McAuley, 2018) as a plain nn.Module.

Every projection is an explicit nn.Linear (q/k/v/o and a two-layer FFN) rather than
nn.MultiheadAttention, so structured pruning and quantization passes can find and reshape them.
The FFN width is stored per block and the hidden size is read back from the weights on load,
so a pruned model round-trips through safetensors without code changes.
"""
from __future__ import annotations

import json
import math
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
    rows = model.item_emb  # looked up by calling it: a compressed table (compress/embeddings) has no float .weight
    n_items = rows.num_embeddings - 1
    pos_logit = (h * rows(pos)).sum(-1)
    if loss == "bce":
        neg = torch.randint(1, n_items + 1, pos.shape, generator=gen)
        neg_logit = (h * rows(neg)).sum(-1)
        return F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit)) + \
            F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit))
    if loss != "sampled_softmax":
        raise ValueError(f"unknown loss '{loss}' (bce or sampled_softmax)")
    if negatives >= n_items:
        return F.cross_entropy(h @ rows(torch.arange(1, n_items + 1)).T, pos - 1)
    neg = torch.randint(1, n_items + 1, (negatives,), generator=gen)
    neg_logit = (h @ rows(neg).T).masked_fill(neg.unsqueeze(0) == pos.unsqueeze(1), MASK_VALUE)
    logits = torch.cat([pos_logit.unsqueeze(1), neg_logit], 1)
    return F.cross_entropy(logits, torch.zeros(len(pos), dtype=torch.long))


# ---------------------------------------------------------------- training (slimcart.training.fit)
class SASRecTask:
    """Next-item training as a task for the shared trainer: examples are users with 2+ items, each
    step's batch is their newest `max_len` (input, next item) pairs, left-padded only to the batch's
    longest history, users of similar history length batched together."""

    def __init__(self, model: SASRec, seqs: list[np.ndarray], hp: dict, validate: Callable[[SASRec], float],
                 fingerprint: dict):
        self.model, self.seqs, self.hp, self._validate, self._fp = model, seqs, hp, validate, fingerprint
        self.users = np.array([u for u, s in enumerate(seqs) if len(s) >= 2], np.int64)
        self.lengths = np.array([min(len(seqs[u]), model.config.max_len + 1) for u in self.users])

    def trainable(self) -> SASRec:
        return self.model

    def student(self) -> SASRec:
        return self.model

    def n_examples(self) -> int:
        return len(self.users)

    def fingerprint(self) -> dict:
        return self._fp

    def arrange(self, order, batch_size: int, rng):
        from ..training import length_bucketed

        return length_bucketed(order, self.lengths, batch_size, rng)

    def loss(self, idx):
        rows = [self.seqs[u][-(self.model.config.max_len + 1):] for u in self.users[idx]]
        L = max(len(r) for r in rows) - 1
        inp, tgt = np.zeros((len(rows), L), np.int64), np.zeros((len(rows), L), np.int64)
        for i, r in enumerate(rows):
            inp[i, L - len(r) + 1:], tgt[i, L - len(r) + 1:] = r[:-1], r[1:]
        loss = sequence_loss(self.model, torch.from_numpy(inp), torch.from_numpy(tgt), self.hp["loss"],
                             self.hp["negatives"], None)  # negatives from the trainer's per-step seed
        return loss, {}

    def validate(self) -> float:
        return self._validate(self.model)

    def score_undistilled(self, model) -> float:
        return self._validate(model)


def fit(config: SASRecConfig, train_seqs: list[np.ndarray], validate: Callable[[SASRec], float], out: Path,
        hp: dict, epochs: int, seed: int, progress: Callable[[str], None], resume: bool, meta: dict) -> Path:
    """Adam on `sequence_loss` with a constant rate, validation every epoch, early stop after
    `patience` epochs without a better score or at `max_minutes`; the best epoch is saved to `out`.
    Checkpoints go to `<out>.partial` (resumed when `resume` and the data and settings match)."""
    from ..training import fit_epochs, publish_trained

    torch.manual_seed(seed)
    model = SASRec(config)
    fingerprint = {"config": config.to_dict(), "seed": seed, **meta, **{k: hp[k] for k in ("lr", "batch", "loss", "negatives")}}
    task = SASRecTask(model, train_seqs, hp, validate, fingerprint)
    res, training = fit_epochs(task, hp, epochs, seed, out, resume, progress, "SASRec", "val_ndcg_at_10")
    extra = {"n_items": config.n_items, "dataset": meta.get("dataset"), "training": training}
    return publish_trained(out, lambda f: save_sasrec(model.eval(), f, extra))
