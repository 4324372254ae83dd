"""DIN: the Deep Interest Network CTR model (Zhou et al., KDD 2018) as a plain nn.Module.

    p(click | user, candidate, history, fields) = sigmoid(MLP([e_f for each field f] ++ [v_U] ++ [dense]))
    v_U = sum_j a(e_{h_j}, e_t) * e_{h_j}            (no softmax: the pooled norm keeps "how much interest")
    a(h, t) = MLP_att([h, t, h - t, h * t])          (DIN's local activation unit; padding positions masked)

`e_f` are rows of per-field embedding tables, `e_{h_j}` rows of the table the behaviour history looks
up (the candidate item's table: DIN shares the goods embedding between candidate and history), `e_t`
the candidate's row. Without a history (field-only CTR logs such as iPinYou/Criteo) the model is
DIN's own base model, "Embedding & MLP".

Why DIN: the shop protocol here is "does this user's behaviour history predict the candidate?", the
case DIN was designed for; its parameters are almost all embedding rows and its dense part is two
small MLPs, so compressing the tables is what moves its size.

Layout for the embedding-compression techniques: every table is a plain `nn.Embedding` attribute
named `emb_<table>`; `embedding_tables()` returns them by attribute name, so replacing a table is
`setattr(model, name, new_module)` (anything mapping int64 ids (...) to float rows (..., dim)).
Lookups (`lookup`) are separate from the dense part (`score`). Activations are PReLU (DIN's
baseline activation; its Dice adds batch statistics that buy little at this scale).
Output: one logit per row (sigmoid gives the click probability).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

MODEL_TYPE = "ctr-din"
FREQUENCIES_FILE = "frequencies.safetensors"


@dataclass
class DINConfig:
    """Model shape (JSON-serialisable).

    tables: table name -> rows. fields: per column of the `sparse` input, the table it looks up.
    history_table / target_field: the table history ids look up and the `sparse` column holding the
    candidate (None: no behaviour history). n_dense: numeric inputs appended to the MLP input.
    """

    tables: dict[str, int]
    fields: list[str]
    dim: int = 32
    history_table: str | None = None
    target_field: int | None = None
    n_dense: int = 0
    max_len: int = 50
    attention_hidden: list[int] = field(default_factory=lambda: [80, 40])
    mlp_hidden: list[int] = field(default_factory=lambda: [200, 80])
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DINConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DIN config key(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    def check(self) -> None:
        for name in [*self.fields, *([self.history_table] if self.history_table else [])]:
            if name not in self.tables:
                raise ValueError(f"field table '{name}' is not among the tables {sorted(self.tables)}")
        for name in self.tables:
            if not name.isidentifier():
                raise ValueError(f"table name '{name}' must be a Python identifier")
        if (self.history_table is None) != (self.target_field is None):
            raise ValueError("history_table and target_field go together")
        if self.target_field is not None and self.fields[self.target_field] != self.history_table:
            raise ValueError("the target field must look up the history table")


def mlp(sizes: list[int], dropout: float) -> nn.Sequential:
    """Linear -> PReLU (one slope per layer; works on (B, dim) and (B, L, dim)) (-> Dropout) per hidden
    layer, then a final Linear without activation."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(a, b), nn.PReLU()] + ([nn.Dropout(dropout)] if dropout else [])
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*layers)


