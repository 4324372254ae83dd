"""The plan's last phase: choose, evaluate on test once, publish.

Chosen point: among trials measured in full on validation that meet every limit, the best on the
profile's objective (ties: lower quality loss). If none meets them, the nearest point (smallest total
relative violation) is published instead, labelled infeasible, with the constraint that binds (the one
most trials, and the nearest point, miss) — a plan never ends with nothing after hours.

"Meets every limit" checks quality by the upper confidence bound of the validation loss where the
workload has per-unit values (see Profile.quality_confidence), so the fastest trial cannot win on a
loss that validation happened to underestimate.

Then, once, on the test split: the chosen model and every Pareto-front model are evaluated (quality,
and a paired bootstrap interval of the primary metric's change over queries / users where the workload
gives per-unit values), and the chosen one is
timed against the fp32 baseline interleaved on test-split requests, like `slimcart compress` does. OUT
gets the normal compress layout (model/, metrics.json, recipe.yaml, report.md) plus plan.json and
report.html.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import api, outputs
from ..bench import environment, measure_interleaved, paired_bootstrap, paired_ratio, set_threads
from ..recipe import Recipe
from ..report.markdown import render_report
from .requests import EndToEnd, requests_for
from .study import FIG, MAXIMIZED, constraints_of, objective_names
from .trial import FULL, quality_loss


def trial_rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        rows.append({"number": t.number, "state": t.state.name, "params": t.params, "recipe": a.get("recipe"),
                     "fidelity": a.get("figures", {}).get("fidelity"), "figures": a.get("figures"),
                     "screen": a.get("screen"), "constraints": a.get("constraints"), "feasible": a.get("feasible"),
                     "not_promoted": a.get("not_promoted"), "duplicate_of": a.get("duplicate_of"),
                     "error": a.get("error"), "seed": a.get("seed"), "worker": a.get("worker"),
                     "seconds": a.get("seconds"), "skipped": a.get("skipped")})
    return rows


def pareto(rows: list[dict], names: list[str]) -> list[int]:
    """Numbers of the rows no other row dominates on the objectives `names` (each min or max)."""
    def vec(r):
        return [(-1 if n in MAXIMIZED else 1) * r["figures"][FIG[n]] for n in names]

    pts = [(r["number"], vec(r)) for r in rows]
    return [n for n, v in pts if not any(all(x <= y for x, y in zip(w, v)) and w != v for _, w in pts)]


def choose(rows: list[dict], objective: str) -> tuple[dict | None, bool]:
    full = [r for r in rows if r["state"] == "COMPLETE" and r["fidelity"] == "full"]
    feasible = [r for r in full if r["feasible"]]
    sign = -1 if objective in MAXIMIZED else 1
    if feasible:
        return min(feasible, key=lambda r: (sign * r["figures"][FIG[objective]], r["figures"]["quality_loss"])), True
    measured = full or [r for r in rows if r["state"] == "COMPLETE" and r["figures"]]
    if not measured:
        return None, False
    return min(measured, key=lambda r: sum(max(v, 0) for v in r["constraints"].values())), False


def explain(chosen: dict, rows: list[dict], objective: str, feasible: bool) -> tuple[list[str], dict | None]:
    """Why the chosen point won (or which constraint binds)."""
    key = FIG[objective]
    full = [r for r in rows if r["state"] == "COMPLETE" and r["fidelity"] == "full"]
    if not feasible:
        counts: dict[str, int] = {}
        for r in full or rows:
            for k, v in (r.get("constraints") or {}).items():
                counts[k] = counts.get(k, 0) + (v > 0)
        worst = max(chosen["constraints"].items(), key=lambda kv: kv[1])
        binding = {"constraint": worst[0], "nearest_violation": worst[1], "trials_missing_it": counts}
        return [f"no measured trial meets every limit; the binding constraint is {worst[0]} "
                f"(the nearest point misses it by {worst[1]:+.1%} of the limit; trials missing each limit: {counts})"], binding
    others = [r for r in full if r["feasible"] and r["number"] != chosen["number"]]
    f = chosen["figures"]
    lines = [f"trial {chosen['number']} has the best {objective} ({f[key]:.4g}) of "
             f"{len(others) + 1} trial(s) that meet every limit on validation"]
    if f.get("quality_loss_bound") is not None:
        lines.append(f"its validation quality loss is {f['quality_loss']:.2%}, at most {f['quality_loss_bound']:.2%} "
                     f"with {f['quality_confidence']:.0%} confidence (paired bootstrap), which the limit is checked against")
    if others:
        sign = -1 if objective in MAXIMIZED else 1
        nxt = min(others, key=lambda r: sign * r["figures"][key])
        lines.append(f"runner-up: trial {nxt['number']} ({nxt['figures'][key]:.4g}, quality loss "
                     f"{nxt['figures']['quality_loss']:.2%})")
    faster = [r for r in full if not r["feasible"] and (r["figures"][key] > chosen["figures"][key]) == (objective in MAXIMIZED)
              and r["figures"][key] != chosen["figures"][key]]
    if faster:
        missed = sorted({k for r in faster for k, v in r["constraints"].items() if v > 0})
        lines.append(f"{len(faster)} trial(s) beat it on {objective} but miss {', '.join(missed)}")
    return lines, None


def _model_folder(ctx, row: dict) -> Path:
    folder = ctx.out / "trials" / str(row["number"])
    if not (folder / "model").is_dir():  # measured by another worker: rebuild it here from its recipe
        ctx.ev.build(Recipe.model_validate(row["recipe"]), FULL, folder)
    return folder / "model"


def test_figures(ctx, numbers: list[int], rows: dict[int, dict]) -> dict[int, dict]:
    """Quality of each trial's model on the test split, against the baseline's on the same split."""
    wl, ev = ctx.wl, ctx.ev
    set_threads(ev.threads)
    ctx.emit("msg", "evaluating the baseline on the test split")
    base = wl.evaluate(ev.base_runner, ev.bundle, ev.data)
    out = {"baseline": {"quality": base.quality}}
    for n in numbers:
        ctx.emit("msg", f"evaluating trial {n} on the test split")
        runner, cb = api.load(wl, _model_folder(ctx, rows[n]), ev.threads)
        res = wl.evaluate(runner, cb, ev.data, reference=base.outputs)
        fig = {"quality": res.quality, "quality_loss": quality_loss(base.quality[ev.primary], res.quality[ev.primary], ev.hib)}
        if res.per_unit is not None and base.per_unit is not None and len(res.per_unit) == len(base.per_unit):
            fig[f"{ev.primary}_paired_bootstrap"] = paired_bootstrap(res.per_unit, base.per_unit)
        out[n] = fig
    return out


def time_on_test(ctx, folder: Path, repeats: int = 5) -> dict:
    """Chosen vs baseline, interleaved, on test-split requests at the profile's batch and threads."""
    ev = ctx.ev
    set_threads(ev.threads)
    runner, cb = api.load(ctx.wl, folder, ev.threads)
    req = requests_for(ctx.wl, ev.bundle, ev.data, ctx.resolved.profile.batch)
    sides = {"baseline": EndToEnd(ev.base_runner, req.prepare), "compressed": EndToEnd(runner, req.prepare)}
    ctx.emit("msg", "timing the chosen model against the baseline on test-split requests")
    t = measure_interleaved(sides, req.inputs, repeats=repeats)
    from .energy import energy_per_item

    e_batch = energy_per_item(ev.meter, sides, req.inputs.serving[:8], req.inputs.items_per_serving_batch)
    e_single = energy_per_item(ev.meter, sides, req.inputs.single[:16], 1)
    return {"timing": {k: v.summary() for k, v in t.items()}, "runtime": runner.runtime, "unit": req.inputs.unit,
            "batch": req.batch, "throughput_ratio": paired_ratio(t["compressed"].throughput_per_s, t["baseline"].throughput_per_s),
            "energy_j_per_item": {"batch": e_batch, "single": e_single}, "repeats": repeats}


