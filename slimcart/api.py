"""The Python API the CLI, the benchmarks and the planner call:

    build(workload, model, recipe)   -> Built      run the recipe's steps on a copy of the model (no measuring)
    load(workload, model)            -> (runner, bundle)   any model: alias, folder, or slimcart output
    measure(workload, data, sides)   -> dict        quality of every side + interleaved timing, same run
    compress(...) = build + save + reload + measure + publish (OUT/model, metrics.json, recipe.yaml, report.md)
    evaluate(...), bench(...)        quality of one model; timing of one model against another
"""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from . import outputs
from .bench import (
    CpuCompetition,
    environment,
    measure_interleaved,
    paired_ratio,
    ratio_stats,
    reliability,
    resolve_threads,
    set_threads,
)
from .contracts import (
    ModelBundle,
    ModelState,
    Progress,
    Runner,
    StepContext,
    Workload,
    load_saved,
    no_progress,
    saved_format,
)
from .errors import SlimcartError
from .recipe import Recipe, load_plugins, load_recipe
from .report.markdown import render_report
from .workloads import get_workload


@dataclass
class Built:
    """What `build` leaves: the compressed model (state), the untouched baseline and the data."""

    workload: Workload
    recipe: Recipe
    baseline: ModelBundle
    data: Any
    state: ModelState
    threads: int
    seconds: float = 0.0


class PrefixCache:
    """Models built by leading runs of PyTorch-only steps, by those steps' settings: a recipe that starts
    with the same steps (e.g. the same `smoothquant`, or the same distilled student under several
    quantization variants) continues from a copy instead of rebuilding. Steps are deterministic, so
    this is the model the recipe would build alone."""

    def __init__(self):
        self.states: dict[str, tuple[ModelState, float]] = {}

    @staticmethod
    def key(steps, rest) -> str:
        """The leading steps' settings, and whether a teacher must survive them (a step that keeps one
        only does so when `recover` / `distill` follows)."""
        teacher = any(s.kind in ("recover", "distill") for s in rest)
        return json.dumps([[s.model_dump(mode="json") for s in steps], teacher])

    @staticmethod
    def snapshot(state: ModelState) -> ModelState:
        """A copy later steps can change freely (the tokenizer, never changed, is shared)."""
        return replace(state, bundle=replace(state.bundle, module=copy.deepcopy(state.bundle.module)),
                       kernels=list(state.kernels), size_only=list(state.size_only), notes=list(state.notes),
                       teacher=copy.deepcopy(state.teacher), keep_fp32=list(state.keep_fp32),
                       act_ranges=dict(state.act_ranges), masks=copy.deepcopy(state.masks),
                       reports=copy.deepcopy(state.reports), artifact=copy.copy(state.artifact))

    def longest(self, steps) -> tuple[int, ModelState | None, float]:
        for i in range(len(steps), 0, -1):
            if self.key(steps[:i], steps[i:]) in self.states:
                state, seconds = self.states[self.key(steps[:i], steps[i:])]
                return i, self.snapshot(state), seconds
        return 0, None, 0.0

    def store(self, steps, rest, state: ModelState, seconds: float) -> None:
        if state.artifact is None or state.artifact.in_torch:  # exported files may be rewritten by later steps
            self.states[self.key(steps, rest)] = (self.snapshot(state), seconds)


