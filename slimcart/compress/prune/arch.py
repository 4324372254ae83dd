"""Where the prunable parts of a supported model live: its blocks, attention and FFN projections.

Supported: Hugging Face BERT encoders (also inside slimcart's SentenceEncoder), Llama decoders
(also inside slimcart's CausalLM; GQA aware) and slimcart's SASRec. Everything structural in
this package goes through these handles, so adding an architecture means adding one adapter here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import SlimcartError


@dataclass
class Attn:
    """Projections of one attention block; rows of q/k/v and columns of o are per head."""

    owner: nn.Module  # module whose head-count attributes must follow the weights
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    head_dim: int

    @property
    def n_heads(self) -> int:
        return self.q.out_features // self.head_dim

    @property
    def n_kv(self) -> int:
        return self.k.out_features // self.head_dim


@dataclass
class Ffn:
    """Feed-forward block: every `ups` row and `down` column belongs to one neuron."""

    ups: list[nn.Linear]
    down: nn.Linear

    @property
    def width(self) -> int:
        return self.down.in_features


@dataclass
class Arch:
    kind: str  # "bert" | "llama" | "sasrec"
    base: nn.Module  # BertModel / LlamaModel / SASRec
    config: Any  # the HF config, or SASRecConfig

    @property
    def layers(self) -> nn.ModuleList:
        return {"bert": lambda: self.base.encoder.layer, "llama": lambda: self.base.layers,
                "sasrec": lambda: self.base.blocks}[self.kind]()

    def attn(self, layer: nn.Module) -> Attn:
        if self.kind == "bert":
            s = layer.attention.self
            return Attn(s, s.query, s.key, s.value, layer.attention.output.dense, s.attention_head_size)
        if self.kind == "llama":
            a = layer.self_attn
            return Attn(a, a.q_proj, a.k_proj, a.v_proj, a.o_proj, a.head_dim)
        a = layer.attn
        return Attn(a, a.q, a.k, a.v, a.o, a.q.out_features // a.heads)

    def ffn(self, layer: nn.Module) -> Ffn:
        if self.kind == "bert":
            return Ffn([layer.intermediate.dense], layer.output.dense)
        if self.kind == "llama":
            return Ffn([layer.mlp.gate_proj, layer.mlp.up_proj], layer.mlp.down_proj)
        return Ffn([layer.fc1], layer.fc2)


def detect(module: nn.Module) -> Arch:
    """The supported architecture inside `module` (the first one found in module order)."""
    from ...models.sasrec import SASRec

    for m in module.modules():
        if isinstance(m, SASRec):
            return Arch("sasrec", m, m.config)
        cfg = getattr(m, "config", None)
        model_type = getattr(cfg, "model_type", None)
        if model_type == "bert" and hasattr(m, "encoder") and hasattr(m.encoder, "layer"):
            return Arch("bert", m, cfg)
        if model_type == "llama" and isinstance(getattr(m, "layers", None), nn.ModuleList):
            return Arch("llama", m, cfg)
    raise SlimcartError(f"structured/layer-wise pruning supports BERT encoders, Llama decoders and SASRec; "
                        f"found {type(module).__name__}")


def layer_prefix(root: nn.Module, arch: Arch) -> str:
    """Qualified name of the block list inside `root` (e.g. 'transformer.encoder.layer')."""
    target = arch.layers
    for name, m in root.named_modules():
        if m is target:
            return name
    raise SlimcartError("could not locate the transformer blocks inside the model")


def run_model(module: nn.Module, batch: dict) -> Any:
    """Forward one workload batch (numpy or tensor values) through the torch module."""
    feeds = {k: torch.as_tensor(v) for k, v in batch.items() if k != "max_new_tokens"}
    return module(**feeds)