def finalize(ctx) -> dict:
    rows = trial_rows(ctx.study)
    objective = ctx.resolved.profile.objective
    chosen, feasible = choose(rows, objective)
    if chosen is None:
        errors = [r["error"] for r in rows if r.get("error")][:3]
        return {"status": "no trial completed", "errors": errors, "trials": rows}
    why, binding = explain(chosen, rows, objective, feasible)
    full = [r for r in rows if r["state"] == "COMPLETE" and r["fidelity"] == "full"]
    names = objective_names(objective)
    front = pareto(full, names)
    feasible_front = pareto([r for r in full if r["feasible"]], names)
    by_number = {r["number"]: r for r in rows}
    numbers = sorted(set(feasible_front) | set(front) | {chosen["number"]})
    test = test_figures(ctx, numbers, by_number)
    folder = _model_folder(ctx, chosen)
    final = time_on_test(ctx, folder)
    rss = {"baseline": None, "compressed": None}
    from ..workloads import WORKLOADS

    if ctx.wl.name in WORKLOADS:
        ctx.emit("msg", "measuring peak memory of each side in a fresh process")
        rss = {"baseline": api.peak_rss(ctx.wl.name, ctx.data_arg, ctx.ev.threads, ctx.model),
               "compressed": api.peak_rss(ctx.wl.name, ctx.data_arg, ctx.ev.threads, folder)}
    metrics = _metrics(ctx, chosen, test, final, rss, folder)
    e_key = "single" if objective.startswith("latency") else "batch"
    test_fig = {"quality_loss": test[chosen["number"]]["quality_loss"],
                "latency_p50_ms": final["timing"]["compressed"]["latency_ms"]["p50"],
                "latency_p99_ms": final["timing"]["compressed"]["latency_ms"]["p99"],
                "throughput": final["timing"]["compressed"]["throughput_per_s"],
                "size_bytes": metrics["compressed"]["size_bytes"], "peak_rss_bytes": rss["compressed"],
                "energy_j_per_item": final["energy_j_per_item"][e_key]["compressed"]}
    test_cons = constraints_of(test_fig, ctx.resolved.limits, ctx.ev.base.size_bytes)
    plan = {
        "workload": ctx.wl.name, "model": ctx.model, "data": ctx.wl.data_info(ctx.ev.data).as_dict(),
        "validation": ctx.ev.val["full"].info.as_dict() if hasattr(ctx.ev.val["full"], "info") else None,
        "profile": ctx.resolved.profile.model_dump(), "limits": ctx.resolved.limits, "threads": ctx.ev.threads,
        "label": ctx.resolved.label(ctx.hw["cpu"]), "hardware": ctx.hw, "energy_method": ctx.ev.meter.as_dict(),
        "timing": ctx.ev.time_per_trial_note(), "space": ctx.space.describe(), "sampler": ctx.sampler,
        "budget_s": ctx.budget_s, "spent_s": ctx.spent_s, "setup_s": getattr(ctx, "setup_s", None), "stopped": ctx.reason, "study": ctx.study.study_name,
        "objectives": names, "baseline_validation": {
            "quality": ctx.ev.base.quality, "latency_ms": ctx.ev.base.latency_ms, "throughput": ctx.ev.base.throughput,
            "energy_j_per_item": ctx.ev.base.energy, "size_bytes": ctx.ev.base.size_bytes},
        "sensitivity": ctx.sensitivity, "trials": rows, "pareto_front": front, "feasible_pareto_front": feasible_front,
        "chosen": {"number": chosen["number"], "feasible_on_validation": feasible, "why": why, "binding": binding,
                   "validation_figures": {k: chosen["figures"].get(k) for k in test_fig}, "test_figures": test_fig, "test_constraints": test_cons,
                   "meets_every_limit_on_test": all(v <= 0 for v in test_cons.values())},
        "test": {str(k): v for k, v in test.items()}, "final_timing": final,
    }
    metrics["plan"] = {"chosen_trial": chosen["number"], "feasible": feasible, "why": why, "profile": ctx.resolved.profile.name,
                       "validation_figures": chosen["figures"], "test_constraints": test_cons}
    _publish(ctx, folder, chosen, metrics, plan)
    return plan


