"""Model structure in one place: which modules of a supported architecture are its blocks, attention
and FFN projections, its embeddings and (for decoders) its LM head; how to run a batch through it;
and the one layer selector every step uses to choose layers by name.

Adapters: Hugging Face BERT encoders (also inside a sentence encoder wrapper), Llama-style decoders
(also inside a causal-LM wrapper; GQA aware) and slimcart's SASRec. A new architecture is one
`@register_arch` finder here. Techniques use these handles and never ask which workload they run on.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from .errors import SlimcartError


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
    """Handles into one supported model. `root` is the module `detect` was given (e.g. a wrapper)."""

    kind: str  # "bert" | "llama" | "sasrec"
    root: nn.Module
    base: nn.Module  # BertModel / LlamaModel / SASRec: owns the block list
    config: Any  # the HF config, or SASRecConfig
    layers_attr: str  # attribute path from `base` to the block list
    depth_attr: str  # config attribute holding the number of blocks
    attn_of: Callable[[nn.Module], Attn]
    ffn_of: Callable[[nn.Module], Ffn]
    lm: nn.Module | None = None  # decoders: the *ForCausalLM holding `lm_head`

    @property
    def layers(self) -> nn.ModuleList:
        return _get(self.base, self.layers_attr)

    def attn(self, layer: nn.Module) -> Attn:
        return self.attn_of(layer)

    def ffn(self, layer: nn.Module) -> Ffn:
        return self.ffn_of(layer)

    @property
    def layers_path(self) -> str:
        """Qualified name of the block list inside `root` (e.g. 'transformer.encoder.layer')."""
        target = self.layers
        for name, m in self.root.named_modules():
            if m is target:
                return name
        raise SlimcartError("could not locate the transformer blocks inside the model")

    def set_layers(self, keep: list[int]) -> None:
        """Keep only blocks `keep` (in that order), in place, and make the config say so."""
        old = self.layers
        parent_path, _, name = self.layers_attr.rpartition(".")
        setattr(_get(self.base, parent_path) if parent_path else self.base, name, nn.ModuleList(old[i] for i in keep))
        setattr(self.config, self.depth_attr, len(keep))
        if isinstance(getattr(self.config, "layer_types", None), list):  # per-layer settings (sliding window etc.)
            self.config.layer_types = [self.config.layer_types[i] for i in keep]
        for new_idx, layer in enumerate(self.layers):  # KV-cache slots are indexed by position in the stack
            for m in layer.modules():
                if hasattr(m, "layer_idx"):
                    m.layer_idx = new_idx


def _get(obj, path: str):
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


FINDERS: list[Callable[[nn.Module, nn.Module], Arch | None]] = []


def register_arch(finder: Callable[[nn.Module, nn.Module], Arch | None]):
    """Add an adapter: `finder(root, m)` returns an Arch when submodule `m` is the model's base."""
    FINDERS.append(finder)
    return finder


@register_arch
def _bert(root, m):
    cfg = getattr(m, "config", None)
    if getattr(cfg, "model_type", None) != "bert" or not hasattr(getattr(m, "encoder", None), "layer"):
        return None

    def attn(layer):
        s = layer.attention.self
        return Attn(s, s.query, s.key, s.value, layer.attention.output.dense, s.attention_head_size)

    return Arch("bert", root, m, cfg, "encoder.layer", "num_hidden_layers", attn,
                lambda layer: Ffn([layer.intermediate.dense], layer.output.dense))


@register_arch
def _llama(root, m):
    cfg = getattr(m, "config", None)
    if getattr(cfg, "model_type", None) not in ("llama", "mistral", "qwen2") or not isinstance(getattr(m, "layers", None), nn.ModuleList):
        return None
    lm = next((p for p in root.modules() if getattr(p, "model", None) is m and hasattr(p, "lm_head")), None)

    def attn(layer):
        a = layer.self_attn
        return Attn(a, a.q_proj, a.k_proj, a.v_proj, a.o_proj, a.head_dim)

    return Arch("llama", root, m, cfg, "layers", "num_hidden_layers", attn,
                lambda layer: Ffn([layer.mlp.gate_proj, layer.mlp.up_proj], layer.mlp.down_proj), lm)


@register_arch
def _sasrec(root, m):
    from .models.sasrec import SASRec

    if not isinstance(m, SASRec):
        return None

    def attn(layer):
        a = layer.attn
        return Attn(a, a.q, a.k, a.v, a.o, a.q.out_features // a.heads)

    return Arch("sasrec", root, m, m.config, "blocks", "layers", attn, lambda layer: Ffn([layer.fc1], layer.fc2))


def detect(module: nn.Module) -> Arch:
    """The supported architecture inside `module` (the first one found in module order)."""
    for m in module.modules():
        for finder in FINDERS:
            arch = finder(module, m)
            if arch is not None:
                return arch
    raise SlimcartError(f"slimcart knows the structure of BERT encoders, Llama-style decoders and SASRec; "
                        f"found {type(module).__name__} (add an adapter in slimcart/arch.py)")


def causal_lm(module: nn.Module) -> nn.Module:
    """The Hugging Face *ForCausalLM inside a wrapper (the module that owns `lm_head`)."""
    try:
        lm = detect(module).lm
    except SlimcartError:
        lm = None
    if lm is None:
        raise SlimcartError("this technique needs a decoder LM with model.layers and lm_head (e.g. Llama)")
    return lm


# ---------------------------------------------------------------- running a batch
def output_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a forward's result: first of a tuple, `.logits` of a model output."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple"):
        return out[0]
    return out


def run_batch(module: nn.Module, batch: dict) -> torch.Tensor:
    """Forward one workload batch (numpy or tensor values) and return its main output tensor.
    Keys a model does not take as inputs (decode length, labels) are left out."""
    feeds = {k: torch.as_tensor(v) for k, v in batch.items() if k not in ("max_new_tokens", "labels")}
    return output_tensor(module(**feeds))


# ---------------------------------------------------------------- choosing layers
class LayerSelect(BaseModel):
    """Which layers a step touches, by module name (fnmatch patterns): in `targets`, not in `exclude`.
    Steps with per-layer settings add an `overrides: {pattern: setting}` field read by `first_match`."""

    model_config = ConfigDict(extra="forbid")
    targets: list[str] = ["*"]
    exclude: list[str] = []

    def selects(self, name: str) -> bool:
        return matches(name, self.targets) and not matches(name, self.exclude)

    def pick(self, module: nn.Module, types: tuple[type, ...] = (nn.Linear,), untied: bool = False) -> dict[str, nn.Module]:
        """Selected modules of the given types, in module order. `untied`: leave out modules whose
        weight another module shares (a tied LM head / input embedding)."""
        owners: dict[int, int] = {}
        if untied:
            for _, m in module.named_modules():
                if isinstance(getattr(m, "weight", None), torch.Tensor):
                    owners[id(m.weight)] = owners.get(id(m.weight), 0) + 1
        return {n: m for n, m in module.named_modules()
                if isinstance(m, types) and self.selects(n) and (not untied or owners[id(m.weight)] == 1)}


def matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def first_match(name: str, overrides: dict[str, Any]) -> Any:
    """The setting of the first pattern in `overrides` that matches `name` (None when none does)."""
    return next((v for p, v in overrides.items() if fnmatch.fnmatchcase(name, p)), None)