def _recipe(recipe: str | Path | Recipe) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def build(workload: str | Workload, model: str, recipe: str | Path | Recipe, data: str | None = None,
          threads: int | None = None, workdir: Path | None = None, progress: Progress = no_progress,
          loaded: tuple[ModelBundle, Any] | None = None, cache: PrefixCache | None = None,
          target: str | None = None) -> Built:
    """Load the model and data (or take `loaded`), run the recipe's steps on a deep copy of the model
    (continuing from `cache` where it holds the recipe's leading steps). Nothing is measured or written
    outside `workdir` (a temporary folder when not given). `Built.seconds`: time spent in steps."""
    import tempfile

    wl, rec = get_workload(workload), _retarget(_recipe(recipe), target)
    rec.check_workload(wl.name)
    threads = resolve_threads(threads)
    set_threads(threads)
    load_plugins()
    if loaded is None:
        progress("loading model and data")
        bundle, dataset = wl.load_model(model), wl.load_data(data)
    else:
        bundle, dataset = loaded
    if wl.data_info(dataset).synthetic:
        progress("WARNING: no real data found — using slimcart's SYNTHETIC data; quality figures are not meaningful")
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="slimcart-build-"))
    workdir.mkdir(parents=True, exist_ok=True)
    start, state, seconds = cache.longest(rec.steps) if cache is not None else (0, None, 0.0)
    if state is None:
        state = ModelState(bundle=replace(bundle, module=copy.deepcopy(bundle.module)))
    else:
        progress(f"reusing the first {start} step(s) built for an earlier recipe")
    ctx = StepContext(workload=wl, data=dataset, workdir=workdir, threads=threads, progress=progress)
    for i, step in enumerate(rec.steps[start:], start + 1):
        progress(f"step {i}/{len(rec.steps)}: {step.kind}")
        ctx.later_steps = tuple(s.kind for s in rec.steps[i:])
        t0 = time.perf_counter()
        state = step.apply(state, ctx)
        seconds += time.perf_counter() - t0
        if cache is not None:
            cache.store(rec.steps[:i], rec.steps[i:], state, seconds)
    if target is not None and runtime_family(state.runtime) != target:
        extra = _steps_to(target, state.runtime, rec.name)
        for step in extra:
            progress(f"step {step.kind} (for --target {target})")
            state = step.apply(state, ctx)
        rec = rec.model_copy(update={"steps": rec.steps + extra})
    return Built(wl, _resolved(rec, state), bundle, dataset, state, threads, seconds)


TARGETS = ("torch", "onnxruntime", "openvino")


def runtime_family(runtime: str) -> str:
    """The deployable runtime a runner's label belongs to (torch-compile-bf16 -> torch, ...)."""
    return next((t for t in ("onnxruntime", "openvino") if runtime.startswith(t)), "torch")


def _retarget(rec: Recipe, target: str | None) -> Recipe:
    """Steps that choose a runtime (`runtime: auto`) are told the target instead."""
    if target is None:
        return rec
    if target not in TARGETS:
        raise SlimcartError(f"unknown target '{target}' (choose one of: {', '.join(TARGETS)})")
    steps = [s.model_copy(update={"runtime": target}) if "runtime" in type(s).model_fields and target != "torch" else s
             for s in rec.steps]
    return rec.model_copy(update={"steps": steps})


def _steps_to(target: str, runtime: str, name: str) -> list:
    """Steps that move a built model onto the target runtime, or a clear refusal."""
    from .recipe import parse_step

    family = runtime_family(runtime)
    if target == "torch" or (family == "onnxruntime" and "matmulnbits" in runtime):
        raise SlimcartError(f"recipe '{name}' builds a {runtime} model: it cannot be deployed on {target}")
    if target == "onnxruntime":  # family torch
        return [parse_step({"kind": "export_onnx"})]
    return ([parse_step({"kind": "export_onnx"})] if family == "torch" else []) + [parse_step({"kind": "to_openvino"})]


def _resolved(rec: Recipe, state: ModelState) -> Recipe:
    """The recipe with every `runtime: auto` replaced by what the step chose, so a rerun builds the same artifact."""
    steps = [s.model_copy(update={"runtime": state.reports[s.kind]["runtime"]})
             if getattr(s, "runtime", None) == "auto" and "runtime" in state.reports.get(s.kind, {}) else s
             for s in rec.steps]
    return rec.model_copy(update={"steps": steps})


def load(workload: str | Workload, model: str | Path, threads: int | None = None) -> tuple[Runner, ModelBundle]:
    """(runner, bundle) for a model alias or folder, a saved model folder of any slimcart format, or a
    slimcart output folder (OUT with metrics.json and model/)."""
    wl, threads = get_workload(workload), resolve_threads(threads)
    load_plugins()
    p = Path(model).expanduser()
    if p.is_dir() and (p / "metrics.json").is_file() and (p / "model").is_dir():
        return load_saved(p / "model", wl, threads)
    if p.is_dir() and ((p / "model.onnx").exists() or (p / "slimcart-format.json").exists()):
        return load_saved(p, wl, threads)
    bundle = wl.load_model(str(model))
    return wl.torch_runner(bundle), bundle


def baseline_size_bytes(module, workdir: Path) -> int:
    """Bytes of the baseline written as fp32 safetensors, measured on disk, then deleted."""
    from safetensors.torch import save_model

    path = Path(workdir) / "baseline.safetensors"
    save_model(module, str(path))
    size = path.stat().st_size
    path.unlink()
    return size


