"""The Python API the CLI calls: compress(), evaluate(), bench()."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from . import artifacts, formats
from .bench import default_threads, environment, measure_interleaved, paired_ratio, set_threads
from .compress.state import ModelState, StepContext
from .errors import SlimcartError
from .recipe import Recipe, load_recipe
from .report.markdown import render_report
from .workloads import get_workload

Progress = Callable[[str], None]


def _noop(msg: str) -> None:
    pass


def _save_state(wl, state: ModelState, folder: Path) -> None:
    """Write the compressed model in a format a standard runtime loads (ONNX, or an HF/safetensors folder)."""
    from .runtime.onnx_runtime import copy_onnx

    if state.saver is not None:
        folder.mkdir(parents=True, exist_ok=True)
        state.saver(folder)
        if hasattr(wl, "save_extras"):
            wl.save_extras(state.bundle, folder)
    elif state.runtime == "onnxruntime":
        copy_onnx(state.onnx_path, folder)
        wl.save_extras(state.bundle, folder)
    elif state.runtime.startswith("torch"):
        wl.save_model(state.bundle, folder)
    else:
        raise SlimcartError(f"cannot save a model for runtime '{state.runtime}'")


def baseline_size_bytes(module, workdir: Path) -> int:
    """Bytes of the baseline written as fp32 safetensors, measured on disk, then deleted."""
    from safetensors.torch import save_model

    path = workdir / "baseline.safetensors"
    save_model(module, str(path))
    size = path.stat().st_size
    path.unlink()
    return size


def peak_rss(workload: str, data: str | None, threads: int, model: str | None = None, artifact: Path | None = None) -> int | None:
    """Peak RSS of one side in a fresh process (None if the probe fails, with the reason on stderr)."""
    cmd = [sys.executable, "-m", "slimcart.rss_probe", "--workload", workload, "--threads", str(threads)]
    cmd += ["--artifact", str(artifact)] if artifact else ["--model", str(model)]
    if data:
        cmd += ["--data", data]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"warning: peak-RSS probe failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_bytes"])


def _side(runtime: str, quality: dict, size: int, timing: dict, rss: int | None) -> dict:
    return {
        "runtime": runtime, "quality": quality, "size_bytes": size,
        "latency_ms": timing["latency_ms"], "throughput_per_s": timing["throughput_per_s"],
        **({"extra_throughput_per_s": timing["extra_throughput_per_s"]} if "extra_throughput_per_s" in timing else {}),
        "peak_rss_bytes": rss,
    }


def compress(
    workload: str,
    model: str,
    recipe: str | Recipe,
    out: str | Path,
    data: str | None = None,
    overwrite: bool = False,
    threads: int | None = None,
    repeats: int = 5,
    measure_rss: bool = True,
    progress: Progress = _noop,
) -> dict:
    """Run a recipe on a model, measure baseline and result in the same run, write the output folder.

    Returns the metrics dict also written to OUT/metrics.json. The input model is never written;
    work happens in a hidden `.OUT.partial` folder that is renamed into place at the end. If a
    previous run with the same recipe and model was interrupted after building the model, the
    build is reused (the measurements are always redone).
    """
    out = Path(out)
    wl = get_workload(workload)
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    rec.check_workload(workload)
    artifacts.check_output_path(out, overwrite)
    threads = threads or default_threads()
    set_threads(threads)

    progress("loading model and data")
    bundle = wl.load_model(model)
    dataset = wl.load_data(data)
    info = wl.data_info(dataset)
    if info.synthetic:
        progress("WARNING: no real data found — using slimcart's SYNTHETIC data; quality figures are not meaningful")

    tmp = artifacts.partial_dir(out)
    identity = {"workload": workload, "model": model, "recipe": rec.to_dict()}
    model_dir, work = tmp / "model", tmp / "work"
    resumable = (tmp / "build.json").exists() and json.loads((tmp / "build.json").read_text()).get("identity") == identity
    if resumable:
        progress(f"resuming: reusing the model already built in {tmp}")
        build = json.loads((tmp / "build.json").read_text())
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        work.mkdir(parents=True)
        state = ModelState(bundle=replace(bundle, module=copy.deepcopy(bundle.module)))
        ctx = StepContext(workload=wl, data=dataset, workdir=work, progress=progress)
        for i, step in enumerate(rec.steps, 1):
            progress(f"step {i}/{len(rec.steps)}: {step.kind}")
            ctx.later_steps = tuple(s.kind for s in rec.steps[i:])
            state = step.apply(state, ctx)
        progress("saving compressed model")
        _save_state(wl, state, model_dir)
        build = {"identity": identity, "runtime": state.runtime, "kernels": state.kernels,
                 "size_only": state.size_only, "notes": state.notes}
        artifacts.write_json(tmp / "build.json", build)
        del state
    work.mkdir(parents=True, exist_ok=True)

    progress("reloading the compressed model from disk")
    cand_runner, cand_bundle = formats.load_model_dir(wl, model_dir)
    base_runner = wl.torch_runner(bundle)

    progress("evaluating baseline quality")
    base_eval = wl.evaluate(base_runner, bundle, dataset)
    progress("evaluating compressed quality")
    cand_eval = wl.evaluate(cand_runner, cand_bundle or bundle, dataset, reference=base_eval.outputs)

    progress("timing baseline and compressed, interleaved")
    inputs = wl.bench_inputs(bundle, dataset)
    timing = measure_interleaved({"baseline": base_runner, "compressed": cand_runner}, inputs, repeats=repeats,
                                 progress=progress)
    base_t, cand_t = timing["baseline"].summary(), timing["compressed"].summary()

    base_size = baseline_size_bytes(bundle.module, work)
    cand_size = artifacts.model_bytes(model_dir)
    base_rss = cand_rss = None
    if measure_rss:
        progress("measuring peak memory of each side in a fresh process")
        base_rss = peak_rss(workload, data, threads, model=model)
        cand_rss = peak_rss(workload, data, threads, artifact=model_dir)

    metrics = {
        "workload": workload,
        "model": model,
        "recipe": rec.name,
        "data": info.as_dict(),
        "environment": environment(threads),
        "baseline": _side("torch-fp32-eager", base_eval.quality, base_size, base_t, base_rss),
        "compressed": _side(cand_runner.runtime, cand_eval.quality, cand_size, cand_t, cand_rss),
        "ratios": {
            "throughput": paired_ratio(timing["compressed"].throughput_per_s, timing["baseline"].throughput_per_s),
            "latency_p50": cand_t["latency_ms"]["p50"] / base_t["latency_ms"]["p50"],
            "size": cand_size / base_size,
        },
        "kernels": build["kernels"],
        "size_only": build["size_only"],
        "notes": build["notes"],
        "bench": {"repeats": repeats, "serving_batch": inputs.items_per_serving_batch, "unit": inputs.unit,
                  "latency_samples_per_round": min(32, len(inputs.single))},
    }
    artifacts.write_json(tmp / "metrics.json", metrics)
    (tmp / "recipe.yaml").write_text(rec.to_yaml())
    (tmp / "report.md").write_text(render_report(metrics, wl.higher_is_better))
    shutil.rmtree(work, ignore_errors=True)
    (tmp / "build.json").unlink()
    artifacts.publish(tmp, out)
    progress(f"wrote {out}")
    return metrics


def load_any(wl, model: str):
    """(runner, bundle) for a model alias/folder, or a slimcart output folder."""
    p = Path(model)
    if p.is_dir() and (p / "metrics.json").exists() and (p / "model").is_dir():
        return formats.load_model_dir(wl, p / "model")
    if p.is_dir() and ((p / "model.onnx").exists() or (p / formats.FORMAT_FILE).exists()):
        return formats.load_model_dir(wl, p)
    bundle = wl.load_model(model)
    return wl.torch_runner(bundle), bundle


def evaluate(workload: str, model: str, data: str | None = None, threads: int | None = None,
             progress: Progress = _noop) -> dict:
    """Quality of one model (alias, folder, or slimcart output folder) on the workload's evaluation split."""
    wl = get_workload(workload)
    set_threads(threads or default_threads())
    progress("loading model and data")
    runner, bundle = load_any(wl, model)
    dataset = wl.load_data(data)
    progress("evaluating")
    result = wl.evaluate(runner, bundle, dataset)
    return {"workload": workload, "model": model, "runtime": runner.runtime, "data": wl.data_info(dataset).as_dict(),
            "quality": result.quality}