def _metrics(ctx, chosen: dict, test: dict, final: dict, rss: dict, folder: Path) -> dict:
    t, b = final["timing"], test["baseline"]["quality"]
    size = outputs.model_bytes(folder)
    info = json.loads((folder.parent / "build.json").read_text())

    def side(runtime, quality, size_bytes, tm, r):
        return {"runtime": runtime, "quality": quality, "size_bytes": size_bytes, "latency_ms": tm["latency_ms"],
                "throughput_per_s": tm["throughput_per_s"], "peak_rss_bytes": r}

    return {
        "workload": ctx.wl.name, "model": ctx.model, "recipe": f"plan trial {chosen['number']}",
        "data": ctx.wl.data_info(ctx.ev.data).as_dict(), "environment": environment(ctx.ev.threads),
        "baseline": side("torch-fp32-eager", b, ctx.ev.base.size_bytes, t["baseline"], rss["baseline"]),
        "compressed": side(final["runtime"], test[chosen["number"]]["quality"], size, t["compressed"], rss["compressed"]),
        "ratios": {"throughput": final["throughput_ratio"],
                   "latency_p50": t["compressed"]["latency_ms"]["p50"] / t["baseline"]["latency_ms"]["p50"],
                   "size": size / ctx.ev.base.size_bytes},
        "kernels": info["kernels"], "size_only": info["size_only"], "notes": info["notes"],
        "bench": {"repeats": final["repeats"], "serving_batch": final["batch"], "unit": final["unit"],
                  "latency_samples_per_round": 32, "end_to_end": ctx.ev.requests.note},
        "energy_j_per_item": final["energy_j_per_item"], "energy_method": ctx.ev.meter.as_dict(),
    }