def peak_rss(workload: str, data: str | None, threads: int, model: str | Path) -> int | None:
    """Peak RSS of loading and running one model in a fresh process (None if the probe fails, with
    the reason on stderr). Only registered workloads (by name) can be probed."""
    cmd = [sys.executable, "-m", "slimcart.rss_probe", "--workload", workload, "--threads", str(threads),
           "--model", str(model)] + (["--data", data] if data else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"warning: peak-RSS probe failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_bytes"])


def measure(workload: str | Workload, data: Any, sides: dict[str, tuple[Runner, ModelBundle]], threads: int,
            repeats: int = 5, reference: str | None = None, quality: bool | set[str] = True,
            progress: Progress = no_progress) -> dict:
    """Quality of every side on the evaluation split (unless `quality` is False) and their timing,
    interleaved in the same run. `reference`: the side whose outputs the others are compared with (e.g.
    cosine to the baseline); its bundle also prepares the timing inputs. `quality` may name the sides to
    evaluate (the others are only timed).
    Returns {"quality": {side: {...}}, "timing": {side: SideTiming}, "inputs": BenchInputs}."""
    wl = get_workload(workload)
    if repeats < 1:
        raise SlimcartError(f"repeats must be at least 1, got {repeats}")
    set_threads(threads)
    results, ref_out = {}, None
    order = ([reference] if reference else []) + [k for k in sides if k != reference]
    for name in [n for n in order if quality is True or (quality and n in quality)]:
        progress(f"evaluating {name} quality")
        runner, bundle = sides[name]
        res = wl.evaluate(runner, bundle, data, reference=ref_out)
        results[name] = res.quality
        if name == reference:
            ref_out = res.outputs
    progress("timing " + ", ".join(sides) + " interleaved")
    inputs = wl.bench_inputs(sides[order[0]][1], data)
    competition = CpuCompetition()
    timing = measure_interleaved({k: r for k, (r, _) in sides.items()}, inputs, repeats=repeats, progress=progress)
    return {"quality": results, "timing": timing, "inputs": inputs, "others_cpus": competition.others_cpus()}


def _side(runtime: str, quality: dict, size: int, timing: dict, rss: int | None) -> dict:
    return {
        "runtime": runtime, "quality": quality, "size_bytes": size,
        "latency_ms": timing["latency_ms"], "throughput_per_s": timing["throughput_per_s"],
        "cpu_ms_per_item": timing["cpu_ms_per_item"],
        **({"extra_throughput_per_s": timing["extra_throughput_per_s"]} if "extra_throughput_per_s" in timing else {}),
        "peak_rss_bytes": rss,
    }


def _identity(wl: Workload, model: str, bundle: ModelBundle, dataset: Any, rec: Recipe) -> dict:
    """What a resumed build must match: the recipe, and the model's and data's contents (not their paths)."""
    from . import __version__

    info = wl.data_info(dataset)
    return {"workload": wl.name, "model": model, "model_digest": outputs.tree_digest(bundle.source),
            "weights_digest": bundle.extra.get("weights_digest"),  # a model handed over in memory (no folder)
            "data": info.as_dict(), "data_digest": outputs.tree_digest(info.source),
            "extra_data_digests": [outputs.tree_digest(p) for p in info.extra_sources], "recipe": rec.to_dict(),
            "slimcart": __version__}


def _resumable(tmp: Path, identity: dict, progress: Progress) -> dict | None:
    """The earlier build in `tmp` if it is complete and of the same identity; a corrupt one is discarded."""
    state_file = tmp / "build.json"
    if not state_file.exists():
        return None
    try:
        build_info = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        progress(f"discarding an unreadable earlier partial build in {tmp}")
        return None
    if not isinstance(build_info, dict) or build_info.get("identity") != identity or not (tmp / "model").is_dir():
        return None
    return build_info


