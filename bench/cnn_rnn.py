"""Benchmark: compressing the CNN (vision) and the RNN (session) workloads on real data, every speed
figure a same-run ratio.

vision   the product-photo ResNet slimcart trains (`slimcart train --workload vision`, alias `cnn`) on
         images-clothing: test accuracy and macro-F1 of the trained model; for each cnn-* recipe the
         model is built through api.build, saved (ModelState.save), RELOADED (api.load) and evaluated
         through the reloaded copy on the test split; batch-32 throughput (every full batch of 32
         decoded test photos) of every model timed interleaved in ONE run with PyTorch fp32 (channels-
         last, checked against NCHW in the same run), and channel pruning also against its dense model
         on the same runtime (PyTorch vs PyTorch, ONNX Runtime fp32 vs ONNX Runtime fp32, int8 vs int8);
         parameters and bytes on disk; the photo decode + resize cost measured on its own.
session  (the RNN section is added by the session engineer: a `bench_session(args, work) -> dict`
         registered in SECTIONS and a `session_markdown(r) -> list[str]` for the doc)

    SLIMCART_DATA=/work/shared/data python bench/cnn_rnn.py [--sections vision] [--threads 2] [--build-threads 1]
    python bench/cnn_rnn.py --render-only      # rewrite the doc from bench/results/cnn_rnn.json

Writes bench/results/cnn_rnn.json and docs/bench-cnn-rnn.md. Distillation runs are resumable and a
finished one is reused by a rerun (its own training time is reported from its checkpoint).
The load average is recorded before and after every section: on a shared machine speeds are not final.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slimcart import api, outputs  # noqa: E402
from slimcart.bench import environment, measure_interleaved, paired_ratio, set_threads  # noqa: E402
from slimcart.contracts import ModelState, StepContext  # noqa: E402
from slimcart.models.cnn import count_params  # noqa: E402
from slimcart.recipe import load_recipe, parse_step  # noqa: E402
from slimcart.runtime.onnx_runtime import OnnxRunner  # noqa: E402
from slimcart.workloads import get_workload  # noqa: E402
from slimcart.workloads.vision import VisionRunner  # noqa: E402

VISION_RECIPES = ["cnn-int8", "cnn-prune-30", "cnn-prune-30-int8", "cnn-distill-half", "cnn-distill-half-int8"]
TARGETS = {"max_accuracy_loss_points": 1.0, "min_speedup_vs_torch_fp32": 3.0, "min_pruning_speedup_same_runtime": 1.5}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", flush=True)


def onnx_fp32(wl, bundle, workdir: Path, threads: int) -> OnnxRunner:
    """The model exported exactly as the export_onnx step does, on ONNX Runtime fp32."""
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = StepContext(workload=wl, data=None, workdir=workdir, threads=threads, progress=log)
    state = parse_step({"kind": "export_onnx"}).apply(ModelState(bundle=bundle), ctx)
    return OnnxRunner(state.artifact.path, threads)


def points(q: dict, base: dict) -> dict:
    return {k: round(100 * (q[k] - base[k]), 2) for k in base}


def bench_vision(args, work: Path) -> dict:
    wl = get_workload("vision")
    bundle, data = wl.load_model(args.vision_model), wl.load_data(args.data)
    info = wl.data_info(data)
    res: dict = {"data": info.as_dict(), "model": args.vision_model, "targets": TARGETS,
                 "quality_split": "test", "selection_split": "validation (distillation keeps the best validation accuracy)"}
    training = bundle.extra["config"].get("training", {})
    res["trained_model"] = {"params": count_params(bundle.module), "config": bundle.extra["config"]["model"],
                            "training_seconds": training.get("seconds"), "best_epoch": training.get("best_epoch"),
                            "val_accuracy": training.get("val_accuracy")}
    base_runner = wl.torch_runner(bundle)  # PyTorch fp32 eager, channels-last
    base = wl.evaluate(base_runner, bundle, data)
    res["baseline_quality"] = base.quality
    log(f"baseline (torch fp32) {base.quality}")
    res["preprocess"] = wl.preprocess_cost(bundle, data, n=64)
    log(f"decode + resize: {res['preprocess']['ms_per_image_p50']:.2f} ms per photo (median)")
    dense_dir = work / "dense"
    wl.save_model(bundle, dense_dir)
    res["baseline_bytes"] = outputs.model_bytes(dense_dir)

    cache, rows, runners = api.PrefixCache(), {}, {}
    for name in args.vision_recipes.split(","):
        log(f"building {name}")
        t0 = time.perf_counter()
        built = api.build(wl, args.vision_model, load_recipe(name), threads=args.build_threads, workdir=work / f"{name}-work",
                          progress=log, loaded=(bundle, data), cache=cache)
        seconds = time.perf_counter() - t0
        folder = work / name
        built.state.save(folder, wl)
        runner, rb = api.load(wl, folder, args.threads)  # everything below uses the reloaded model
        q = wl.evaluate(runner, rb, data).quality
        log(f"{name} (reloaded, {runner.runtime}) {q}")
        distill = built.state.reports.get("distill")
        source = built.state.bundle.module
        rows[name] = {"runtime": runner.runtime, "quality": q, "change_points": points(q, base.quality),
                      "bytes": outputs.model_bytes(folder), "params": count_params(source),
                      "build_seconds_this_run": round(seconds, 1), "kernels": built.state.kernels, "notes": built.state.notes,
                      "prune_channels": {k: v for k, v in built.state.reports.get("prune_channels", {}).items() if k != "layers"}
                      or None,
                      "widths": {n: v["after"] for n, v in built.state.reports.get("prune_channels", {}).get("layers", {}).items()}
                      or None,
                      "distill": {k: distill[k] for k in ("steps", "seconds", "cpu_seconds", "stopped", "best_score", "best_step",
                                                          "resumed_at_step", "history") if k in distill} if distill else None,
                      "runtime_timing_s": built.state.reports.get("runtime_timing_s")}
        runners[name] = runner
        if name == "cnn-prune-30":  # the same pruned model on ONNX Runtime fp32, for the same-runtime ratio
            runners["cnn-prune-30 (onnxruntime fp32)"] = onnx_fp32(wl, rb, work / "onnx-pruned", args.threads)
    res["recipes"] = rows

    sides = {"torch fp32 (channels-last)": base_runner, "torch fp32 (NCHW)": VisionRunner(bundle.module, channels_last=False)}
    if "cnn-prune-30" in rows:
        sides["onnxruntime fp32"] = onnx_fp32(wl, bundle, work / "onnx-dense", args.threads)
    sides.update(runners)
    inputs = wl.bench_inputs(bundle, data)
    log(f"timing {len(sides)} sides interleaved: {len(inputs.serving)} batches of {inputs.items_per_serving_batch} photos, "
        f"{args.repeats} rounds, {args.threads} thread(s)")
    load0 = os.getloadavg()
    t = measure_interleaved(sides, inputs, repeats=args.repeats, progress=log)
    base_key = "torch fp32 (channels-last)"
    timing = {}
    for k in sides:
        s = t[k].summary()
        timing[k] = {"runtime": sides[k].runtime, "images_per_s": s["throughput_per_s"],
                     "latency_batch1_p50_ms": s["latency_ms"]["p50"],
                     "vs_torch_fp32": paired_ratio(t[k].throughput_per_s, t[base_key].throughput_per_s),
                     "rounds_images_per_s": t[k].throughput_per_s}
    res["timing"] = {"threads": args.threads, "batch": inputs.items_per_serving_batch, "batches": len(inputs.serving),
                     "repeats": args.repeats, "loadavg_before": list(load0), "loadavg_after": list(os.getloadavg()),
                     "sides": timing}
    ratio = lambda a, b: paired_ratio(t[a].throughput_per_s, t[b].throughput_per_s) if a in t and b in t else None  # noqa: E731
    res["channels_last_vs_nchw"] = ratio(base_key, "torch fp32 (NCHW)")
    same = {}
    for pruned, dense_torch, dense_ort, dense_int8 in (("cnn-prune-30", base_key, "onnxruntime fp32", None),
                                                       ("cnn-prune-30-int8", None, None, "cnn-int8"),
                                                       ("cnn-distill-half", base_key, None, None),
                                                       ("cnn-distill-half-int8", None, None, "cnn-int8")):
        if pruned not in rows:
            continue
        r = {}
        if dense_torch:
            r["torch_vs_torch"] = ratio(pruned, dense_torch)
        if dense_ort and "cnn-prune-30 (onnxruntime fp32)" in t:
            r["onnxruntime_fp32_vs_onnxruntime_fp32"] = ratio("cnn-prune-30 (onnxruntime fp32)", dense_ort)
        if dense_int8 and dense_int8 in rows and rows[dense_int8]["runtime"] == rows[pruned]["runtime"]:
            r[f"int8_vs_int8 ({rows[pruned]['runtime']})"] = ratio(pruned, dense_int8)
        same[pruned] = r
    res["pruning_same_runtime"] = same
    res["preprocess_vs_model"] = {k: res["preprocess"]["images_per_s_1_thread"] / v["images_per_s"] for k, v in timing.items()}
    met = [k for k, r in rows.items() if r["change_points"]["accuracy"] >= -TARGETS["max_accuracy_loss_points"]
           and timing[k]["vs_torch_fp32"] >= TARGETS["min_speedup_vs_torch_fp32"]]
    res["targets_met"] = {"int8_or_combined": met,
                          "pruning_alone_same_runtime": {k: v for k, v in same.items() if k == "cnn-prune-30"}}
    return res


SECTIONS = {"vision": bench_vision}  # "session": bench_session (added with the RNN workload)


# ---------------------------------------------------------------- report
def fmt(x, spec=".2f", none="–"):
    return none if x is None else format(x, spec)


def vision_markdown(r: dict) -> list[str]:
    b, tm = r["baseline_quality"], r["timing"]
    sides = tm["sides"]
    tr = r["trained_model"]
    lines = [
        "## Vision: product-photo ResNet (images-clothing)", "",
        f"Model `{r['model']}`: a ResNet of BasicBlocks (stage widths {tr['config']['widths']}, blocks {tr['config']['blocks']}) "
        f"on {tr['config']['image_size']} px photos, {tr['params']:,} parameters, trained from scratch by "
        f"slimcart (validation accuracy {fmt(tr.get('val_accuracy'), '.3f')}). Quality on the **{r['quality_split']}** split "
        f"({r['data']['split']}); {r['selection_split']}. Every compressed model was saved, reloaded and evaluated "
        "through the reloaded copy.", "",
        f"Trained model (PyTorch fp32): **accuracy {b['accuracy']:.4f}, macro-F1 {b['macro_f1']:.4f}**.", "",
        f"Timing: batch {tm['batch']} ({tm['batches']} batches of decoded test photos per round), {tm['repeats']} "
        f"interleaved rounds, {tm['threads']} thread(s), load average {fmt(tm['loadavg_before'][0], '.1f')} before / "
        f"{fmt(tm['loadavg_after'][0], '.1f')} after. Ratios are medians of per-round ratios against PyTorch fp32 "
        "(channels-last) timed in the same rounds.", "",
        "| model | runtime | accuracy | Δ acc (points) | macro-F1 | Δ F1 (points) | images/s | × torch fp32 | params | bytes |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| baseline | torch fp32 | {b['accuracy']:.4f} | – | {b['macro_f1']:.4f} | – | "
        f"{sides['torch fp32 (channels-last)']['images_per_s']:.1f} | 1.00 | {tr['params']:,} | {r['baseline_bytes']:,} |",
    ]
    for name, row in r["recipes"].items():
        q, d, s = row["quality"], row["change_points"], sides[name]
        lines.append(f"| `{name}` | {row['runtime']} | {q['accuracy']:.4f} | {d['accuracy']:+.2f} | {q['macro_f1']:.4f} | "
                     f"{d['macro_f1']:+.2f} | {s['images_per_s']:.1f} | {s['vs_torch_fp32']:.2f} | {row['params']:,} | "
                     f"{row['bytes']:,} |")
    lines += ["", "Other sides in the same run:", ""]
    for k, s in sides.items():
        if k not in r["recipes"] and k != "torch fp32 (channels-last)":
            lines.append(f"- {k}: {s['images_per_s']:.1f} images/s ({s['vs_torch_fp32']:.2f}× torch fp32 channels-last)")
    cl = r.get("channels_last_vs_nchw")
    lines += ["", f"Channels-last vs NCHW PyTorch fp32 (same run): **{fmt(cl)}×**: "
              + ("the baseline uses channels-last (what a competent user deploys)." if cl and cl >= 1 else
                 "NCHW was faster in this run; the workload's runner uses channels-last (faster in earlier runs).")]
    lines += ["", "### Channel pruning on the same runtime as its dense model", "",
              "| pruned model | comparison | throughput ratio |", "|---|---|---|"]
    for name, cmp in r["pruning_same_runtime"].items():
        for what, v in cmp.items():
            lines.append(f"| `{name}` | {what.replace('_', ' ')} | {fmt(v)} |")
    lines += ["", "### How each model was built", "",
              "Channel pruning physically removes filters (Torch-Pruning's dependency graph: batch norm, residual "
              "additions and every consumer's input channels follow), then re-estimates the batch-norm statistics on "
              "calibration photos. Recovery is the `distill` step with student `current`: the vision workload's "
              "distillation task (every training photo, augmented as in training, teacher soft labels + true class, "
              "batch norm updating, the best validation accuracy kept), rather than `recover`, which trains on a few "
              "calibration batches against transformer-block hidden states and has no CNN adapter.", ""]
    for name, row in r["recipes"].items():
        d = row.get("distill")
        extra = ""
        if d:
            extra = (f" Distillation: {d['steps']} steps, {d['seconds'] / 60:.1f} min wall / {d['cpu_seconds'] / 60:.1f} CPU-min "
                     f"of training ({d['stopped']}), best validation accuracy {d['best_score']:.4f} at step {d['best_step']}"
                     + (" (a finished run reused from its checkpoint)" if d.get("resumed_at_step") else "") + ".")
        lines.append(f"- `{name}`: " + "; ".join(row["notes"]) + "." + extra
                     + f" Kernels: {', '.join(row['kernels']) or 'PyTorch eager'}.")
    p = r["preprocess"]
    lines += ["", "### Decode + resize (measured apart from the model)", "",
              f"{p['what']}: median {p['ms_per_image_p50']:.2f} ms per photo (p90 {p['ms_per_image_p90']:.2f} ms) on one "
              f"thread, {p['images_per_s_1_thread']:.0f} photos/s ({p['images']} test photos, load average "
              f"{p['loadavg_before'][0]:.1f}). Per model: one core decoding gives "
              + ", ".join(f"{k} {v:.2f}×" for k, v in r["preprocess_vs_model"].items())
              + " of that model's batch-32 throughput (below 1: decoding is the bottleneck).", ""]
    met = r["targets_met"]
    t = r["targets"]
    lines += ["### Targets", "",
              f"- ≤ {t['max_accuracy_loss_points']:g} point accuracy loss at ≥ {t['min_speedup_vs_torch_fp32']:g}× PyTorch fp32: "
              + (", ".join(f"`{k}`" for k in met["int8_or_combined"]) + " meet it" if met["int8_or_combined"] else "**not met**"),
              f"- channel pruning alone ≥ {t['min_pruning_speedup_same_runtime']:g}× on the dense model's runtime: "
              + "; ".join(f"`{k}` " + ", ".join(f"{w.replace('_', ' ')} {fmt(v)}×" for w, v in cmp.items())
                          for k, cmp in met["pruning_alone_same_runtime"].items()), ""]
    return lines


def markdown(results: dict) -> str:
    env = results.get("environment", {})
    lines = ["# Benchmark: CNN and RNN compression", "",
             "Generated by `bench/cnn_rnn.py`; raw figures in `bench/results/cnn_rnn.json`. Speed figures are same-run "
             "ratios measured on a shared machine (load average given with each table): they are not final until rerun "
             "on an idle machine.", "",
             f"CPU: {env.get('cpu')} ({', '.join(env.get('cpu_flags', []))}), {env.get('logical_cpus')} logical CPUs; "
             f"torch {env.get('versions', {}).get('torch')}, onnxruntime {env.get('versions', {}).get('onnxruntime')}, "
             f"openvino {env.get('versions', {}).get('openvino')}.", ""]
    if "vision" in results:
        lines += vision_markdown(results["vision"])
    lines += ["## Session (RNN)", "",
              "Not measured yet: the session workload's section (`bench_session`) is added by its engineer." if "session" not in results
              else "See `session` in the JSON.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sections", default="vision")
    p.add_argument("--data", default=None)
    p.add_argument("--threads", type=int, default=2)  # timing
    p.add_argument("--build-threads", type=int, default=1)  # training / calibration (one thread ran faster on the shared machine)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--vision-model", default="cnn")
    p.add_argument("--vision-recipes", default=",".join(VISION_RECIPES))
    p.add_argument("--render-only", action="store_true", help="rewrite the doc from the JSON without measuring")
    args = p.parse_args()
    out_json = ROOT / "bench" / "results" / "cnn_rnn.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    if args.render_only:
        (ROOT / "docs" / "bench-cnn-rnn.md").write_text(markdown(results))
        return
    set_threads(args.threads)
    results["environment"] = environment(args.threads)
    for section in args.sections.split(","):
        if section not in SECTIONS:
            raise SystemExit(f"unknown section '{section}' (have: {', '.join(SECTIONS)})")
        t0, load0 = time.time(), os.getloadavg()
        with tempfile.TemporaryDirectory() as tmp:
            r = SECTIONS[section](args, Path(tmp))
        r["wall_seconds"], r["loadavg_start_end"] = round(time.time() - t0), [list(load0), list(os.getloadavg())]
        r["environment"] = environment(args.threads)
        results[section] = r
        outputs.write_json(out_json, results)
        log(f"{section} done in {r['wall_seconds']} s")
    (ROOT / "docs" / "bench-cnn-rnn.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
