"""Input statistics of a decoder layer's Linears on calibration data: H = X^T X / n (GPTQ's Hessian,
and the exact output-error metric AWQ's searches use) and mean |x| per input channel (AWQ's
activation salience). Linears fed the same tensor (q/k/v, gate/up) share one statistics object."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...errors import SlimcartError


@dataclass
class InputStats:
    in_features: int
    H: torch.Tensor = None  # [in, in] float32, mean of x x^T over tokens
    mean_abs: torch.Tensor = None  # [in]
    n: int = 0
    sample: list = field(default_factory=list)  # a few raw input rows, kept only on request

    def add(self, x: torch.Tensor, keep: int = 0) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(x).all():
            raise SlimcartError("calibration activations contain NaN or inf (the model overflows on this text)")
        if self.H is None:
            self.H = torch.zeros(self.in_features, self.in_features)
            self.mean_abs = torch.zeros(self.in_features)
        m = x.shape[0]
        # Running means: stable regardless of how many tokens arrive.
        self.H.mul_(self.n / (self.n + m)).addmm_(x.t(), x, alpha=1.0 / (self.n + m))
        self.mean_abs.mul_(self.n / (self.n + m)).add_(x.abs().sum(0), alpha=1.0 / (self.n + m))
        self.n += m
        if keep and sum(s.shape[0] for s in self.sample) < keep:
            self.sample.append(x[: keep].clone())

    def scaled(self, s: torch.Tensor) -> "InputStats":
        """Statistics of x / s (what a Linear sees after AWQ folds s into its weights)."""
        out = InputStats(self.in_features, self.H / s[:, None] / s[None, :], self.mean_abs / s, self.n)
        out.sample = [x / s for x in self.sample]
        return out


@torch.no_grad()
def collect_stats(layer: torch.nn.Module, hidden: list[torch.Tensor], kwargs: list[dict],
                  linears: dict[str, torch.nn.Linear], keep: int = 0) -> dict[str, InputStats]:
    """Run `layer` on every calibration batch and accumulate input statistics of each named Linear."""
    stats: dict[str, InputStats] = {}
    # id of an input tensor within one forward -> (the tensor, its stats); holding the tensor keeps
    # its id from being reused by a later activation of the same forward.
    seen: dict[int, tuple[torch.Tensor, InputStats]] = {}
    handles = []

    def hook(name):
        def fn(mod, args):
            x = args[0]
            key = id(x)
            if name not in stats:
                stats[name] = seen[key][1] if key in seen else InputStats(mod.in_features)
            st = stats[name]
            if key in seen and seen[key][1] is st:
                return  # another Linear already accounted this exact tensor in this forward
            seen[key] = (x, st)
            st.add(x, keep)
        return fn

    for name, mod in linears.items():
        handles.append(mod.register_forward_pre_hook(hook(name)))
    try:
        for h, kw in zip(hidden, kwargs):
            seen.clear()
            layer(h, **kw)
    finally:
        for hd in handles:
            hd.remove()
    missing = [n for n in linears if n not in stats]
    if missing:
        raise SlimcartError(f"calibration never reached {missing}")
    return stats