def compress(workload: str | Workload, model: str, recipe: str | Path | Recipe, out: str | Path, data: str | None = None,
             overwrite: bool = False, threads: int | None = None, repeats: int = 5, measure_rss: bool = True,
             target: str | None = None, progress: Progress = no_progress) -> dict:
    """Run a recipe on a model, measure baseline and result in the same run, write the output folder.

    Returns the metrics dict also written to OUT/metrics.json. The input model is never written;
    work happens in a hidden `.OUT.partial` folder that is renamed into place at the end. If a
    previous run with the same recipe, model contents and data was interrupted after building the
    model, the build is reused (the measurements are always redone).
    """
    out = Path(out)
    wl, rec = get_workload(workload), _retarget(_recipe(recipe), target)
    rec.check_workload(wl.name)
    threads = resolve_threads(threads)
    if repeats < 1:
        raise SlimcartError(f"repeats must be at least 1, got {repeats}")
    outputs.check_output_path(out, overwrite, _input_paths(model, data))
    with outputs.OutputLock(out):
        tmp = outputs.partial_dir(out)
        for stale in tmp.parent.glob(f".{out.resolve().name}.old-*"):  # left by a run killed while publishing
            shutil.rmtree(stale, ignore_errors=True)
        try:
            return _compress_locked(wl, model, rec, out, data, threads, repeats, measure_rss, overwrite, target, progress)
        except OSError as e:  # disk full, permissions...: one line, and no half-written folder left to fill the disk
            shutil.rmtree(tmp, ignore_errors=True)
            raise SlimcartError(f"cannot write the output ({e.strerror or e}: {e.filename or out}); nothing was published") from None


def _input_paths(model: str, data: str | None) -> tuple[Path | None, ...]:
    """Folders and files the run reads, which an output must never overlap."""
    from .paths import data_root

    paths = [Path(x).expanduser() for x in (model, data) if x and Path(x).expanduser().exists()]
    return (*paths, data_root())


def _compress_locked(wl, model, rec, out, data, threads, repeats, measure_rss, overwrite, target, progress) -> dict:
    set_threads(threads)
    progress("loading model and data")
    bundle, dataset = wl.load_model(model), wl.load_data(data)
    info = wl.data_info(dataset)
    outputs.check_output_path(out, overwrite, (bundle.source, info.source))  # an alias's folder is known only now
    tmp = outputs.partial_dir(out)
    model_dir, work = tmp / "model", tmp / "work"
    identity = {**_identity(wl, model, bundle, dataset, rec), "target": target}
    build_info = _resumable(tmp, identity, progress)
    if build_info is not None:
        progress(f"resuming: reusing the model already built in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        work.mkdir(parents=True)
        built = build(wl, model, rec, threads=threads, workdir=work, progress=progress, loaded=(bundle, dataset),
                      target=target)
        progress("saving compressed model")
        built.state.save(model_dir, wl)
        st = built.state
        build_info = {"identity": identity, "runtime": st.runtime, "kernels": st.kernels, "size_only": st.size_only,
                      "notes": st.notes, "recipe": built.recipe.to_dict()}
        outputs.write_json(tmp / "build.json", build_info)
        del built, st
    work.mkdir(parents=True, exist_ok=True)

    progress("reloading the compressed model from disk")
    load_plugins()
    fmt, _ = saved_format(model_dir)
    cand = load_saved(model_dir, wl, threads)
    sides = {"baseline": (wl.torch_runner(bundle), bundle), "compressed": cand}
    ref = fmt.reference(wl, bundle, work / "reference", threads)
    if ref is not None:
        sides["baseline_same_runtime"] = (ref, bundle)
    env_before = environment(threads)
    m = measure(wl, dataset, sides, threads, repeats, reference="baseline", quality={"baseline", "compressed"},
                progress=progress)
    env_after = environment(threads)
    timing, inputs = m["timing"], m["inputs"]
    summaries = {k: t.summary() for k, t in timing.items()}
    base_size = baseline_size_bytes(bundle.module, work)
    cand_size = outputs.model_bytes(model_dir)
    base_rss = cand_rss = None
    if measure_rss and isinstance(getattr(wl, "name", None), str) and wl.name in _registered():
        progress("measuring peak memory of each side in a fresh process")
        base_rss = peak_rss(wl.name, data, threads, model)
        cand_rss = peak_rss(wl.name, data, threads, model_dir)
    detail = {"throughput": ratio_stats(timing["compressed"].throughput_per_s, timing["baseline"].throughput_per_s)}
    if ref is not None:  # what the runtime buys (fp32 on it vs torch) and what compression buys on top
        detail["runtime_gain"] = ratio_stats(timing["baseline_same_runtime"].throughput_per_s,
                                             timing["baseline"].throughput_per_s)
        detail["compression_gain"] = ratio_stats(timing["compressed"].throughput_per_s,
                                                 timing["baseline_same_runtime"].throughput_per_s)
    trust = reliability(env_before["load_average"], env_after["load_average"], env_before["logical_cpus"], detail, threads,
                        m["others_cpus"])
    metrics = {
        "workload": wl.name,
        "model": model,
        "recipe": build_info.get("recipe", {}).get("name", rec.name),
        "data": info.as_dict(),
        "environment": {**env_before, "load_average_after": env_after["load_average"],
                        "other_processes_cpus_while_timing": m["others_cpus"]},
        "baseline": _side("torch-fp32-eager", m["quality"]["baseline"], base_size, summaries["baseline"], base_rss),
        "compressed": _side(cand[0].runtime, m["quality"]["compressed"], cand_size, summaries["compressed"], cand_rss),
        "ratios": {
            "throughput": detail["throughput"]["median"],
            "latency_p50": summaries["compressed"]["latency_ms"]["p50"] / summaries["baseline"]["latency_ms"]["p50"],
            "size": cand_size / base_size,
            **({"runtime_gain": detail["runtime_gain"]["median"], "compression_gain": detail["compression_gain"]["median"]}
               if ref is not None else {}),
        },
        "ratio_detail": detail,
        "speed_reliability": trust,
        "kernels": build_info["kernels"],
        "size_only": build_info["size_only"],
        "notes": build_info["notes"],
        "bench": {"repeats": repeats, "serving_batch": inputs.items_per_serving_batch, "unit": inputs.unit,
                  "throughput_label": inputs.label or f"batch {inputs.items_per_serving_batch}",
                  "latency_samples_per_round": min(32, len(inputs.single))},
    }
    if ref is not None:
        metrics["baseline_same_runtime"] = {"runtime": ref.runtime, "latency_ms": summaries["baseline_same_runtime"]["latency_ms"],
                                            "throughput_per_s": summaries["baseline_same_runtime"]["throughput_per_s"],
                                            "cpu_ms_per_item": summaries["baseline_same_runtime"]["cpu_ms_per_item"]}
    if not trust["reliable"]:
        progress("WARNING: speed figures unreliable: " + "; ".join(trust["reasons"]))
    outputs.write_json(tmp / "metrics.json", metrics)
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(build_info.get("recipe") or rec.to_dict(), sort_keys=False))
    (tmp / "report.md").write_text(render_report(metrics, wl.higher_is_better, model_dir))
    shutil.rmtree(work, ignore_errors=True)
    (tmp / "build.json").unlink()
    outputs.publish(tmp, out)
    progress(f"wrote {out}")
    return metrics


