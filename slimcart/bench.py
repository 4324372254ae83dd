"""Timing harness: warm-up, fixed threads, interleaved same-run measurement, medians and percentiles.

Why interleaved: on a shared 2-core machine absolute throughput swings 10x between minutes, so a
baseline timed at 14:00 and a candidate at 14:05 prove nothing. Here every round times every
candidate back to back, in alternating order, and ratios are taken per round before the median.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .contracts import BenchInputs
from .errors import SlimcartError

INTERESTING_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "avx_vnni")


def set_threads(n: int) -> None:
    """Pin intra-op threads for torch, ONNX Runtime (via env) and BLAS so every side gets the same budget."""
    import torch

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    torch.set_num_threads(n)


def default_threads() -> int:
    """The thread budget when the user gives none: $SLIMCART_THREADS, else all cores (at most 8).
    Read here only; everything below the API receives its thread count explicitly."""
    raw = os.environ.get("SLIMCART_THREADS")
    if not raw:
        return min(os.cpu_count() or 1, 8)
    try:
        return resolve_threads(int(raw))
    except ValueError:
        raise SlimcartError(f"SLIMCART_THREADS={raw!r} is not a whole number") from None


def resolve_threads(threads: int | None) -> int:
    """A user's thread count, checked: at least 1 and at most the machine's logical CPUs."""
    if threads is None:
        return default_threads()
    cpus = os.cpu_count() or 1
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cpus:
        raise SlimcartError(f"threads must be a whole number from 1 to {cpus} (this machine's CPUs), got {threads!r}")
    return threads


def environment(threads: int | None = None) -> dict:
    """What the numbers were measured on: CPU model and flags, threads, library versions."""
    import importlib.metadata as md

    cpu_model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu_model in ("unknown", "", "x86_64"):
                cpu_model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "openvino", "numpy", "slimcart"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu": cpu_model,
        "cpu_flags": sorted(f for f in INTERESTING_CPU_FLAGS if f in flags),
        "logical_cpus": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "threads": threads or default_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


@dataclass
class SideTiming:
    latency_ms: list[float] = field(default_factory=list)  # one entry per batch-1 call
    throughput_per_s: list[float] = field(default_factory=list)  # one entry per round
    cpu_ms_per_item: list[float] = field(default_factory=list)  # CPU time (all threads) per item, one per round
    extra_per_s: dict[str, list[float]] = field(default_factory=dict)  # name -> one entry per round

    def summary(self) -> dict:
        med = lambda xs: float(statistics.median(xs)) if xs else None  # noqa: E731
        lat = np.asarray(self.latency_ms)
        out = {
            "latency_ms": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))} if len(lat) else None,
            "throughput_per_s": med(self.throughput_per_s),
            "cpu_ms_per_item": med(self.cpu_ms_per_item),
        }
        if self.extra_per_s:
            out["extra_throughput_per_s"] = {k: med(v) for k, v in self.extra_per_s.items()}
        return out


def _timed(fn: Callable[[Any], Any], x: Any) -> float:
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


class CpuCompetition:
    """How many CPUs other processes kept busy while this one timed: (system busy CPU time - this
    process's CPU time) / wall time, from /proc/stat. Unlike the load average (a one-minute moving
    mean) it sees a competitor that started a few seconds ago. None where /proc/stat is missing."""

    def __init__(self):
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        ticks = [int(x) for x in fields]
        busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)  # all but idle and iowait
        return busy / os.sysconf("SC_CLK_TCK"), time.process_time(), time.perf_counter()

    def others_cpus(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None or end[2] - self._start[2] <= 0:
            return None
        others = (end[0] - self._start[0]) - (end[1] - self._start[1])
        return max(0.0, others / (end[2] - self._start[2]))


def measure_interleaved(
    sides: dict[str, Callable[[Any], Any]],
    inputs: BenchInputs,
    repeats: int = 5,
    warmup: int = 2,
    latency_samples: int = 32,
    progress: Callable[[str], None] | None = None,
    min_round_s: float = 1.0,
    max_passes: int = 5,
) -> dict[str, SideTiming]:
    """Time every side on the same inputs, round by round, alternating the order each round.

    Latency: each round runs `latency_samples` single requests per side, request by request
    interleaved across sides. Throughput: each round runs all serving batches per side, passing over
    them again (at most `max_passes` times) until the side has run `min_round_s` seconds: a 0.2 s round
    of a fast int8 model moved its ratio by +-14% from round to round on the idle machine
    (bench/busy_machine.py). The cap keeps a toy model's round short. Runs of fewer than 3 rounds make
    one pass: their spread cannot be judged anyway (`reliability` flags them).
    """
    names = list(sides)
    result = {n: SideTiming() for n in names}
    singles = inputs.single[:latency_samples] or inputs.serving[:1]
    for name in names:  # warm-up: caches, lazy kernels, allocator pools
        for _ in range(warmup):
            for batch in inputs.serving[:2]:
                sides[name](batch)
            for x in singles[:4]:
                sides[name](x)
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for x in singles:
            for name in order:
                result[name].latency_ms.append(_timed(sides[name], x) * 1e3)
        for name in order:
            c0, t, passes = time.process_time(), 0.0, 0
            while passes == 0 or (repeats >= 3 and t < min_round_s and passes < max_passes):
                t += sum(_timed(sides[name], b) for b in inputs.serving)
                passes += 1
            items = inputs.items_per_serving_batch * len(inputs.serving) * passes
            result[name].throughput_per_s.append(items / t)
            result[name].cpu_ms_per_item.append((time.process_time() - c0) * 1e3 / items)
            for key, (batches, items) in inputs.extra.items():
                t = sum(_timed(sides[name], b) for b in batches)
                result[name].extra_per_s.setdefault(key, []).append(items * len(batches) / t)
        if progress:
            progress(f"round {r + 1}/{repeats}")
    return result


def paired_ratio(candidate: list[float], baseline: list[float]) -> float:
    """Median of per-round ratios: robust to the machine speeding up or slowing down between rounds."""
    pairs = [c / b for c, b in zip(candidate, baseline) if b > 0]
    return float(statistics.median(pairs)) if pairs else float("nan")


def ratio_stats(candidate: list[float], baseline: list[float], resamples: int = 2000, seed: int = 0) -> dict:
    """The median per-round ratio with its spread: every round's ratio and a 95% bootstrap interval of
    the median (rounds resampled with replacement)."""
    rounds = np.array([c / b for c, b in zip(candidate, baseline) if b > 0])
    if not len(rounds):
        raise SlimcartError("no timing round produced a ratio")
    boot = np.median(np.random.default_rng(seed).choice(rounds, (resamples, len(rounds))), axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"median": float(np.median(rounds)), "ci95": [float(lo), float(hi)], "rounds": [float(r) for r in rounds]}


BUSY_LOAD = 1.5  # load average per logical CPU above which other work competes with the measurement
BUSY_OTHERS = 0.5  # CPUs kept busy by other processes while timing above which the figures are not trusted
WIDE_CI = 0.25  # a ratio's 95% interval wider than this share of the ratio itself


def reliability(load_before: float, load_after: float, cpus: int, ratios: dict[str, dict], threads: int,
                others_cpus: float | None = None) -> dict:
    """Whether speed figures measured now can be trusted, and why not: too few rounds, a machine busier
    than its cores (the measurement's own threads counted), other processes using CPUs while timing
    (`CpuCompetition`), or per-round ratios spread widely."""
    reasons = []
    rounds = min((len(r["rounds"]) for r in ratios.values()), default=0)
    if rounds < 3:
        reasons.append(f"only {rounds} timing round(s): no spread can be judged (use --repeats 5 or more)")
    load = max(load_before, load_after)
    if load > max(cpus, threads) * BUSY_LOAD:
        reasons.append(f"the machine was busy: load average {load:.1f} on {cpus} CPUs while timing")
    if others_cpus is not None and others_cpus > BUSY_OTHERS:
        reasons.append(f"other processes kept {others_cpus:.1f} of {cpus} CPUs busy while timing")
    for name, r in ratios.items():
        lo, hi = r["ci95"]
        if rounds >= 3 and hi - lo > WIDE_CI * r["median"]:
            reasons.append(f"{name} ratio varies from round to round (95% interval {lo:.2f}x-{hi:.2f}x)")
    return {"reliable": not reasons, "reasons": reasons}


def paired_changes(candidate, baseline, resamples: int = 2000, seed: int = 0):
    """mean_S(candidate) / mean_S(baseline) - 1 over `resamples` resamples S of the same rows (users,
    queries) for both models, so per-row difficulty cancels out: (resamples,) array."""
    import numpy as np

    c, b = np.asarray(candidate, float), np.asarray(baseline, float)
    if c.shape != b.shape or c.ndim != 1 or not len(c):
        raise ValueError("a paired bootstrap needs two 1-D arrays over the same rows")
    idx = np.random.default_rng(seed).integers(0, len(c), (resamples, len(c)))
    return c[idx].mean(1) / np.maximum(b[idx].mean(1), 1e-30) - 1


def paired_bootstrap(candidate, baseline, resamples: int = 2000, seed: int = 0) -> dict:
    """Relative change of a mean metric, mean(candidate) / mean(baseline) - 1, with a 95% interval from
    `paired_changes`."""
    import numpy as np

    lo, hi = np.percentile(paired_changes(candidate, baseline, resamples, seed), [2.5, 97.5])
    c, b = np.asarray(candidate, float), np.asarray(baseline, float)
    return {"rel_change": float(c.mean() / max(b.mean(), 1e-30) - 1), "ci95": [float(lo), float(hi)]}