class DIN(nn.Module):
    """sparse (B, F) int64 [+ hist (B, L) int64 left-padded with 0] [+ dense (B, N) float] -> logits (B,)."""

    def __init__(self, config: DINConfig):
        super().__init__()
        config.check()
        c = self.config = config
        for name, rows in c.tables.items():
            table = nn.Embedding(rows, c.dim)
            nn.init.normal_(table.weight, std=0.01)  # small rows: untrained ids (cold items) stay near zero
            self.add_module(f"emb_{name}", table)
        width = len(c.fields) * c.dim + (c.dim if c.history_table else 0) + c.n_dense
        if c.history_table:
            self.attention = mlp([4 * c.dim, *c.attention_hidden, 1], 0.0)
        self.mlp = mlp([width, *c.mlp_hidden, 1], c.dropout)

    def embedding_tables(self) -> dict[str, nn.Module]:
        """Attribute name -> table module; `setattr(model, name, new)` swaps one."""
        return {f"emb_{name}": getattr(self, f"emb_{name}") for name in self.config.tables}

    def lookup(self, sparse: torch.Tensor, hist: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Embedding rows only: one (B, dim) per field, and (B, L, dim) for the history (or None). The
        candidate and its history share a table and are looked up in one call (one kernel launch, not
        two: at batch 1 a compressed table's lookup costs several small ops)."""
        c = self.config
        if hist is None:
            return [getattr(self, f"emb_{name}")(sparse[:, i]) for i, name in enumerate(c.fields)], None
        rows = [getattr(self, f"emb_{name}")(sparse[:, i]) if i != c.target_field else None
                for i, name in enumerate(c.fields)]
        b, length = hist.shape
        both = getattr(self, f"emb_{c.history_table}")(torch.cat([sparse[:, c.target_field], hist.reshape(-1)]))
        rows[c.target_field] = both[:b]
        return rows, both[b:].view(b, length, -1)

    def interest(self, h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """DIN's weighted sum pooling: sum_j a(h_j, t) h_j over non-padding positions (B, dim)."""
        t = target.unsqueeze(1).expand_as(h)
        a = self.attention(torch.cat([h, t, h - t, h * t], -1)).squeeze(-1) * mask
        return (a.unsqueeze(-1) * h).sum(1)

    def score(self, rows: list[torch.Tensor], h: torch.Tensor | None, mask: torch.Tensor | None,
              dense: torch.Tensor | None) -> torch.Tensor:
        """The dense part: interest pooling + MLP over the looked-up rows -> logits (B,)."""
        parts = list(rows)
        if self.config.history_table:
            parts.append(self.interest(h, rows[self.config.target_field], mask))
        if self.config.n_dense:
            parts.append(dense.to(parts[0].dtype))
        return self.mlp(torch.cat(parts, -1)).squeeze(-1)

    def forward(self, sparse: torch.Tensor, hist: torch.Tensor | None = None, dense: torch.Tensor | None = None,
                label: torch.Tensor | None = None) -> torch.Tensor:
        """`label` is accepted and ignored so that labelled training/calibration batches can be fed as
        `model(**batch)`; the loss reads it from the batch (see the ctr workload's task_loss)."""
        c = self.config
        if (hist is None) != (c.history_table is None) or (dense is None) != (c.n_dense == 0):
            raise ValueError(f"this DIN takes sparse{', hist' if c.history_table else ''}"
                             f"{', dense' if c.n_dense else ''}; got sparse{', hist' if hist is not None else ''}"
                             f"{', dense' if dense is not None else ''}")
        if hist is not None and hist.dtype != torch.int64:  # catches dense passed positionally into `hist`
            raise ValueError("hist must hold int64 item ids; pass numeric features as dense=")
        rows, h = self.lookup(sparse, hist)
        return self.score(rows, h, (hist > 0).to(rows[0].dtype) if hist is not None else None, dense)


@torch.no_grad()
def fold_into_output(model: DIN, scale: float, shift: float) -> None:
    """Make the model output `scale * logit + shift` by rescaling its last Linear (no new parameters)."""
    out = model.mlp[-1]
    out.weight.mul_(scale)
    out.bias.mul_(scale).add_(shift)


def parameter_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the embedding tables (parameters + buffers of `embedding_tables()`) vs everything else."""
    def nbytes(m: nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])

    emb = sum(nbytes(m) for m in model.embedding_tables().values())
    return {"embedding": emb, "dense": nbytes(model) - emb}


# ---------------------------------------------------------------- saving
def save_din(model: DIN, folder: Path, extra: dict | None = None, frequencies: dict | None = None) -> None:
    """config.json + model.safetensors (+ frequencies.safetensors: training-set count of every row of
    every table, keyed like `embedding_tables()`) into an existing folder."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    if frequencies is not None:
        save_file({k: torch.as_tensor(v, dtype=torch.int64).contiguous() for k, v in frequencies.items()},
                  str(folder / FREQUENCIES_FILE))
    cfg = {"model_type": MODEL_TYPE, "model": model.config.to_dict(), **(extra or {})}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def load_din(folder: Path) -> tuple[DIN, dict]:
    """A folder written by `save_din` -> (model in eval mode, config.json dict). Errors are ValueErrors."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())
    if not isinstance(cfg, dict) or cfg.get("model_type") != MODEL_TYPE or "model" not in cfg:
        raise ValueError(f"{folder / 'config.json'} is not a DIN config (model_type != '{MODEL_TYPE}')")
    state = load_file(str(folder / "model.safetensors"))
    with torch.device("meta"):  # shapes only: a config asking for huge tables allocates nothing
        model = DIN(DINConfig.from_dict(cfg["model"]))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise ValueError(f"weights do not match config.json at {', '.join(diff[:3])}"
                         f" (config {want.get(diff[0])}, weights {got.get(diff[0])})")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval(), cfg


def load_frequencies(folder: Path) -> dict[str, torch.Tensor]:
    """Training-set count per row of each table ({} when the folder has none)."""
    from safetensors.torch import load_file

    f = Path(folder) / FREQUENCIES_FILE
    return load_file(str(f)) if f.exists() else {}