def _registered() -> tuple[str, ...]:
    from .workloads import WORKLOADS

    return WORKLOADS


def evaluate(workload: str | Workload, model: str, data: str | None = None, threads: int | None = None,
             progress: Progress = no_progress) -> dict:
    """Quality of one model (alias, folder, or slimcart output folder) on the workload's evaluation split."""
    wl = get_workload(workload)
    threads = resolve_threads(threads)
    set_threads(threads)
    progress("loading model and data")
    runner, bundle = load(wl, model, threads)
    dataset = wl.load_data(data)
    progress("evaluating")
    result = wl.evaluate(runner, bundle, dataset)
    return {"workload": wl.name, "model": model, "runtime": runner.runtime, "data": wl.data_info(dataset).as_dict(),
            "quality": result.quality}


def bench(workload: str | Workload, model: str, baseline: str | None = None, data: str | None = None,
          threads: int | None = None, repeats: int = 5, progress: Progress = no_progress) -> dict:
    """Interleaved timing of `model` against `baseline` (default: the output folder's source model)."""
    wl, threads = get_workload(workload), resolve_threads(threads)
    if baseline is None and (Path(model) / "metrics.json").is_file():
        baseline = json.loads((Path(model) / "metrics.json").read_text())["model"]
    progress("loading models and data")
    sides = {"baseline": load(wl, baseline, threads)} if baseline is not None else {}
    sides["model"] = load(wl, model, threads)
    m = measure(wl, wl.load_data(data), sides, threads, repeats, quality=False, progress=progress)
    t = m["timing"]
    result: dict[str, Any] = {"workload": wl.name, "environment": environment(threads), "unit": m["inputs"].unit,
                              "sides": {k: {"model": baseline if k == "baseline" else model, "runtime": sides[k][0].runtime,
                                            **t[k].summary()} for k in sides}}
    if "baseline" in sides:
        result["ratios"] = {"throughput": paired_ratio(t["model"].throughput_per_s, t["baseline"].throughput_per_s)}
    return result
