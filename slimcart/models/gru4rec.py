"""GRU4Rec: a session recommender built on a recurrent network (Hidasi et al., 2016; 2018).

    x_t = E[i_t]                              input item table E: (n_items + 1, D), row 0 = padding
    h_t = GRU_k(... GRU_1(x_t, ...) ...)      k single-layer GRUs of widths H_1..H_k (may differ once pruned)
    s   = W · P(h_T) + b                      scores of ALL items for the click after the last one

Output table, two shapes:
  tied    W = E and P = Linear(H_k, D): one item table serves input and output.
  untied  W = `out.weight` (n_items + 1, H_k), P = identity: `out` is an nn.Linear, so int8 steps
          that quantize Linear layers (per output row = per item) reach the scoring matmul, which
          dominates serving time over 43k items.
Column 0 of the scores is the padding id and never a recommendation. A tied table replaced by a
compressed one (slimcart.compress.embeddings: int8/int4 rows...) is looked up by calling it and
scores through its `scores(h)`, so the same model trains (recovers) and serves with it.

The GRUs are separate single-layer nn.GRU modules (not one multi-layer nn.GRU) because nn.GRU
forces one width on all layers, and hidden-unit pruning needs each layer's width free.

Padding: `forward` takes (B, L) int64 prefixes padded with 0 on either side and first moves every
row's clicks to the left (right padding), so the GRU starts from h_0 = 0 at the first real click
and the state read out is the one after the last click: the scores do not depend on how much
padding a batch carries. That move is a gather, so it is part of the exported ONNX graph too.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Large finite negative for masked logits: -inf would turn a fully masked row into NaN.
MASK_VALUE = -1e9


@dataclass
class GRU4RecConfig:
    """Model shape; JSON-serialisable. `hidden` lists each GRU layer's width."""

    n_items: int
    emb_dim: int = 100
    hidden: list[int] = field(default_factory=lambda: [100])
    tied: bool = False
    dropout_emb: float = 0.0
    dropout_hidden: float = 0.0
    max_len: int = 50  # longest prefix the workload feeds (older clicks are cut); the GRU itself has no limit

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GRU4RecConfig:
        """Build from a config.json dict, ignoring keys this version does not know."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def right_align(seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(clicks moved to the start of each row with zeros after them, number of clicks per row).

    Works for left- and right-padded rows alike: row i's clicks are read from its first non-zero
    position onwards. Assumes the clicks of a row are contiguous (the workload checks inputs).
    """
    present = seq > 0
    n = present.sum(1)
    first = present.to(torch.int64).argmax(1)  # 0 for right-padded rows (and empty ones)
    j = torch.arange(seq.shape[1], device=seq.device).unsqueeze(0)
    idx = (first.unsqueeze(1) + j).clamp(max=seq.shape[1] - 1)
    return seq.gather(1, idx) * (j < n.unsqueeze(1)), n


