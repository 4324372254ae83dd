"""Calibrators for activation ranges: feed batches with `update(x)`, read `range()` -> (lo, hi).

  minmax          running min / max over everything seen;
  moving_average  exponential moving average of each batch's min / max (ignores one-off spikes);
  percentile      the p-th / (100-p)-th percentiles of the values seen;
  mse             the clipped range [c*lo, c*hi] whose quantization MSE on the values seen is smallest;
  entropy         the symmetric threshold minimising KL(P || Q) between the |x| histogram and its
                  quantized version (the TensorRT-style calibration).

Percentile, mse and entropy look at a sample of the values (all of them up to `max_samples`, then a
uniform random subsample), so they stay cheap on long calibration runs. All ranges are per tensor.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from ...errors import SlimcartError
from .schemes import QuantParams, QuantScheme, uniform_params

ObserverKind = Literal["minmax", "moving_average", "percentile", "mse", "entropy"]


class Observer:
    """Base class: tracks min/max; subclasses refine the range from what they saw."""

    def __init__(self):
        self.lo, self.hi, self.n = float("inf"), float("-inf"), 0

    def _prep(self, x) -> torch.Tensor:
        x = torch.as_tensor(x).detach().float().reshape(-1)
        if x.numel() == 0:
            raise SlimcartError("observer got an empty tensor")
        if not torch.isfinite(x).all():
            raise SlimcartError("observer got NaN or inf activations (check the model and calibration data)")
        return x

    def update(self, x) -> None:
        x = self._prep(x)
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        self.n += 1
        self._observe(x)

    def _observe(self, x: torch.Tensor) -> None:
        pass

    def range(self) -> tuple[float, float]:
        if self.n == 0:
            raise SlimcartError("observer has seen no calibration data")
        return self._range()

    def _range(self) -> tuple[float, float]:
        return self.lo, self.hi

    def params(self, scheme: QuantScheme) -> QuantParams:
        """Per-tensor uniform parameters covering `range()`."""
        lo, hi = self.range()
        scale, zp = uniform_params(torch.tensor([lo]), torch.tensor([hi]), scheme)
        return QuantParams(scheme.model_copy(update={"granularity": "per_tensor"}), (1,), scale, zero_point=zp)


class MinMaxObserver(Observer):
    pass


class MovingAverageObserver(Observer):
    def __init__(self, momentum: float = 0.9):
        super().__init__()
        if not 0 <= momentum < 1:
            raise SlimcartError(f"moving-average momentum must be in [0, 1), got {momentum}")
        self.momentum, self.avg = momentum, None

    def _observe(self, x):
        cur = np.array([float(x.min()), float(x.max())])
        self.avg = cur if self.avg is None else self.momentum * self.avg + (1 - self.momentum) * cur

    def _range(self):
        return float(self.avg[0]), float(self.avg[1])


class _SampleObserver(Observer):
    """Keeps up to `max_samples` values (reservoir-style random subsample beyond that)."""

    def __init__(self, max_samples: int = 1_000_000, seed: int = 0):
        super().__init__()
        self.max_samples, self.seen = max_samples, 0
        self.buf: list[torch.Tensor] = []
        self.gen = torch.Generator().manual_seed(seed)

    def _observe(self, x):
        self.seen += x.numel()
        self.buf.append(x.clone())
        total = sum(b.numel() for b in self.buf)
        if total > self.max_samples:
            allx = torch.cat(self.buf)
            keep = torch.randperm(allx.numel(), generator=self.gen)[: self.max_samples]
            self.buf = [allx[keep]]

    def samples(self) -> torch.Tensor:
        return torch.cat(self.buf)


class PercentileObserver(_SampleObserver):
    def __init__(self, percentile: float = 99.99, **kw):
        super().__init__(**kw)
        if not 50 < percentile <= 100:
            raise SlimcartError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def _range(self):
        s = self.samples().numpy()
        lo, hi = np.percentile(s, [100 - self.percentile, self.percentile])
        return float(lo), float(hi)


class MSEObserver(_SampleObserver):
    """Grid-searches a shrink factor c of [lo, hi]; the grid includes c = 1, so the result never clips more
    than helps on the values seen."""

    def __init__(self, scheme: QuantScheme | None = None, grid: int = 100, min_ratio: float = 0.05, **kw):
        super().__init__(**kw)
        self.scheme = (scheme or QuantScheme(bits=8, symmetric=False)).model_copy(update={"granularity": "per_tensor"})
        self.ratios = np.linspace(min_ratio, 1.0, grid)

    def _range(self):
        s = self.samples()
        best, best_err = 1.0, float("inf")
        q_lo, q_hi = self.scheme.qmin, self.scheme.qmax
        for c in self.ratios:
            scale, zp = uniform_params(torch.tensor([self.lo * c]), torch.tensor([self.hi * c]), self.scheme)
            z = 0.0 if zp is None else float(zp)
            deq = (torch.clamp(torch.round(s / scale) + z, q_lo, q_hi) - z) * scale
            err = float(((deq - s) ** 2).mean())
            if err < best_err:
                best, best_err = float(c), err
        if self.scheme.symmetric:  # the grid that was scored spans +-amax*c, so report that range
            amax = max(-self.lo, self.hi) * best
            return -amax, amax
        return self.lo * best, self.hi * best


class EntropyObserver(_SampleObserver):
    """KL calibration on the |x| histogram: for each candidate threshold (bin i), clip everything above into
    the last bin (P), merge the i bins into 2**(bits-1) quantization levels and expand back (Q), and keep
    the threshold with the smallest KL(P || Q). Returns a symmetric range."""

    def __init__(self, bits: int = 8, bins: int = 2048, **kw):
        super().__init__(**kw)
        self.levels, self.bins = 2 ** (bits - 1), bins

    def _range(self):
        a = self.samples().abs().numpy().astype(np.float64)
        amax = float(a.max())
        if amax == 0:
            return 0.0, 0.0
        hist, edges = np.histogram(a, bins=self.bins, range=(0, amax))
        best_i, best_kl = self.bins, float("inf")
        for i in range(self.levels, self.bins + 1):
            p = hist[:i].astype(np.float64).copy()
            p[-1] += hist[i:].sum()
            # Q: split the i bins into `levels` chunks; each chunk's mass spread evenly over its non-empty bins.
            h = hist[:i].astype(np.float64)
            starts = np.array([c[0] for c in np.array_split(np.arange(i), self.levels)])
            lens = np.diff(np.append(starts, i))
            mass, nz = np.add.reduceat(h, starts), np.add.reduceat((h > 0).astype(np.float64), starts)
            q = np.repeat(np.where(nz > 0, mass / np.maximum(nz, 1), 0.0), lens) * (h > 0)
            mask = p > 0
            if (q[mask] == 0).any():
                continue
            pn, qn = p / p.sum(), q / q.sum()
            kl = float(np.sum(pn[mask] * np.log(pn[mask] / qn[mask])))
            if kl < best_kl:
                best_i, best_kl = i, kl
        t = float(edges[best_i]) if best_i < self.bins else amax
        return -t, t


OBSERVERS = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}


def make_observer(kind: str, **kwargs) -> Observer:
    """An observer by name (see module docstring), e.g. make_observer("percentile", percentile=99.9)."""
    import inspect

    if kind not in OBSERVERS:
        raise SlimcartError(f"unknown observer '{kind}' (known: {', '.join(OBSERVERS)})")
    known = sorted({n for c in OBSERVERS[kind].__mro__ if "__init__" in vars(c)  # settings passed on to a parent too
                    for n, prm in inspect.signature(vars(c)["__init__"]).parameters.items()
                    if n != "self" and prm.kind not in (prm.VAR_KEYWORD, prm.VAR_POSITIONAL)})
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise SlimcartError(f"observer '{kind}' has no setting {', '.join(unknown)} (it takes: {', '.join(known) or 'none'})")
    try:
        return OBSERVERS[kind](**kwargs)
    except (TypeError, ValueError) as e:
        raise SlimcartError(f"observer '{kind}': bad settings {kwargs} ({e})") from None