def bench(workload: str, model: str, baseline: str | None = None, data: str | None = None,
          threads: int | None = None, repeats: int = 5, progress: Progress = _noop) -> dict:
    """Interleaved timing of `model` against `baseline` (default: the output folder's source model)."""
    wl = get_workload(workload)
    threads = threads or default_threads()
    set_threads(threads)
    if baseline is None:
        mfile = Path(model) / "metrics.json"
        baseline = json.loads(mfile.read_text())["model"] if mfile.exists() else None
    progress("loading models and data")
    runner, bundle = load_any(wl, model)
    sides = {"model": runner}
    base_bundle = None
    if baseline is not None:
        base_runner, base_bundle = load_any(wl, baseline)
        sides = {"baseline": base_runner, "model": runner}
    dataset = wl.load_data(data)
    inputs = wl.bench_inputs(base_bundle or bundle, dataset)
    timing = measure_interleaved(sides, inputs, repeats=repeats, progress=progress)
    result: dict[str, Any] = {"workload": workload, "environment": environment(threads), "unit": inputs.unit,
                              "sides": {k: {"model": baseline if k == "baseline" else model, "runtime": sides[k].runtime,
                                            **timing[k].summary()} for k in sides}}
    if "baseline" in sides:
        result["ratios"] = {"throughput": paired_ratio(timing["model"].throughput_per_s, timing["baseline"].throughput_per_s)}
    return result