class GRU4Rec(nn.Module):
    """(B, L) int64 item prefixes (0 = padding, either side) -> (B, n_items + 1) next-item scores."""

    def __init__(self, config: GRU4RecConfig):
        super().__init__()
        c = self.config = config
        if not c.hidden:
            raise ValueError("GRU4Rec needs at least one GRU layer")
        self.item_emb = nn.Embedding(c.n_items + 1, c.emb_dim, padding_idx=0)
        dims = [c.emb_dim, *c.hidden]
        self.grus = nn.ModuleList(nn.GRU(dims[i], dims[i + 1], batch_first=True) for i in range(len(c.hidden)))
        if c.tied:
            self.proj, self.out = nn.Linear(c.hidden[-1], c.emb_dim), None
            self.out_bias = nn.Parameter(torch.zeros(c.n_items + 1))
        else:
            self.proj, self.out, self.out_bias = None, nn.Linear(c.hidden[-1], c.n_items + 1), None
            nn.init.normal_(self.out.weight, std=c.hidden[-1] ** -0.5)
            nn.init.zeros_(self.out.bias)
        self.drop_emb, self.drop_hidden = nn.Dropout(c.dropout_emb), nn.Dropout(c.dropout_hidden)
        nn.init.normal_(self.item_emb.weight, std=c.emb_dim**-0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def encode(self, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(states in output-table space at every position (B, L, D_out), clicks per row (B,)).
        Position t of row i is the state after its (t+1)-th click once the row is right-aligned."""
        x, n = right_align(seq)
        h = self.drop_emb(self.item_emb(x))
        for gru in self.grus:
            h = self.drop_hidden(gru(h)[0])
        return (self.proj(h) if self.proj is not None else h), n

    def output_rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(item vectors (..., D_out), item biases (...)) of items `ids`, the rows scores are dot products with.
        Tied rows are looked up by calling the table, so a compressed table (slimcart.compress.embeddings,
        which has no float .weight) trains and scores through its own lookup."""
        if self.out is not None:
            return self.out.weight[ids], self.out.bias[ids]
        return self.item_emb(ids), self.out_bias[ids]

    def score(self, h: torch.Tensor) -> torch.Tensor:
        """Scores of all items for states h (N, D_out)."""
        if self.out is not None:
            return self.out(h)
        # A compressed item table scores every row on its own kernel; found by duck typing, as models/
        # sits below compress/ and never imports it (SASRec does the same).
        scores = getattr(self.item_emb, "scores", None)
        if scores is not None:
            return scores(h).add_(self.out_bias)  # in place: at 256 x 43k items another copy costs as much as the matmul
        return F.linear(h, self.item_emb.weight, self.out_bias)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        h, n = self.encode(seq)
        last = h[torch.arange(h.shape[0], device=h.device), (n - 1).clamp(min=0)]
        return self.score(last)

    def unit_consumers(self, layer: int) -> tuple[str, list[str]]:
        """(name of GRU `layer`, names of the modules reading its hidden state): what hidden-unit pruning
        of that layer must change together."""
        if not 0 <= layer < len(self.grus):
            raise ValueError(f"layer {layer} out of range (the model has {len(self.grus)} GRU layers)")
        if layer + 1 < len(self.grus):
            return f"grus.{layer}", [f"grus.{layer + 1}"]
        return f"grus.{layer}", ["proj" if self.proj is not None else "out"]

    @staticmethod
    def real_positions(seq: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: the GRU time steps that hold a click (every row's clicks sit at its start once
        `forward` right-aligns it, whichever side the input was padded on)."""
        n = (seq > 0).sum(1, keepdim=True)
        return torch.arange(seq.shape[1], device=seq.device).unsqueeze(0) < n


def actual_config(model: GRU4Rec) -> GRU4RecConfig:
    """The config matching the module's current weights (after any pruning of GRU widths)."""
    c = model.config
    return GRU4RecConfig(
        n_items=model.item_emb.num_embeddings - 1, emb_dim=model.item_emb.embedding_dim,
        hidden=[g.hidden_size for g in model.grus], tied=model.out is None, dropout_emb=c.dropout_emb,
        dropout_hidden=c.dropout_hidden, max_len=c.max_len,
    )


def build_from_state_dict(config: GRU4RecConfig, state: dict[str, torch.Tensor]) -> GRU4Rec:
    """Instantiate with widths read from the weights themselves, then load them strictly."""
    layers = len({k.split(".")[1] for k in state if k.startswith("grus.")})
    hidden = [int(state[f"grus.{i}.weight_hh_l0"].shape[1]) for i in range(layers)]
    cfg = GRU4RecConfig.from_dict({
        **config.to_dict(), "n_items": int(state["item_emb.weight"].shape[0]) - 1,
        "emb_dim": int(state["item_emb.weight"].shape[1]), "hidden": hidden, "tied": "out.weight" not in state,
    })
    model = GRU4Rec(cfg)
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_gru4rec(model: GRU4Rec, folder: Path, extra: dict | None = None) -> None:
    """Write model.safetensors + config.json into `folder` (which must exist)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(Path(folder) / "model.safetensors"))
    cfg = {"model_type": "gru4rec", "model": actual_config(model).to_dict(), **(extra or {})}
    (Path(folder) / "config.json").write_text(json.dumps(cfg, indent=2))


def load_gru4rec(folder: Path) -> tuple[GRU4Rec, dict]:
    """Load a folder written by `save_gru4rec`; returns (module in eval mode, config.json dict)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    if not isinstance(cfg, dict) or cfg.get("model_type") != "gru4rec" or "model" not in cfg:
        raise ValueError(f"{folder / 'config.json'} is not a GRU4Rec config (model_type != 'gru4rec')")
    state = load_file(str(folder / "model.safetensors"))
    return build_from_state_dict(GRU4RecConfig.from_dict(cfg["model"]), state), cfg


def next_item_loss(model: GRU4Rec, seq: torch.Tensor, targets: torch.Tensor, negatives: int,
                   sampling_probs: torch.Tensor | None, gen: torch.Generator | None) -> torch.Tensor:
    """Cross-entropy of the next click at every non-padding position (seq, targets: (B, L), right-padded).

    Sampled softmax (Jean et al., 2015): the true item competes with `negatives` items drawn once per
    batch from q (default uniform over 1..n_items, else `sampling_probs`, e.g. popularity^alpha);
    every logit o_i becomes o_i - log(K q_i), which makes the sampled loss estimate the full softmax
    whatever q is; a sampled item equal to the true one is masked out. negatives >= n_items: full softmax.
    `gen` None draws from torch's global generator (the trainer seeds it per step).
    """
    h, _ = model.encode(seq)
    mask = targets > 0
    h, pos = h[mask], targets[mask]
    n_items = model.config.n_items
    if negatives >= n_items:
        return F.cross_entropy(model.score(h)[:, 1:], pos - 1)
    q = sampling_probs if sampling_probs is not None else torch.full((n_items + 1,), 1.0 / n_items).index_fill(0, torch.tensor([0]), 0.0)
    neg = torch.multinomial(q, negatives, replacement=True, generator=gen)
    log_kq = torch.log(q * negatives)
    w_pos, b_pos = model.output_rows(pos)
    w_neg, b_neg = model.output_rows(neg)
    pos_logit = (h * w_pos).sum(-1) + b_pos - log_kq[pos]
    neg_logit = F.linear(h, w_neg, b_neg - log_kq[neg]).masked_fill(neg.unsqueeze(0) == pos.unsqueeze(1), MASK_VALUE)
    logits = torch.cat([pos_logit.unsqueeze(1), neg_logit], 1)
    return F.cross_entropy(logits, torch.zeros(len(pos), dtype=torch.long))
