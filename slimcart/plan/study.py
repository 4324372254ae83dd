"""The Optuna driver: a measured multi-objective search over the space, resumable and shareable.

Objectives (Optuna directions): relative quality loss (min), the profile's objective, bytes on disk
(min), joules per item (min); the profile's limits are Optuna constraints (value <= 0 = met), so the
TPE sampler prefers feasible regions. Each trial is first *screened* (short training, a validation
subset, two timing rounds) and measured in full only when promising: its screened figures are within
a slack of every limit and its objective is not clearly beaten by a full trial that already meets them.

Storage: Optuna's RDBStorage — SQLite inside OUT by default, or `--storage postgresql://...` so
several `slimcart plan --worker` processes share one study. Heartbeats mark a killed worker's trial
failed and Optuna re-enqueues it once; a recipe already complete (or running elsewhere) is never
measured twice (the duplicate is recorded as pruned). `--time-budget` is worker time: each worker
adds the wall time it spends to its own entry in the study, so a killed plan resumes with what is left.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .space import Space, fingerprint
from .trial import FULL, SCREEN, Evaluator

HEARTBEAT_S = int(os.environ.get("SLIMCART_PLAN_HEARTBEAT", "20"))
# Benefit of the doubt a screened objective gets before it counts as clearly behind the best full trial:
# screening times fewer rounds, so its figure may be this much too pessimistic (latency and energy lower,
# throughput higher once measured in full).
OBJ_SLACK = {"latency": 1 / 1.15, "throughput": 1.15, "energy": 1 / 1.25}


def objective_names(objective: str) -> list[str]:
    return ["quality_loss", objective] + [x for x in ("size", "energy") if x != objective]


FIG = {"quality_loss": "quality_loss", "latency_p50": "latency_p50_ms", "latency_p99": "latency_p99_ms",
       "throughput": "throughput", "throughput_per_core": "throughput_per_core", "size": "size_bytes",
       "energy": "energy_j_per_item"}
MAXIMIZED = ("throughput", "throughput_per_core")


def constraints_of(fig: dict, limits: dict[str, float], base_size: int) -> dict[str, float]:
    """Each limit's violation, relative to the limit (<= 0: met). Peak RSS unknown (screening) counts as met.
    Quality is checked by its upper confidence bound where the figures have one (trial.quality_loss_bound)."""
    def over(value, limit):
        return (value - limit) / max(abs(limit), 1e-12)

    out = {}
    for k, lim in limits.items():
        if k == "max_quality_loss":
            loss = fig["quality_loss"] if fig.get("quality_loss_bound") is None else fig["quality_loss_bound"]
            out[k] = (loss - lim) / max(lim, 1e-4)
        elif k == "max_latency_p50_ms":
            out[k] = over(fig["latency_p50_ms"], lim)
        elif k == "max_latency_p99_ms":
            out[k] = over(fig["latency_p99_ms"], lim)
        elif k == "max_size_mb":
            out[k] = over(fig["size_bytes"] / 1e6, lim)
        elif k == "max_size_ratio":
            out[k] = over(fig["size_bytes"] / base_size, lim)
        elif k == "max_peak_rss_mb":
            out[k] = 0.0 if fig.get("peak_rss_bytes") is None else over(fig["peak_rss_bytes"] / 1e6, lim)
        elif k == "min_throughput":
            out[k] = (lim - fig["throughput"]) / max(lim, 1e-12)
        elif k == "max_energy_j_per_item":
            out[k] = over(fig["energy_j_per_item"], lim)
    return out


def better(a: float, b: float, objective: str) -> bool:
    return a > b if objective in MAXIMIZED else a < b


def clearly_behind(screened: dict, best: dict, objective: str) -> bool:
    """Whether a screened trial stays worse than the best full trial on the objective even when its
    figure is improved by OBJ_SLACK (a screened trial that looks better is always promoted)."""
    key = FIG[objective]
    factor = OBJ_SLACK["throughput" if objective in MAXIMIZED else "energy" if objective == "energy" else "latency"]
    return better(best[key], screened[key] * factor, objective)


@dataclass
class Driver:
    """Runs trials of one study until the budget or the trial count is spent."""

    study: Any
    space: Space
    ev: Evaluator
    objective: str
    limits: dict[str, float]
    out: Path
    budget_s: float | None
    max_trials: int | None
    plain: bool  # plain random search: no seeds, no screening (the honest comparison)
    emit: Callable[[str, Any], None]
    worker: str = ""

    def __post_init__(self):
        self.worker = self.worker or f"{socket.gethostname()}-{os.getpid()}"
        self.mark = time.time()
        self.names = objective_names(self.objective)

    # ---------------------------------------------------------------- budget
    def spent(self) -> float:
        attrs = self.study.user_attrs
        return sum(v for k, v in attrs.items() if k.startswith("spent_s:"))

    def tick(self) -> None:
        now = time.time()
        key = f"spent_s:{self.worker}"
        self.study.set_user_attr(key, float(self.study.user_attrs.get(key, 0.0)) + now - self.mark)
        self.mark = now
        self.emit("budget", (self.spent(), self.budget_s))

    def done_trials(self) -> int:
        from optuna.trial import TrialState

        return len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    def exhausted(self) -> str | None:
        if self.budget_s is not None and self.spent() >= self.budget_s:
            return "time budget spent"
        if self.max_trials is not None and self.done_trials() >= self.max_trials:
            return f"{self.max_trials} trials complete"
        return None

    # ---------------------------------------------------------------- the loop
    def seed(self) -> None:
        if self.plain:
            return
        for i, ladder in enumerate(self.space.seeds):
            self.study.enqueue_trial(ladder[0], user_attrs={"seed": [i, 0]}, skip_if_exists=True)

    def run(self) -> str:
        import optuna

        self.seed()
        misses = 0
        while (why := self.exhausted()) is None:
            before = len(self.study.trials)
            self.study.optimize(self.objective_fn, n_trials=1, catch=(Exception,), callbacks=[self.after])
            self.tick()
            last = self.study.trials[-1] if len(self.study.trials) > before else None
            misses = misses + 1 if last is not None and last.state == optuna.trial.TrialState.PRUNED else 0
            if misses >= 25:
                return "the sampler keeps proposing recipes already measured (space exhausted)"
        return why

    # ---------------------------------------------------------------- one trial
    def objective_fn(self, trial) -> tuple[float, ...]:
        import optuna

        params = self.space.sample(trial.suggest_categorical)
        recipe = self.space.recipe(params, name=f"plan-trial-{trial.number}")
        trial.set_user_attr("worker", self.worker)
        if recipe is None:
            trial.set_user_attr("skipped", "the baseline itself (no step)")
            raise optuna.TrialPruned()
        fp = fingerprint(recipe)
        # Claim the recipe, then look for another claim (complete or running): a claim-free check first
        # would let two workers that sampled it at the same moment both pass. Each claims before it
        # looks, so at least one of them sees the other and backs off (both may; never neither).
        trial.set_user_attr("fingerprint", fp)
        twin = self._twin(fp, trial.number)
        if twin is not None:
            trial.set_user_attr("duplicate_of", twin)
            raise optuna.TrialPruned()
        trial.set_user_attr("recipe", recipe.to_dict())
        t0 = time.time()
        folder = self.out / "trials" / str(trial.number)
        try:
            fig = self._measure(recipe, folder, trial)
        except BaseException as e:
            shutil.rmtree(folder, ignore_errors=True)
            trial.set_user_attr("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400])
            self.emit("trial", {"number": trial.number, "params": params, "error": trial.user_attrs["error"]})
            raise
        cons = constraints_of(fig, self.limits, self.ev.base.size_bytes)
        feasible = all(v <= 0 for v in cons.values())
        trial.set_user_attr("figures", json.loads(json.dumps(fig, default=float)))
        trial.set_user_attr("constraints", cons)
        for k, v in (cons or {"none": 0.0}).items():
            trial.set_constraint(k, float(v))  # what TPE's constrained sampling reads (Optuna >= 5)
        trial.set_user_attr("feasible", feasible)
        trial.set_user_attr("seconds", round(time.time() - t0, 1))
        if fig["fidelity"] != "full":
            shutil.rmtree(folder, ignore_errors=True)
        elif feasible:
            self._maybe_best(trial.number, recipe, fig, folder)
        self.emit("trial", {"number": trial.number, "params": params, "figures": fig, "feasible": feasible,
                            "constraints": cons, "seconds": time.time() - t0, "objective": self.objective})
        return tuple(fig[FIG[n]] for n in self.names)

    def _twin(self, fp: str, number: int) -> int | None:
        from optuna.trial import TrialState

        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
            if t.number != number and t.user_attrs.get("fingerprint") == fp:
                return t.number
        return None

    def _measure(self, recipe, folder: Path, trial) -> dict:
        rss = "max_peak_rss_mb" in self.limits
        if self.plain:
            self.ev.build(recipe, FULL, folder)
            return self.ev.measure(folder, FULL, rss)
        trains = self.ev.trains(recipe)
        self.ev.build(recipe, SCREEN, folder)
        fig = self.ev.measure(folder, SCREEN, False)
        why = self._unpromising(fig)
        trial.set_user_attr("screen", json.loads(json.dumps(fig, default=float)))
        if why:
            trial.set_user_attr("not_promoted", why)
            return fig
        if trains:
            self.ev.build(recipe, FULL, folder)
        return self.ev.measure(folder, FULL, rss)

    def _unpromising(self, fig: dict) -> str | None:
        """Why a screened trial is not worth a full measurement (None: promote it)."""
        slack = {k: v for k, v in constraints_of(fig, self.limits, self.ev.base.size_bytes).items()}
        lim = self.limits.get("max_quality_loss")
        if lim is not None and fig["quality_loss"] > lim * 1.5 + 0.002:
            return f"screened quality loss {fig['quality_loss']:.2%} is far past the {lim:.2%} bound"
        for k, v in slack.items():
            if k in ("max_size_mb", "max_size_ratio") and v > 0:
                return f"{k} missed ({v:+.0%}); training does not change the size"
            if k in ("max_latency_p50_ms", "max_latency_p99_ms", "min_throughput") and v > 0.15:
                return f"{k} missed by {v:.0%} at screening"
        best = self.best_full()
        if best is not None and clearly_behind(fig, best["figures"], self.objective):
            key = FIG[self.objective]
            return f"{self.objective} {fig[key]:.4g} is clearly behind trial {best['number']} ({best['figures'][key]:.4g})"
        return None

    def best_full(self) -> dict | None:
        from optuna.trial import TrialState

        best = None
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            a = t.user_attrs
            if a.get("feasible") and a.get("figures", {}).get("fidelity") == "full":
                v = a["figures"][FIG[self.objective]]
                if best is None or better(v, best["figures"][FIG[self.objective]], self.objective):
                    best = {"number": t.number, "figures": a["figures"]}
        return best

    def _maybe_best(self, number: int, recipe, fig: dict, folder: Path) -> None:
        """Anytime result: OUT/best holds the best feasible full trial so far (replaced atomically)."""
        from .. import outputs

        best = self.best_full()
        key = FIG[self.objective]
        if best is not None and best["number"] != number and not better(fig[key], best["figures"][key], self.objective):
            return

        def write(tmp: Path) -> None:
            outputs.copy_files(folder / "model", tmp / "model")
            (tmp / "recipe.yaml").write_text(recipe.to_yaml())
            outputs.write_json(tmp / "trial.json", {"number": number, "figures": fig, "split": "validation"})

        outputs.atomic_dir(self.out / "best", write)
        self.emit("best", number)

    def after(self, study, frozen) -> None:
        """Seed ladders: the next rung (one more layer kept at higher precision) only while quality misses."""
        seed = frozen.user_attrs.get("seed")
        if not seed or self.plain:
            return
        i, rung = seed
        cons = frozen.user_attrs.get("constraints", {})
        ladder = self.space.seeds[i]
        if cons.get("max_quality_loss", 0) > 0 and rung + 1 < len(ladder):
            study.enqueue_trial(ladder[rung + 1], user_attrs={"seed": [i, rung + 1]}, skip_if_exists=True)