def cost_figures(throughput_per_s: float, threads: int, folder: Path) -> dict:
    """Cloud cost: CPU-hours per million items at the measured rate; the artifact's bytes and gzip size."""
    import gzip
    import io
    import tarfile

    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        tar.add(str(folder), arcname="model")
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return {"cpu_hours_per_million": 1e6 / max(throughput_per_s, 1e-12) * threads / 3600,
            "artifact_bytes": total, "artifact_gzip_bytes": len(buf.getvalue())}


def _publish(ctx, folder: Path, chosen: dict, metrics: dict, plan: dict) -> None:
    from .report_html import render_html

    out = ctx.out
    if ctx.resolved.profile.report_cost:
        t, th = plan["final_timing"]["timing"], ctx.ev.threads
        plan["cost"] = {"baseline": {"cpu_hours_per_million": 1e6 / max(t["baseline"]["throughput_per_s"], 1e-12) * th / 3600,
                                     "artifact_bytes": ctx.ev.base.size_bytes},
                        "compressed": cost_figures(t["compressed"]["throughput_per_s"], th, folder)}
        metrics["cost"] = plan["cost"]
    recipe = Recipe.model_validate({**chosen["recipe"], "name": f"plan-{ctx.wl.name}-{ctx.resolved.profile.name}"})
    outputs.atomic_dir(out / "model", lambda tmp: outputs.copy_files(folder, tmp))
    outputs.write_json(out / "metrics.json", metrics)
    outputs.atomic_write_text(out / "recipe.yaml", recipe.to_yaml())
    outputs.atomic_write_text(out / "report.md", render_report(metrics, ctx.wl.higher_is_better))
    outputs.write_json(out / "plan.json", plan)
    outputs.atomic_write_text(out / "report.html", render_html(plan))
    ctx.emit("msg", f"wrote {out}")


def load_plan(out: Path) -> dict[str, Any]:
    return json.loads((Path(out) / "plan.json").read_text())
