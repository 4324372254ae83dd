"""Low-rank factorization: truncated SVD of nn.Linear layers (and embedding tables).

W (out×in) ≈ U_r Σ_r V_rᵀ becomes two ordinary Linears, `down` = Σ_r^½ V_rᵀ (in→r, no bias) and
`up` = U_r Σ_r^½ (r→out, the original bias): r·(in+out) weights instead of in·out. The best rank-r
approximation in Frobenius norm (Eckart–Young), so the error is sqrt(Σ_{i>r} σ_i²).

Ranks: per layer by an energy threshold (keep the smallest r with Σ_{i≤r} σ² ≥ energy·Σ σ²), or
globally by a parameter budget: layers are shrunk greedily where the predicted damage per saved
parameter is smallest. Damage is measured (each layer truncated alone to a few ranks, the model's
outputs on calibration batches compared with the original's) or, with `sensitivity: spectrum`,
taken as the share of the layer's singular-value energy discarded.

Saving: an HF/SASRec config cannot say "two Linears here", so the result is the workload's usual
folder (weights under their factorized names) plus `slimcart-format.json` {"format": "lowrank",
"ranks": ...} (`LowRankFolder`). An `export_onnx` step after `lowrank` gives a plain ONNX file instead.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..arch import LayerSelect, first_match, run_batch
from ..contracts import FORMAT_FILE, Artifact, inside, register_artifact, write_format
from ..errors import SlimcartError
from ..outputs import copy_files
from ..recipe import Step, register_step


class LowRankLinear(nn.Module):
    """x -> up(down(x)): a Linear of rank `rank` as two Linears (exportable, trainable, quantizable)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    in_features = property(lambda self: self.down.in_features)
    out_features = property(lambda self: self.up.out_features)
    rank = property(lambda self: self.down.out_features)

    def forward(self, x):
        return self.up(self.down(x))


class LowRankEmbedding(nn.Module):
    """An embedding table E (num×dim) ≈ codes (num×r) @ proj (r×dim); `.weight` gives the product
    for code that reads the table directly (e.g. SASRec's item scoring)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx: int | None = None):
        super().__init__()
        self.codes = nn.Embedding(num_embeddings, rank, padding_idx=padding_idx)
        self.proj = nn.Linear(rank, embedding_dim, bias=False)

    num_embeddings = property(lambda self: self.codes.num_embeddings)
    embedding_dim = property(lambda self: self.proj.out_features)
    padding_idx = property(lambda self: self.codes.padding_idx)
    rank = property(lambda self: self.codes.embedding_dim)
    weight = property(lambda self: self.proj(self.codes.weight))

    def forward(self, ids):
        return self.proj(self.codes(ids))


def _matrix(layer: nn.Module) -> torch.Tensor:
    """The matrix to factorize, as (out, in) for Linear and (num, dim) for Embedding."""
    return layer.weight.detach()


def spectrum(layer: nn.Module) -> np.ndarray:
    """Singular values of the layer's weight, descending (float64)."""
    return torch.linalg.svdvals(_matrix(layer).double()).numpy()


def check_rank(layer: nn.Module, rank: int, name: str = "layer") -> None:
    full = min(_matrix(layer).shape)
    if not 1 <= rank <= full:
        raise SlimcartError(f"rank {rank} for {name} is outside 1..{full} (its weight is {tuple(_matrix(layer).shape)})")


def factorize_layer(layer: nn.Module, rank: int, name: str = "layer") -> nn.Module:
    """A LowRankLinear / LowRankEmbedding holding the best rank-`rank` approximation of `layer`."""
    check_rank(layer, rank, name)
    W = _matrix(layer).double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = S[:rank].sqrt()
    left, right = (U[:, :rank] * root).to(W.dtype), (root[:, None] * Vh[:rank]).to(W.dtype)  # W ≈ left @ right
    dtype = layer.weight.dtype
    if isinstance(layer, nn.Linear):
        new = LowRankLinear(layer.in_features, layer.out_features, rank, layer.bias is not None)
        with torch.no_grad():
            new.down.weight.copy_(right.to(dtype))
            new.up.weight.copy_(left.to(dtype))
            if layer.bias is not None:
                new.up.bias.copy_(layer.bias)
    elif isinstance(layer, nn.Embedding):
        new = LowRankEmbedding(layer.num_embeddings, layer.embedding_dim, rank, layer.padding_idx)
        with torch.no_grad():
            new.codes.weight.copy_(left.to(dtype))
            new.proj.weight.copy_(right.T.to(dtype))
    else:
        raise SlimcartError(f"{name}: only nn.Linear and nn.Embedding can be factorized, not {type(layer).__name__}")
    return new.to(layer.weight.device)


