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
session  GRU4Rec on Diginetica (bench/cnn_rnn_session.py): HR@20 / MRR@20 over all items on every test
         prefix, paired-bootstrap intervals, single-prefix latency and batch-256 scoring throughput.

    SLIMCART_DATA=/work/shared/data python bench/cnn_rnn.py [--sections vision,session] [--threads 2] [--build-threads 1]
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
from slimcart.recipe import Recipe, load_recipe, parse_step  # noqa: E402
from slimcart.runtime.onnx_runtime import OnnxRunner  # noqa: E402
from slimcart.workloads import get_workload  # noqa: E402
from slimcart.workloads.vision import VisionRunner  # noqa: E402

from cnn_rnn_session import SESSION_RECIPES, bench_session, session_markdown  # noqa: E402

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


def accuracy_change_ci(pred, base_pred, labels, resamples: int = 2000, seed: int = 0) -> list[float]:
    """95% paired-bootstrap interval of the accuracy change in points: the same photos resampled for both
    models, so a photo every model gets wrong (or right) does not widen the interval."""
    import numpy as np

    c, b = (np.asarray(pred) == labels).astype(float), (np.asarray(base_pred) == labels).astype(float)
    idx = np.random.default_rng(seed).integers(0, len(c), (resamples, len(c)))
    lo, hi = np.percentile((c[idx] - b[idx]).mean(1) * 100, [2.5, 97.5])
    return [round(float(lo), 2), round(float(hi), 2)]


