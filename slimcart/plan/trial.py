"""One trial: build a recipe through `api.build`, save and reload it from disk, and measure it on the
validation split against the fp32 baseline in the same run.

Figures of a trial (all on the validation split; test is touched only by the final phase):
    quality            the workload's metrics; quality_loss = relative loss of the primary metric;
                       quality_loss_bound = its one-sided upper bound at the profile's
                       quality_confidence (paired bootstrap over the metric's units), which the
                       quality limit is checked against where the workload gives per-unit values
    latency_p50/p99    ms per batch-1 request end to end, = (candidate / baseline, same-run ratio) x
                       the baseline's reference figure measured at the plan's start: trials timed under
                       different machine load stay comparable, since only the ratio is taken per trial
    throughput         items/s at the profile's batch, the same way (median of per-round ratios)
    energy_j_per_item  at the profile's batch (or per request at batch 1 for a latency objective)
    size_bytes         weight files on disk; peak_rss_bytes from a fresh process (full fidelity)

Fidelities: "screen" builds with training budgets cut to `screen_train` of the full ones and scores a
`screen_fraction` subset of validation with fewer timing rounds; "full" is the recipe as written.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import api, outputs
from ..bench import measure_interleaved, paired_changes, paired_ratio, set_threads
from ..contracts import Progress, no_progress
from ..recipe import Recipe, parse_step
from .energy import EnergyMeter, energy_per_item
from .requests import EndToEnd, Requests, requests_for


@dataclass
class Fidelity:
    name: str
    val_fraction: float
    repeats: int
    train_scale: float


SCREEN = Fidelity("screen", 0.35, 2, 0.25)
FULL = Fidelity("full", 1.0, 4, 1.0)


class BoundedPrefixCache(api.PrefixCache):
    """api.PrefixCache keeping only the newest `max_entries` prefixes: each holds a model copy (and a
    teacher), so an unbounded cache over a long plan would hold dozens of models in memory."""

    def __init__(self, max_entries: int = 6):
        super().__init__()
        self.max_entries = max_entries

    def store(self, steps, rest, state, seconds) -> None:
        super().store(steps, rest, state, seconds)
        while len(self.states) > self.max_entries:
            self.states.pop(next(iter(self.states)))


def scaled(recipe: Recipe, scale: float) -> Recipe:
    """The recipe with every training budget (distill, recover, qat steps and minutes) times `scale`."""
    if scale >= 1:
        return recipe
    steps = []
    for s in recipe.steps:
        d = s.model_dump(mode="json")
        if d["kind"] == "distill":
            t = d["train"]
            t["max_steps"] = max(1, int(t["max_steps"] * scale))
            t["max_minutes"] = None if t["max_minutes"] is None else t["max_minutes"] * scale
            t["eval_every"] = max(1, min(t["eval_every"], t["max_steps"]))
        elif d["kind"] in ("recover", "qat"):
            key = "steps" if d["kind"] == "recover" else "max_steps"
            d[key] = max(1, int(d[key] * scale))
            d["max_minutes"] = d["max_minutes"] * scale
        steps.append(parse_step(d))
    return Recipe(name=recipe.name, description=recipe.description, workloads=recipe.workloads, steps=steps)


def quality_loss(base: float, cand: float, higher_is_better: bool) -> float:
    """Relative loss of a metric: > 0 is worse than the baseline (lower nDCG, higher perplexity)."""
    if base == 0:
        return 0.0 if cand == base else float("inf")
    return (base - cand) / abs(base) if higher_is_better else (cand - base) / abs(base)


def quality_loss_bound(base_units, cand_units, higher_is_better: bool, confidence: float,
                       resamples: int = 4000, seed: int = 0) -> float | None:
    """One-sided upper `confidence` bound of the relative loss of a mean metric, by a paired bootstrap
    (bench.paired_changes): the same units (queries, users) are resampled for both models, so per-unit
    difficulty cancels and only the candidate's disagreement with the baseline widens the bound. With
    loss(S) = 1 - mean_S c / mean_S b (sign flipped when lower is better) over resamples S, the bound is
    its `confidence` quantile. None when either side has no per-unit values or they do not pair."""
    import numpy as np

    if base_units is None or cand_units is None or confidence <= 0:
        return None
    b, c = np.asarray(base_units, float), np.asarray(cand_units, float)
    if b.shape != c.shape or b.ndim != 1 or len(b) < 2:
        return None
    change = paired_changes(c, b, resamples, seed)
    return float(np.quantile(-change if higher_is_better else change, confidence))


@dataclass
class Baseline:
    """What every trial is compared with: the fp32 model, its validation quality per fidelity, its
    reference timing and energy, and its size."""

    quality: dict[str, dict[str, float]] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    per_unit: dict[str, Any] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    throughput: float = 0.0
    energy: dict[str, float] = field(default_factory=dict)
    size_bytes: int = 0
    peak_rss_bytes: int | None = None


class Evaluator:
    """Builds and measures trials of one (workload, model, data, profile) on this machine."""

    def __init__(self, wl, model: str, data_arg: str | None, bundle, data, resolved, meter: EnergyMeter,
                 workdir: Path, build_threads: int, progress: Progress = no_progress):
        self.wl, self.model, self.data_arg, self.bundle, self.data = wl, model, data_arg, bundle, data
        self.resolved, self.meter, self.workdir, self.progress = resolved, meter, Path(workdir), progress
        self.threads, self.build_threads = resolved.threads, build_threads
        self.primary = wl.primary_metric
        self.hib = wl.higher_is_better[self.primary]
        self.val = {f.name: wl.validation_data(data, f.val_fraction) for f in (SCREEN, FULL)}
        self.requests: Requests = requests_for(wl, bundle, self.val["full"], resolved.profile.batch)
        self.cache = BoundedPrefixCache()
        self.base = Baseline()
        self.base_runner = wl.torch_runner(bundle)

    # ---------------------------------------------------------------- the baseline, once per plan
    def measure_baseline(self, repeats: int = 5) -> Baseline:
        set_threads(self.threads)
        for fid in ("screen", "full"):
            self.progress(f"baseline quality on validation ({fid})")
            res = self.wl.evaluate(self.base_runner, self.bundle, self.val[fid])
            self.base.quality[fid], self.base.outputs[fid], self.base.per_unit[fid] = res.quality, res.outputs, res.per_unit
        self.progress("baseline reference timing")
        side = {"baseline": EndToEnd(self.base_runner, self.requests.prepare)}
        t = measure_interleaved(side, self.requests.inputs, repeats=repeats)["baseline"].summary()
        self.base.latency_ms = {"p50": t["latency_ms"]["p50"], "p99": t["latency_ms"]["p99"]}
        self.base.throughput = t["throughput_per_s"]
        self.base.energy = self._energy(side)["baseline"]
        self.base.size_bytes = api.baseline_size_bytes(self.bundle.module, self.workdir)
        return self.base

    def _energy(self, sides: dict) -> dict[str, dict[str, float]]:
        inp = self.requests.inputs
        batch = energy_per_item(self.meter, sides, inp.serving[:8], inp.items_per_serving_batch)
        single = energy_per_item(self.meter, sides, inp.single[:16], 1)
        return {k: {"batch": batch[k], "single": single[k]} for k in sides}

    # ---------------------------------------------------------------- one trial
    @staticmethod
    def trains(recipe: Recipe) -> bool:
        """Whether the recipe has a training budget the screening fidelity shortens."""
        return any(s.kind in ("distill", "recover", "qat") for s in recipe.steps)

    def build(self, recipe: Recipe, fid: Fidelity, folder: Path) -> None:
        """Build the recipe (training budgets scaled for the fidelity) and save it to folder/model."""
        folder = Path(folder)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        built = api.build(self.wl, self.model, scaled(recipe, fid.train_scale), threads=self.build_threads,
                          workdir=folder / "work", progress=self.progress, loaded=(self.bundle, self.data),
                          cache=self.cache)
        built.state.save(folder / "model", self.wl)
        st = built.state
        outputs.write_json(folder / "build.json", {
            "runtime": st.runtime, "kernels": list(st.kernels), "size_only": list(st.size_only),
            "notes": list(st.notes), "build_s": round(built.seconds, 1), "build_fidelity": fid.name})
        shutil.rmtree(folder / "work", ignore_errors=True)

    def measure(self, folder: Path, fid: Fidelity, measure_rss: bool) -> dict:
        """Reload folder/model from disk and measure it against the baseline on validation."""
        import json

        folder = Path(folder)
        info = json.loads((folder / "build.json").read_text())
        set_threads(self.threads)
        phase, t0 = {}, time.perf_counter()
        runner, cbundle = api.load(self.wl, folder / "model", self.threads)
        self.progress(f"evaluating on validation ({fid.name})")
        res = self.wl.evaluate(runner, cbundle, self.val[fid.name], reference=self.base.outputs[fid.name])
        q, base_q = res.quality, self.base.quality[fid.name]
        confidence = self.resolved.profile.quality_confidence
        bound = quality_loss_bound(self.base.per_unit.get(fid.name), res.per_unit, self.hib, confidence)
        phase["load_eval"], t0 = time.perf_counter() - t0, time.perf_counter()
        self.progress("timing against the baseline, interleaved")
        sides = {"baseline": EndToEnd(self.base_runner, self.requests.prepare),
                 "candidate": EndToEnd(runner, self.requests.prepare)}
        timing = measure_interleaved(sides, self.requests.inputs, repeats=fid.repeats)
        b, c = timing["baseline"].summary(), timing["candidate"].summary()
        energy = self._energy(sides)
        phase["timing_energy"], t0 = time.perf_counter() - t0, time.perf_counter()
        e_key = "single" if self.resolved.profile.objective.startswith("latency") else "batch"
        e_ratio = energy["candidate"][e_key] / max(energy["baseline"][e_key], 1e-30)
        lat_ratio = {k: c["latency_ms"][k] / b["latency_ms"][k] for k in ("p50", "p99")}
        tp_ratio = paired_ratio(timing["candidate"].throughput_per_s, timing["baseline"].throughput_per_s)
        size = outputs.model_bytes(folder / "model")
        rss = api.peak_rss(self.wl.name, self.data_arg, self.threads, folder / "model") if measure_rss else None
        phase["peak_rss"] = time.perf_counter() - t0
        figures = {
            "fidelity": fid.name,
            "quality": q, "baseline_quality": base_q,
            "quality_loss": quality_loss(base_q[self.primary], q[self.primary], self.hib),
            # the loss the quality limit is checked against: the upper bound where the metric allows one
            "quality_loss_bound": bound, "quality_confidence": confidence if bound is not None else None,
            "latency_p50_ms": lat_ratio["p50"] * self.base.latency_ms["p50"],
            "latency_p99_ms": lat_ratio["p99"] * self.base.latency_ms["p99"],
            "throughput": tp_ratio * self.base.throughput,
            "throughput_per_core": tp_ratio * self.base.throughput / self.threads,
            "ratios": {"latency_p50": lat_ratio["p50"], "latency_p99": lat_ratio["p99"], "throughput": tp_ratio,
                       "size": size / self.base.size_bytes, "energy": e_ratio},
            "measured": {"baseline": b, "candidate": c},
            "energy_j_per_item": e_ratio * self.base.energy[e_key],
            "energy_at": "batch 1" if e_key == "single" else f"batch {self.requests.batch}",
            "energy": energy,
            "size_bytes": size,
            "peak_rss_bytes": rss,
            "phase_s": {k: round(v, 1) for k, v in phase.items()},
            **info,
        }
        return figures

    def time_per_trial_note(self) -> str:
        return (f"{self.requests.note}; throughput at batch {self.requests.batch}; latency at batch 1; "
                f"{self.threads} thread(s)")