def rank_for_energy(s: np.ndarray, energy: float) -> int:
    """Smallest r whose top-r singular values hold `energy` of Σ σ²."""
    e = np.cumsum(s**2) / max(float(np.sum(s**2)), 1e-300)
    return int(min(np.searchsorted(e, energy - 1e-12) + 1, len(s)))


def dense_params(layer: nn.Module) -> int:
    m, n = _matrix(layer).shape
    return m * n


def lowrank_params(layer: nn.Module, rank: int) -> int:
    m, n = _matrix(layer).shape
    return rank * (m + n)


def _set(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def _outputs(module: nn.Module, batches: list) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [run_batch(module, b).float() for b in batches]


PROBES = (0.75, 0.5, 0.375, 0.25, 0.125, 0.0)  # fractions of the full rank at which damage is measured


def energy_curve(s: np.ndarray) -> np.ndarray:
    """curve[r] = share of Σ σ² discarded when keeping rank r (r = 0 .. full rank)."""
    tail = np.concatenate([np.cumsum((s**2)[::-1])[::-1], [0.0]])
    return tail / max(float(tail[0]), 1e-300)


def damage_curves(module: nn.Module, layers: dict[str, nn.Module], batches: list, probes=PROBES,
                  progress=lambda m: None) -> dict[str, np.ndarray]:
    """Measured output damage of truncating each layer alone, as curve[r] for r = 0 .. full rank.

    Damage = Σ ||y' - y||² / Σ ||y||² of the model's outputs on calibration batches, measured at a
    few ranks per layer (its weight swapped for the truncated one in place, then restored) and
    interpolated linearly in between; made non-increasing in r."""
    ref = _outputs(module, batches)
    denom = max(sum(float(r.pow(2).sum()) for r in ref), 1e-30)
    curves = {}
    for i, (name, layer) in enumerate(layers.items()):
        progress(f"low-rank sensitivity {i + 1}/{len(layers)}: {name}")
        keep = layer.weight.data.clone()
        U, S, Vh = torch.linalg.svd(keep.double(), full_matrices=False)
        full = len(S)
        ranks = sorted({int(round(f * full)) for f in probes} | {full})
        measured = []
        try:
            for r in ranks:
                layer.weight.data.copy_(((U[:, :r] * S[:r]) @ Vh[:r]).to(keep.dtype))
                measured.append(sum(float((o - r0).pow(2).sum()) for o, r0 in zip(_outputs(module, batches), ref)) / denom)
        finally:
            layer.weight.data.copy_(keep)
        curve = np.interp(np.arange(full + 1), ranks, measured)
        curve[full] = 0.0
        curves[name] = np.maximum.accumulate(curve[::-1])[::-1]  # more rank never predicts more damage
    return curves


def allocate_budget(layers: dict[str, nn.Module], curves: dict[str, np.ndarray], keep: float,
                    granularity: int = 8) -> dict[str, int | None]:
    """Ranks (None = stays dense) so the layers hold at most `keep` × their dense parameters.

    Greedy on predicted damage (`curves[name][rank]`, summed over layers) per saved parameter. Each
    move may jump several rank steps at once (the best average rate over all lower ranks), because
    leaving a layer dense and factorizing it at break-even rank costs the same parameters: one step
    at a time, no layer would ever be worth starting on and others would be cut to the bone."""
    budget = keep * sum(dense_params(m) for m in layers.values())
    ranks: dict[str, int | None] = {n: None for n in layers}
    cost = {n: dense_params(m) for n, m in layers.items()}

    def next_move(n):
        m, r = layers[n], ranks[n]
        rows, cols = _matrix(m).shape
        top = (rows * cols // (rows + cols)) // granularity * granularity if r is None else r - granularity
        best = None
        for new in range(top, granularity - 1, -granularity):
            saved = cost[n] - lowrank_params(m, new)
            if saved <= 0:
                continue
            rate = (curves[n][new] - (curves[n][r] if r is not None else 0.0)) / saved
            if best is None or rate < best[0]:
                best = (rate, new, saved)
        return best

    total = sum(cost.values())
    moves = {n: next_move(n) for n in layers}
    while total > budget:
        cands = [(mv[0], n) for n, mv in moves.items() if mv is not None]
        if not cands:
            raise SlimcartError(f"cannot reach keep_params={keep}: even the smallest ranks keep "
                                f"{total / (budget / keep):.2f} of the parameters")
        _, n = min(cands)
        _, new, saved = moves[n]
        ranks[n], cost[n], total = new, cost[n] - saved, total - saved
        moves[n] = next_move(n)
    return ranks


def factorize(module: nn.Module, ranks: dict[str, int | None]) -> nn.Module:
    """Replace each named layer with its rank-r factorization, in place (None = leave dense)."""
    for name, r in ranks.items():
        if r is not None:
            _set(module, name, factorize_layer(module.get_submodule(name), r, name))
    return module


def factorized_ranks(module: nn.Module) -> dict[str, int]:
    return {n: m.rank for n, m in module.named_modules() if isinstance(m, (LowRankLinear, LowRankEmbedding))}


# ---------------------------------------------------------------- saving and loading
def _weight_prefix(module: nn.Module, saved_keys: set[str]) -> str:
    """How the workload's saved weight names relate to the module's own ('transformer.' for search)."""
    own = set(module.state_dict())
    for prefix in [""] + [f"{n}." for n, _ in module.named_children()]:
        if saved_keys and all(prefix + k in own for k in saved_keys):
            return prefix
    raise SlimcartError("cannot match the saved weight names to the factorized model's layers")


@register_artifact
class LowRankFolder(Artifact):
    """The workload's own folder (factorized weights inside, under their two-Linear names) plus the
    format file naming the ranks. Loading rebuilds the dense-shaped model through the workload's
    loader from a dense copy of the weights, then swaps the saved factors back in: the reloaded
    model is the saved two-Linear model, weight for weight."""

    format = "lowrank"
    in_torch = True

    def save(self, folder: Path, workload, bundle) -> None:
        from safetensors import safe_open

        workload.save_model(bundle, folder)
        ranks = factorized_ranks(bundle.module)
        if not ranks:
            return
        weights = folder / "model.safetensors"
        if not weights.exists():
            raise SlimcartError(f"low-rank saving expects {weights} from the workload's save_model")
        with safe_open(str(weights), "pt") as f:
            keys = set(f.keys())
        write_format(folder, self.format, ranks=ranks, prefix=_weight_prefix(bundle.module, keys), weights=weights.name)

    @classmethod
    def load(cls, folder: Path, meta: dict, workload, threads: int):
        from safetensors.torch import load_file, save_file

        prefix, ranks = meta.get("prefix", ""), meta.get("ranks")
        if not isinstance(prefix, str) or not isinstance(ranks, dict) or not all(
                isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks.values()):
            raise SlimcartError(f"{folder / FORMAT_FILE}: 'ranks' must map layer names to positive whole numbers")
        saved = load_file(str(inside(folder, meta.get("weights", "model.safetensors"), "weights")))
        dense = dict(saved)
        for name in ranks:
            base = (name[len(prefix):] if name.startswith(prefix) else name) + "."
            if base + "down.weight" in saved and base + "up.weight" in saved:
                dense[base + "weight"] = saved[base + "up.weight"] @ saved[base + "down.weight"]
                if base + "up.bias" in saved:
                    dense[base + "bias"] = saved[base + "up.bias"]
                for k in ("down.weight", "up.weight", "up.bias"):
                    dense.pop(base + k, None)
            elif base + "codes.weight" in saved and base + "proj.weight" in saved:
                dense[base + "weight"] = saved[base + "codes.weight"] @ saved[base + "proj.weight"].T
                dense.pop(base + "codes.weight"), dense.pop(base + "proj.weight")
            else:
                raise SlimcartError(f"{folder}: factorized layer {name} is missing from the weights")
        with tempfile.TemporaryDirectory(prefix="slimcart-lowrank-") as tmp:
            tmp = Path(tmp)
            copy_files(folder, tmp, lambda rel: rel.name not in ("model.safetensors", FORMAT_FILE))
            save_file({k: v.contiguous() for k, v in dense.items()}, str(tmp / "model.safetensors"))
            bundle = workload.load_model(str(tmp))
        module = bundle.module
        for name, r in ranks.items():
            try:
                layer = module.get_submodule(name)
            except AttributeError:
                raise SlimcartError(f"{folder}: the model has no layer {name!r} named in {FORMAT_FILE}") from None
            new = (LowRankLinear(layer.in_features, layer.out_features, r, layer.bias is not None)
                   if isinstance(layer, nn.Linear) else LowRankEmbedding(layer.num_embeddings, layer.embedding_dim, r, layer.padding_idx))
            _set(module, name, new.to(layer.weight.dtype))
        factors = {k: v for k, v in saved.items() if any(k.startswith(n[len(prefix):] + ".") for n in ranks)}
        result = module.load_state_dict({prefix + k: v for k, v in factors.items()}, strict=False)
        missing = [k for k in result.missing_keys if any(k.startswith(n + ".") for n in ranks)]
        if missing or result.unexpected_keys:
            raise SlimcartError(f"{folder}: factorized weights do not match the model ({(missing + result.unexpected_keys)[:3]})")
        bundle.module, bundle.source, bundle.name = module.eval(), folder, str(folder)
        return workload.torch_runner(bundle), bundle


# ---------------------------------------------------------------- recipe step
class RankRule(BaseModel):
    """A per-layer setting: a fixed rank, an energy, or skip (leave dense)."""

    model_config = ConfigDict(extra="forbid")
    rank: int | None = Field(None, ge=1)
    energy: float | None = Field(None, gt=0, le=1)
    skip: bool = False


@register_step
class LowRank(LayerSelect, Step):
    """Truncated-SVD factorization of Linear layers (optionally embeddings) by energy or parameter budget.
    Layers: `targets` / `exclude`; `overrides` maps a pattern to a RankRule (first match wins)."""

    kind: Literal["lowrank"] = "lowrank"
    embeddings: bool = False
    mode: Literal["energy", "budget"] = "budget"
    energy: float = Field(0.9, gt=0, le=1)
    keep_params: float = Field(0.5, gt=0, lt=1)  # budget: fraction of the targeted layers' weights kept
    sensitivity: Literal["measured", "spectrum"] = "measured"
    calibration_batches: int = Field(4, ge=1)
    granularity: int = Field(8, ge=1)
    overrides: dict[str, RankRule] = {}

    def apply(self, state, ctx):
        module = state.torch_module(self.kind)
        # a weight shared by two modules (tied LM head / input embedding) cannot be factorized for one of them
        layers = self.pick(module, (nn.Linear, nn.Embedding) if self.embeddings else (nn.Linear,), untied=True)
        fixed: dict[str, int | None] = {}
        for name, layer in list(layers.items()):
            rule = first_match(name, self.overrides)
            if rule is None:
                continue
            if rule.skip:
                fixed[name] = None
            elif rule.rank is not None:
                check_rank(layer, rule.rank, name)
                fixed[name] = rule.rank
            elif rule.energy is not None:
                fixed[name] = rank_for_energy(spectrum(layer), rule.energy)
            layers.pop(name)
        if not layers and not any(r is not None for r in fixed.values()):
            raise SlimcartError(f"lowrank: no Linear{'/Embedding' if self.embeddings else ''} layer matches {self.targets}")
        ctx.progress(f"low-rank: singular values of {len(layers)} layers")
        spectra = {n: spectrum(m) for n, m in layers.items()}
        if self.mode == "energy":
            ranks = {n: rank_for_energy(s, self.energy) for n, s in spectra.items()}
            ranks = {n: (r if lowrank_params(layers[n], r) < dense_params(layers[n]) else None) for n, r in ranks.items()}
        else:
            if self.sensitivity == "measured" and layers:
                curves = damage_curves(module, layers, ctx.calibration(state.bundle, self.calibration_batches),
                                       progress=ctx.progress)
            else:  # spectrum: damage = share of the layer's energy discarded
                curves = {n: energy_curve(s) for n, s in spectra.items()}
            ranks = allocate_budget(layers, curves, self.keep_params, self.granularity)
        ranks.update(fixed)
        all_layers = {**layers, **{n: module.get_submodule(n) for n in fixed}}
        before = sum(dense_params(m) for m in all_layers.values())
        state.keep_teacher(ctx)
        factorize(module, ranks)
        after = sum(lowrank_params(all_layers[n], r) if r is not None else dense_params(all_layers[n]) for n, r in ranks.items())
        done = {n: r for n, r in ranks.items() if r is not None}
        state.notes.append(f"low-rank SVD: {len(done)}/{len(ranks)} layers factorized, their weights "
                           f"{before:,} -> {after:,} ({after / before:.1%}); ranks {min(done.values(), default=0)}-"
                           f"{max(done.values(), default=0)}")
        state.reports[self.kind] = {"ranks": done, "params_before": before, "params_after": after}
        state.artifact = LowRankFolder()
        return state