def bench_vision(args, work: Path) -> dict:
    wl = get_workload("vision")
    bundle, data = wl.load_model(args.vision_model), wl.load_data(args.data)
    info = wl.data_info(data)
    res: dict = {"data": info.as_dict(), "model": args.vision_model, "targets": TARGETS,
                 "quality_split": "test", "selection_split": "validation (distillation keeps the best validation accuracy)"}
    training = bundle.extra["config"].get("training", {})
    res["trained_model"] = {"params": count_params(bundle.module), "config": bundle.extra["config"]["model"],
                            "training_seconds": training.get("seconds"), "best_epoch": training.get("best_epoch"),
                            "epochs": training.get("epochs", training.get("epoch")),
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
        ev = wl.evaluate(runner, rb, data)
        q = ev.quality
        log(f"{name} (reloaded, {runner.runtime}) {q}")
        distill = built.state.reports.get("distill")
        source = built.state.bundle.module
        rows[name] = {"runtime": runner.runtime, "quality": q, "change_points": points(q, base.quality),
                      "accuracy_change_ci95_points": accuracy_change_ci(ev.outputs["pred"], base.outputs["pred"],
                                                                         base.outputs["labels"]),
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
    # `runtime: auto` keeps the faster of two runtimes that are within a few percent here: both, for the record
    res["int8_each_runtime"] = {}
    if "cnn-int8" in rows:
        for rt in ("onnxruntime", "openvino"):
            steps = [s.model_copy(update={"runtime": rt}) for s in load_recipe("cnn-int8").steps]
            built = api.build(wl, args.vision_model, Recipe(name=f"cnn-int8-{rt}", steps=steps), threads=args.build_threads,
                              workdir=work / f"int8-{rt}-work", progress=log, loaded=(bundle, data))
            built.state.save(work / f"int8-{rt}", wl)
            runner, rb = api.load(wl, work / f"int8-{rt}", args.threads)
            ev = wl.evaluate(runner, rb, data)
            res["int8_each_runtime"][rt] = {"quality": ev.quality, "change_points": points(ev.quality, base.quality),
                                            "accuracy_change_ci95_points": accuracy_change_ci(
                                                ev.outputs["pred"], base.outputs["pred"], base.outputs["labels"])}
            runners[f"cnn-int8 on {rt}"] = runner
    if args.bn_ablation:
        res["batch_norm_ablation"] = batch_norm_ablation(wl, bundle, data, rows, args, work, base.quality)

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
        if dense_int8:  # the dense int8 model on the pruned int8 model's runtime (cnn-int8 built for each runtime)
            dense_same = f"{dense_int8} on {rows[pruned]['runtime']}"
            if dense_same not in t and dense_int8 in rows and rows[dense_int8]["runtime"] == rows[pruned]["runtime"]:
                dense_same = dense_int8
            if dense_same in t:
                r[f"int8_vs_int8 ({rows[pruned]['runtime']})"] = ratio(pruned, dense_same)
        same[pruned] = r
    res["pruning_same_runtime"] = same
    res["preprocess_vs_model"] = {k: res["preprocess"]["images_per_s_1_thread"] / v["images_per_s"] for k, v in timing.items()}
    met = [k for k, r in rows.items() if r["change_points"]["accuracy"] >= -TARGETS["max_accuracy_loss_points"]
           and timing[k]["vs_torch_fp32"] >= TARGETS["min_speedup_vs_torch_fp32"]]
    res["targets_met"] = {"int8_or_combined": met,
                          "pruning_alone_same_runtime": {k: v for k, v in same.items() if k == "cnn-prune-30"}}
    return res


def batch_norm_ablation(wl, bundle, data, rows: dict, args, work: Path, base: dict) -> dict:
    """The pruning recipes' distillation again with batch norm frozen (stored statistics) instead of
    updating: validation accuracy (what selects) and test accuracy of the saved-and-reloaded model."""
    out = {}
    for name in ("cnn-prune-30", "cnn-distill-half"):
        if name not in rows:
            continue
        rec = load_recipe(name)
        steps = [s.model_copy(update={"train": s.train.model_copy(update={"batch_norm": "frozen"})}) if s.kind == "distill"
                 else s for s in rec.steps]
        log(f"building {name} with batch norm frozen during distillation")
        built = api.build(wl, args.vision_model, Recipe(name=f"{name}-bn-frozen", steps=steps), threads=args.build_threads,
                          workdir=work / f"{name}-frozen-work", progress=log, loaded=(bundle, data))
        folder = work / f"{name}-frozen"
        built.state.save(folder, wl)
        runner, rb = api.load(wl, folder, args.threads)
        q = wl.evaluate(runner, rb, data).quality
        d = built.state.reports["distill"]
        out[name] = {"update": {"val_accuracy": rows[name]["distill"]["best_score"], "test": rows[name]["quality"]},
                     "frozen": {"val_accuracy": d["best_score"], "test": q, "change_points": points(q, base),
                                "history": d["history"]}}
        log(f"{name} batch norm frozen: validation {d['best_score']:.4f}, test {q}")
    return out


SECTIONS = {"vision": bench_vision, "session": bench_session}


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
        f"slimcart (best validation accuracy {fmt(tr.get('val_accuracy'), '.3f')} at epoch {fmt(tr.get('best_epoch'), 'g')} of "
        f"{fmt(tr.get('epochs'), 'g')}, {fmt((tr.get('training_seconds') or 0) / 60, '.0f')} min of training). Quality: {r['data']['split']}; "
        "choices (the distillation epoch, the batch-norm setting) are made on the validation split (341 photos). One "
        "test photo is 0.27 points of accuracy; the interval is a 95% paired bootstrap over the test photos. Every "
        "compressed model was saved, reloaded and evaluated through the reloaded copy.", "",
        f"Trained model (PyTorch fp32): **accuracy {b['accuracy']:.4f}, macro-F1 {b['macro_f1']:.4f}**.", "",
        f"Timing: batch {tm['batch']} ({tm['batches']} batches of decoded test photos per round), {tm['repeats']} "
        f"interleaved rounds, {tm['threads']} thread(s), load average {fmt(tm['loadavg_before'][0], '.1f')} before / "
        f"{fmt(tm['loadavg_after'][0], '.1f')} after" + (
            " (**busy machine: not final**)" if max(tm['loadavg_before'][0], tm['loadavg_after'][0]) > 1.25 * (os.cpu_count() or 1)
            else " (a quiet machine: the benchmark's own threads)") + ". Ratios are medians of per-round ratios against "
        "PyTorch fp32 (channels-last) timed in the same rounds.", "",
        "| model | runtime | accuracy | Δ acc (points) [95% CI] | macro-F1 | Δ F1 (points) | images/s | × torch fp32 | params "
        "| bytes |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| baseline | torch fp32 | {b['accuracy']:.4f} | – | {b['macro_f1']:.4f} | – | "
        f"{sides['torch fp32 (channels-last)']['images_per_s']:.1f} | 1.00 | {tr['params']:,} | {r['baseline_bytes']:,} |",
    ]
    for name, row in r["recipes"].items():
        q, d, s = row["quality"], row["change_points"], sides[name]
        ci = row.get("accuracy_change_ci95_points")
        ci_txt = f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""
        lines.append(f"| `{name}` | {row['runtime']} | {q['accuracy']:.4f} | {d['accuracy']:+.2f}{ci_txt} | {q['macro_f1']:.4f} | "
                     f"{d['macro_f1']:+.2f} | {s['images_per_s']:.1f} | {s['vs_torch_fp32']:.2f} | {row['params']:,} | "
                     f"{row['bytes']:,} |")
    lines += ["", "Other sides in the same run:", ""]
    each = r.get("int8_each_runtime", {})
    for k, s in sides.items():
        if k not in r["recipes"] and k != "torch fp32 (channels-last)":
            rt = k.removeprefix("cnn-int8 on ")
            q = f"; accuracy {each[rt]['quality']['accuracy']:.4f} ({each[rt]['change_points']['accuracy']:+.2f} points)" \
                if rt in each else ""
            lines.append(f"- {k}: {s['images_per_s']:.1f} images/s ({s['vs_torch_fp32']:.2f}× torch fp32 channels-last{q})")
    if each:
        lines += ["", "`runtime: auto` keeps the faster int8 runtime on calibration batches (ties within 3% go to ONNX "
                  "Runtime); the two are close on this CPU, so the choice can differ from run to run, and the two "
                  "runtimes' int8 arithmetic differs in rounding (see the accuracies above)."]
    cl = r.get("channels_last_vs_nchw")
    lines += ["", f"Channels-last vs NCHW PyTorch fp32 (same run): **{fmt(cl)}×**: "
              + ("the baseline uses channels-last (what a competent user deploys)." if cl and cl >= 1 else
                 "NCHW was faster in this run; the workload's runner uses channels-last, which was faster in most "
                 "runs while this benchmark was written: if an idle-machine run agrees with this one, switch the "
                 "runner (`VisionRunner(channels_last=False)`).")]
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
        notes = [n.split("; step total")[0] if n.startswith("distillation") else n for n in row["notes"]]
        extra = ""
        if d and d.get("resumed_at_step"):
            extra = (f" The distillation was a finished run found in its checkpoint ({d['seconds'] / 60:.1f} min wall, "
                     f"{d['cpu_seconds'] / 60:.1f} CPU-min when it ran).")
        lines.append(f"- `{name}`: " + "; ".join(notes) + "." + extra
                     + f" Kernels: {', '.join(row['kernels']) or 'PyTorch eager'}.")
    abl = r.get("batch_norm_ablation")
    if abl:
        lines += ["", "### Batch norm during the distillation: updating vs frozen", "",
                  "Same recipe, only `train.batch_norm` changed; validation accuracy is what selects a setting, test is "
                  "shown for information.", "",
                  "| recipe | batch norm | validation accuracy (best epoch) | test accuracy | test macro-F1 |", "|---|---|---|---|---|"]
        for name, v in abl.items():
            for mode in ("update", "frozen"):
                lines.append(f"| `{name}` | {mode} | {v[mode]['val_accuracy']:.4f} | {v[mode]['test']['accuracy']:.4f} | "
                             f"{v[mode]['test']['macro_f1']:.4f} |")
    p = r["preprocess"]
    lines += ["", "### Decode + resize (measured apart from the model)", "",
              f"{p['what']}: median {p['ms_per_image_p50']:.2f} ms per photo (p90 {p['ms_per_image_p90']:.2f} ms) on one "
              f"thread, {p['images_per_s_1_thread']:.0f} photos/s ({p['images']} test photos, load average "
              f"{p['loadavg_before'][0]:.1f}). One core's decode rate over each model's batch-32 rate (below 1: one core "
              "cannot decode photos as fast as the model classifies them): "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["preprocess_vs_model"].items()) + ".", ""]
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
             "ratios; the load average before and after is given with each table, and a table timed while the machine "
             "was busy says so.", "",
             f"CPU: {env.get('cpu')} ({', '.join(env.get('cpu_flags', []))}), {env.get('logical_cpus')} logical CPUs; "
             f"torch {env.get('versions', {}).get('torch')}, onnxruntime {env.get('versions', {}).get('onnxruntime')}, "
             f"openvino {env.get('versions', {}).get('openvino')}.", ""]
    if "vision" in results:
        lines += vision_markdown(results["vision"])
    lines += ["## Session recommendation: GRU4Rec (sessions-diginetica)", ""]
    if "session" in results:
        lines += [session_markdown(results["session"], results["session"]["environment"]), ""]
    else:
        lines += ["Not measured yet: `python bench/cnn_rnn.py --sections session`.", ""]
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
    p.add_argument("--bn-ablation", action=argparse.BooleanOptionalAction, default=True,
                   help="also distill the pruned models with batch norm frozen (two more distillations)")
    p.add_argument("--session-model", default="gru4rec", help="session model alias or folder")
    p.add_argument("--session-recipes", default=",".join(SESSION_RECIPES))
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
