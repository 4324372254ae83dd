"""Benchmark: pruning on the real workloads (search, llm, recsys), every figure a same-run ratio.

search  the shipped `prune-heads-ffn-40` recipe (structured heads + FFN pruning, distillation from the
        dense model on the calibration split), saved and RELOADED from disk before evaluation; speed
        timed interleaved against the dense model on the same runtime: PyTorch fp32 eager, and ONNX
        Runtime (both exported the way the export_onnx step does); plus pruned+int8 vs dense int8.
llm     SmolLM2-135M, 50% unstructured and 2:4 sparsity by magnitude, Wanda and SparseGPT, calibrated
        layer by layer on review text from the train split; perplexity on the workload's test windows.
        Size-only (no sparse kernel on this CPU): the bitmask-encoded size on disk is reported and
        one same-run timing shows that speed does not change.
recsys  SASRec: hidden (embedding) and FFN widths cut by 37.5% (64 -> 40), fine-tuned with the
        model's own sampled-softmax loss on training histories; NDCG@10 on the test items.

    SLIMCART_DATA=../shared/data python bench/pruning.py [--sections search,llm,recsys] [--threads 2]

Writes bench/results/pruning.json and docs/bench-pruning.md. Wall times are honest wall clock on a
shared machine; the load average is recorded beside them.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slimcart import api, outputs  # noqa: E402
from slimcart.bench import environment, measure_interleaved, paired_bootstrap, paired_ratio, set_threads  # noqa: E402
from slimcart.contracts import ModelState, StepContext  # noqa: E402
from slimcart.recipe import Recipe  # noqa: E402
from slimcart.recipe import load_recipe, parse_step  # noqa: E402
from slimcart.workloads import get_workload  # noqa: E402
from slimcart.workloads.ranking import ndcg_per_user  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", flush=True)


THREADS = 2  # set from --threads in main()


def run_steps(wl, bundle, data, steps, workdir: Path) -> ModelState:
    """Build through slimcart's own build path (api.build) from an explicit list of steps."""
    return api.build(wl, str(bundle.source), Recipe(name="bench", steps=list(steps)), threads=THREADS, workdir=workdir,
                     progress=log, loaded=(bundle, data)).state


def timing(sides: dict, inputs, repeats: int, base: str) -> dict:
    t = measure_interleaved(sides, inputs, repeats=repeats, progress=log)
    out = {}
    for name in sides:
        s = t[name].summary()
        out[name] = {"throughput_per_s": s["throughput_per_s"], "latency_p50_ms": s["latency_ms"]["p50"],
                     "throughput_ratio": paired_ratio(t[name].throughput_per_s, t[base].throughput_per_s),
                     **({"extra_throughput_per_s": s["extra_throughput_per_s"]} if "extra_throughput_per_s" in s else {})}
    return out


def onnx_of(wl, bundle, workdir: Path, int8: bool = False):
    """Export (and optionally quantize) exactly as the export_onnx / ort_dynamic_int8 steps do; saved and
    reloaded so the runner pools the graph's token states as a user's loader would."""
    workdir.mkdir(parents=True, exist_ok=True)
    steps = [parse_step({"kind": "export_onnx", "optimize": True})] + ([parse_step({"kind": "ort_dynamic_int8"})] if int8 else [])
    state = ModelState(bundle=bundle)
    ctx = StepContext(workload=wl, data=None, workdir=workdir, threads=THREADS, progress=log)
    for s in steps:
        state = s.apply(state, ctx)
    state.save(workdir / "saved", wl)
    return api.load(wl, workdir / "saved", THREADS)[0], state


def bench_search(args, work: Path) -> dict:
    import numpy as np

    wl = get_workload("search")
    bundle, data = wl.load_model("minilm"), wl.load_data(args.data)
    res = {"data": wl.data_info(data).as_dict(), "recipe": "prune-heads-ffn-40"}
    t0 = time.time()
    base = wl.evaluate(wl.torch_runner(bundle), bundle, data)
    res["eval_seconds"] = round(time.time() - t0)
    log(f"dense {base.quality}")
    t0 = time.time()
    state = run_steps(wl, bundle, data, load_recipe("prune-heads-ffn-40").steps, work / "steps")
    res["build_seconds"], res["notes"] = round(time.time() - t0), state.notes
    res["structure"] = {k: v for k, v in state.reports["prune_structured"].items() if k != "kept"}
    res["recover"] = state.reports.get("recover")
    folder = work / "pruned"
    state.save(folder, wl)
    wl.save_model(bundle, work / "dense")
    runner, pbundle = api.load(wl, folder, THREADS)  # everything below uses the reloaded model
    q = wl.evaluate(runner, pbundle, data, reference=base.outputs).quality
    log(f"pruned (reloaded) {q}")
    res["quality"] = {"dense": base.quality, "pruned": q,
                      "ndcg_rel_change": q["ndcg@10"] / base.quality["ndcg@10"] - 1}
    res["size_bytes"] = {"dense": outputs.model_bytes(work / "dense"), "pruned": outputs.model_bytes(folder)}
    res["all_params"] = {"dense": sum(p.numel() for p in bundle.module.parameters()),
                         "pruned": sum(p.numel() for p in pbundle.module.parameters())}
    inputs = wl.bench_inputs(bundle, data)
    res["torch"] = timing({"dense": wl.torch_runner(bundle), "pruned": runner}, inputs, args.repeats, "dense")
    log(f"torch: {res['torch']}")
    ort_d, _ = onnx_of(wl, bundle, work / "onnx-dense")
    ort_p, st = onnx_of(wl, pbundle, work / "onnx-pruned")
    diff = max(float(np.abs(ort_p(b) - runner(b)).max()) for b in inputs.serving[:2])
    res["onnx_fp32_max_abs_diff_vs_torch"] = diff
    res["onnx_notes"] = st.notes
    res["onnxruntime"] = timing({"dense": ort_d, "pruned": ort_p}, inputs, args.repeats, "dense")
    log(f"ort: {res['onnxruntime']}")
    q8_d, _ = onnx_of(wl, bundle, work / "int8-dense", int8=True)
    q8_p, _ = onnx_of(wl, pbundle, work / "int8-pruned", int8=True)
    res["quality"]["pruned_int8"] = wl.evaluate(q8_p, pbundle, data, reference=base.outputs).quality
    res["int8"] = timing({"dense_fp32": ort_d, "dense_int8": q8_d, "pruned_int8": q8_p}, inputs, args.repeats, "dense_fp32")
    log(f"int8: {res['int8']}")
    return res


def bench_llm(args, work: Path) -> dict:
    from slimcart.compress.prune import SparsityConfig, prune
    from slimcart.compress.prune.masks import sparsity_report, target_linears
    from slimcart.compress.prune.storage import SparseBitmask

    wl = get_workload("llm")
    bundle, data = wl.load_model("smollm2"), wl.load_data(args.data)
    res = {"data": wl.data_info(data).as_dict(), "eval_tokens": wl.eval_window * wl.eval_windows,
           "calibration": f"{args.llm_calib} windows x {wl.calib_window} tokens of train-split reviews", "runs": {}}
    base = wl.evaluate(wl.torch_runner(bundle), bundle, data).quality
    res["dense"] = base
    log(f"dense {base}")
    calib = wl.calibration_batches(bundle, data, args.llm_calib)
    wl.save_model(bundle, work / "dense")
    res["dense_bytes"] = outputs.model_bytes(work / "dense")
    for pattern in ("unstructured", "2:4"):
        for method in ("magnitude", "wanda", "sparsegpt"):
            name = f"{method}-{'50' if pattern == 'unstructured' else '2of4'}"
            cfg = SparsityConfig(method=method, sparsity=0.5, pattern=pattern, calibration_batches=args.llm_calib)
            m = copy.deepcopy(bundle.module)
            t0 = time.time()
            prune(m, cfg, calib if method != "magnitude" else None, progress=lambda s: None)
            secs = time.time() - t0
            pb = replace(bundle, module=m)
            q = wl.evaluate(wl.torch_runner(pb), pb, data).quality
            run = {"quality": q, "ppl_ratio": q["perplexity"] / base["perplexity"], "prune_seconds": round(secs, 1),
                   "sparsity": sparsity_report(target_linears(m, cfg.sparsity_of))["overall"]}
            if name == "sparsegpt-50":
                (work / name).mkdir()
                SparseBitmask(None).save(work / name, wl, pb)
                run["bytes"] = outputs.model_bytes(work / name)
                run["size_ratio"] = run["bytes"] / res["dense_bytes"]
                if args.llm_timing:
                    inputs = wl.bench_inputs(bundle, data)
                    run["timing"] = timing({"dense": wl.torch_runner(bundle), "sparse": wl.torch_runner(pb)}, inputs,
                                           max(2, args.repeats // 2), "dense")
            res["runs"][name] = run
            log(f"{name}: {run}")
            del m, pb
    if args.llm_recover:
        res["recovered"] = llm_recovered(wl, bundle, data, base, work)
    return res


def llm_recovered(wl, bundle, data, base: dict, work: Path) -> dict:
    """Prune -> recover: the shipped `sparsegpt-50-recover` recipe end to end (saved, reloaded from
    disk, then evaluated), and magnitude pruning given the very same recovery, so the comparison
    between criteria stays like for like after training."""
    from slimcart.compress.prune.masks import sparsity_report, target_linears

    recipe = load_recipe("sparsegpt-50-recover").steps
    variants = {"sparsegpt-50-recover": recipe,
                "magnitude-50-recover": [parse_step({"kind": "prune", "method": "magnitude", "sparsity": 0.5})] + recipe[1:]}
    out = {}
    for name, steps in variants.items():
        t0 = time.time()
        state = run_steps(wl, bundle, data, steps, work / f"steps-{name}")
        secs = time.time() - t0
        folder = work / name
        state.save(folder, wl)
        rec = state.reports.get("recover")
        del state
        runner, pb = api.load(wl, folder, THREADS)
        q = wl.evaluate(runner, pb, data).quality
        out[name] = {"quality": q, "ppl_ratio": q["perplexity"] / base["perplexity"], "build_seconds": round(secs, 1),
                     "recover": rec, "bytes": outputs.model_bytes(folder),
                     "sparsity_after_reload": sparsity_report(target_linears(pb.module, steps[0].sparsity_of))["overall"],
                     "recipe": [s.model_dump(mode="json") for s in steps]}
        log(f"{name}: {out[name]}")
        del runner, pb
    return out


def bench_recsys(args, work: Path) -> dict:
    wl = get_workload("recsys")
    data = wl.load_data(args.data)
    bundle = wl.load_model(args.recsys_model)
    res = {"data": wl.data_info(data).as_dict(), "model": args.recsys_model}
    base = wl.evaluate(wl.torch_runner(bundle), bundle, data)
    log(f"dense {base.quality}")
    steps = [parse_step({"kind": "prune_structured", "hidden": args.recsys_prune, "ffn": args.recsys_prune, "round_to": 8,
                         "criterion": args.recsys_criterion, "calibration_batches": 16}),
             parse_step({"kind": "recover", "method": "task", "steps": args.recsys_steps, "max_minutes": args.recsys_minutes,
                         "lr": 1e-3, "calibration_batches": 1000})]
    t0 = time.time()
    state = run_steps(wl, bundle, data, steps, work / "steps")
    res["build_seconds"], res["notes"] = round(time.time() - t0), state.notes
    res["steps"] = [st.model_dump(mode="json") for st in steps]
    # Control: the dense model given the same fine-tuning, so a gain from extra training is not
    # mistaken for a gain from pruning.
    control = run_steps(wl, bundle, data, steps[1:], work / "control")
    control_eval = wl.evaluate(wl.torch_runner(control.bundle), control.bundle, data)
    res["quality_dense_finetuned"] = control_eval.quality
    log(f"dense + same fine-tuning {res['quality_dense_finetuned']}")
    res["structure"] = {k: v for k, v in state.reports["prune_structured"].items() if k != "kept"}
    res["recover"] = state.reports.get("recover")
    state.save(work / "pruned", wl)
    wl.save_model(bundle, work / "dense")
    runner, pbundle = api.load(wl, work / "pruned", THREADS)
    pruned_eval = wl.evaluate(runner, pbundle, data, reference=base.outputs)
    q = pruned_eval.quality
    log(f"pruned (reloaded) {q}")
    res["quality"] = {"dense": base.quality, "pruned": q, "ndcg_rel_change": q["ndcg@10"] / base.quality["ndcg@10"] - 1,
                      "ndcg_rel_change_vs_finetuned_dense": q["ndcg@10"] / res["quality_dense_finetuned"]["ndcg@10"] - 1}
    # NDCG@10 over 5,000 users is noisy at the 2% level: a paired bootstrap over the same users says how much.
    per_user = {k: ndcg_per_user(e.outputs["ranks"]) for k, e in (("dense", base), ("control", control_eval), ("pruned", pruned_eval))}
    res["ndcg_paired_bootstrap"] = {"vs_dense": paired_bootstrap(per_user["pruned"], per_user["dense"]),
                                    "vs_control": paired_bootstrap(per_user["pruned"], per_user["control"]),
                                    "control_vs_dense": paired_bootstrap(per_user["control"], per_user["dense"])}
    log(f"paired bootstrap {res['ndcg_paired_bootstrap']}")
    res["all_params"] = {"dense": sum(p.numel() for p in bundle.module.parameters()),
                         "pruned": sum(p.numel() for p in pbundle.module.parameters())}
    res["size_bytes"] = {"dense": outputs.model_bytes(work / "dense"), "pruned": outputs.model_bytes(work / "pruned")}
    res["torch"] = timing({"dense": wl.torch_runner(bundle), "pruned": runner}, wl.bench_inputs(bundle, data),
                          args.repeats, "dense")
    # The pruned-vs-control gap depends on how long both are fine-tuned (the dense model, trained with
    # dropout 0.5, over-fits when fine-tuned without it): the same comparison at other lengths.
    res["other_lengths"] = []
    for n in (int(x) for x in args.recsys_other_steps.split(",") if x):
        ft = steps[1].model_copy(update={"steps": n, "max_minutes": 1e6})
        ev = {}
        for name, st in (("pruned", [steps[0], ft]), ("control", [ft])):
            done = run_steps(wl, bundle, data, st, work / f"{name}-{n}")
            ev[name] = wl.evaluate(wl.torch_runner(done.bundle), done.bundle, data)
        pu = {k: ndcg_per_user(e.outputs["ranks"]) for k, e in ev.items()}
        row = {"steps": n, "pruned": ev["pruned"].quality, "control": ev["control"].quality,
               "vs_dense": paired_bootstrap(pu["pruned"], per_user["dense"]),
               "vs_control": paired_bootstrap(pu["pruned"], pu["control"])}
        log(f"fine-tuning {n} steps: {row}")
        res["other_lengths"].append(row)
    return res


def _pct(x) -> str:
    return "n/a" if x is None else f"{x * 100:+.2f}%"


def markdown(r: dict) -> str:
    env = r.get("environment", {})
    lines = ["# Pruning benchmark", "",
             "Generated by `bench/pruning.py`; raw figures in `bench/results/pruning.json`. Every speed figure is a",
             "median of per-round ratios timed interleaved in one process (`slimcart.bench.measure_interleaved`).",
             f"CPU: {env.get('cpu')} ({', '.join(env.get('cpu_flags', []))}); threads and load per section at the end.", ""]
    s = r.get("search")
    if s:
        st, qd, qp = s["structure"], s["quality"]["dense"], s["quality"]["pruned"]
        lines += ["## search: MiniLM-L6 on CrowdFlower, recipe `prune-heads-ffn-40`", "",
                  f"Shapes after pruning: {st['shapes']['heads'][0]} heads (of 12) and {st['shapes']['ffn'][0]} FFN neurons "
                  f"(of 1536) per layer. Parameters inside the 6 transformer layers (embeddings not counted): "
                  f"{st['block_params_before']:,} -> {st['block_params_after']:,} (**{st['block_params_removed']:.1%} removed**); "
                  f"whole model {s['all_params']['dense']:,} -> {s['all_params']['pruned']:,}. "
                  f"Recovery: {s['recover']['steps']} distillation steps in {s['recover']['seconds']} s. "
                  f"Evaluated after saving and reloading from disk; data {s['data']['name']}, {s['data']['split']}.", "",
                  "| model | runtime | nDCG@10 | Recall@10 | cosine to dense | batch-32 throughput vs dense (same runtime) |",
                  "|---|---|---|---|---|---|",
                  f"| dense | torch fp32 | {qd['ndcg@10']:.4f} | {qd['recall@10']:.4f} | 1 | 1.00x ({s['torch']['dense']['throughput_per_s']:.0f} texts/s) |",
                  f"| pruned | torch fp32 | {qp['ndcg@10']:.4f} ({_pct(s['quality']['ndcg_rel_change'])}) | {qp['recall@10']:.4f} | "
                  f"{qp['cosine']:.4f} | **{s['torch']['pruned']['throughput_ratio']:.2f}x** |",
                  f"| pruned | ONNX Runtime fp32 | (same function: max abs diff vs torch {s['onnx_fp32_max_abs_diff_vs_torch']:.1e}) | | | "
                  f"**{s['onnxruntime']['pruned']['throughput_ratio']:.2f}x** vs dense ONNX Runtime fp32 "
                  f"({s['onnxruntime']['dense']['throughput_per_s']:.0f} texts/s) |"]
        q8p, t8 = s["quality"]["pruned_int8"], s["int8"]
        lines += [f"| dense int8 (`int8-dynamic`) | ONNX Runtime int8 | (see the quantization benchmark) | | | "
                  f"{t8['dense_int8']['throughput_ratio']:.2f}x vs dense ORT fp32 |",
                  f"| pruned + int8 (`prune-heads-ffn-40-int8`) | ONNX Runtime int8 | {q8p['ndcg@10']:.4f} | {q8p['recall@10']:.4f} | "
                  f"{q8p['cosine']:.4f} | {t8['pruned_int8']['throughput_ratio']:.2f}x vs dense ORT fp32 |", "",
                  f"Size on disk: {s['size_bytes']['dense'] / 1e6:.1f} MB -> {s['size_bytes']['pruned'] / 1e6:.1f} MB "
                  "(the 30k-token embedding table is untouched). ", ""]
    llm = r.get("llm")
    if llm:
        lines += ["## llm: SmolLM2-135M, 50% of every Linear in the decoder blocks (lm_head/embeddings excluded)", "",
                  f"Perplexity on {llm['eval_tokens']:,} test tokens; calibration: {llm['calibration']}. "
                  "All sparsity here is **size-only**: no kernel on this CPU skips zeros, so no speed-up is claimed. "
                  "Wanda/SparseGPT perplexities are not bit-reproducible between identical runs (fp32 forwards are "
                  "not, and near-tied mask choices flip), so differences of a percent or two between runs mean nothing.", "",
                  "| method | pattern | perplexity | vs dense | next-token acc | pruning time |", "|---|---|---|---|---|---|",
                  f"| dense | - | {llm['dense']['perplexity']:.3f} | 1.00x | {llm['dense']['next_token_acc']:.4f} | |"]
        for name, run in llm["runs"].items():
            method, pat = name.split("-")
            lines.append(f"| {method} | {'50% unstructured' if pat == '50' else '2:4'} | {run['quality']['perplexity']:.3f} | "
                         f"{run['ppl_ratio']:.3f}x | {run['quality']['next_token_acc']:.4f} | {run['prune_seconds']:.0f} s |")
        g = llm["runs"].get("sparsegpt-50", {})
        if "bytes" in g:
            lines += ["", f"SparseGPT-50 on disk (bitmask + packed fp32 values): {llm['dense_bytes'] / 1e6:.0f} MB -> "
                      f"{g['bytes'] / 1e6:.0f} MB ({g['size_ratio']:.2f}x; embeddings stay dense)."]
        if "timing" in g:
            t = g["timing"]["sparse"]
            lines.append(f"Same-run speed of the sparse model vs dense (torch): decode {t['throughput_ratio']:.2f}x "
                         "-- as expected for size-only sparsity.")
        rec = llm.get("recovered")
        if rec:
            r0 = next(iter(rec.values()))
            lines += ["", "### Prune -> recover", "",
                      "The one-shot rows above use no training. Below, each 50% model is given the same short recovery: "
                      f"{r0['recover']['steps']} steps of distillation from the dense model (token-level KL + per-block "
                      "hidden-state MSE) on train-split windows, masks held fixed (recipe `sparsegpt-50-recover`, whose SparseGPT step "
                      f"calibrates on {r0['recipe'][0].get('calibration_batches')} windows; the magnitude row swaps only the pruning step). Each model is saved, reloaded from disk and then evaluated.", "",
                      "| recipe | perplexity | vs dense | next-token acc | sparsity after reload | build time (prune + recover) |",
                      "|---|---|---|---|---|---|"]
            for name, run in rec.items():
                lines.append(f"| `{name}` | {run['quality']['perplexity']:.3f} | **{run['ppl_ratio']:.3f}x** | "
                             f"{run['quality']['next_token_acc']:.4f} | {run['sparsity_after_reload']:.4f} | "
                             f"{run['build_seconds'] / 60:.1f} min |")
        lines.append("")
    rs = r.get("recsys")
    if rs:
        st, qd, qp, qc = rs["structure"], rs["quality"]["dense"], rs["quality"]["pruned"], rs["quality_dense_finetuned"]
        lines += ["## recsys: SASRec on Amazon Video Games", "",
                  f"Hidden (embedding) width 64 -> {st['shapes']['hidden']} and FFN {st['shapes']['ffn']} per block "
                  f"({1 - st['shapes']['hidden'] / 64:.1%} of the dims; {rs.get('steps', [{'criterion': 'activation'}])[0]['criterion']} importance), fine-tuned with the model's sampled-softmax loss for {rs['recover']['steps']} steps "
                  f"({rs['recover']['seconds']} s) on training histories. Parameters {rs['all_params']['dense']:,} -> "
                  f"{rs['all_params']['pruned']:,}; reloaded from disk before evaluation.", "",
                  "| model | NDCG@10 | HR@10 | AUC | throughput vs dense (torch, batch 256) |", "|---|---|---|---|---|",
                  f"| dense | {qd['ndcg@10']:.4f} | {qd['hr@10']:.4f} | {qd['auc']:.4f} | 1.00x |",
                  f"| dense + the same fine-tuning (control) | {qc['ndcg@10']:.4f} | {qc['hr@10']:.4f} | {qc['auc']:.4f} | |",
                  f"| pruned + fine-tuning | {qp['ndcg@10']:.4f} ({_pct(rs['quality']['ndcg_rel_change'])} vs dense, "
                  f"{_pct(rs['quality']['ndcg_rel_change_vs_finetuned_dense'])} vs the control) | {qp['hr@10']:.4f} | "
                  f"{qp['auc']:.4f} | {rs['torch']['pruned']['throughput_ratio']:.2f}x |", "",
                  f"Size on disk {rs['size_bytes']['dense'] / 1e6:.2f} MB -> {rs['size_bytes']['pruned'] / 1e6:.2f} MB.", ""]
        bs = rs.get("ndcg_paired_bootstrap")
        if bs:
            ci = lambda b: f"{_pct(b['rel_change'])} (95% interval {_pct(b['ci95'][0])} to {_pct(b['ci95'][1])})"  # noqa: E731
            lines += [f"NDCG@10 changes with a paired bootstrap over the {rs['data'].get('n', 'same')} evaluated users "
                      f"(2,000 resamples): pruned vs dense {ci(bs['vs_dense'])}; pruned vs the control {ci(bs['vs_control'])}; "
                      f"control vs dense {ci(bs['control_vs_dense'])}.", ""]
        if rs.get("other_lengths"):
            lines += ["The same prune + fine-tune and control at other fine-tuning lengths (not saved/timed):", "",
                      "| fine-tuning steps | pruned NDCG@10 | control NDCG@10 | pruned vs dense | pruned vs control |",
                      "|---|---|---|---|---|"]
            lines += [f"| {o['steps']} | {o['pruned']['ndcg@10']:.4f} | {o['control']['ndcg@10']:.4f} | {ci(o['vs_dense'])} | "
                      f"{ci(o['vs_control'])} |" for o in rs["other_lengths"]]
            lines.append("")
    for name in ("search", "llm", "recsys"):
        if name in r:
            threads = r[name].get("environment", {}).get("threads", "?")
            lines.append(f"- {name}: {threads} thread(s), {r[name]['wall_seconds']} s wall clock, load average at start/end "
                         f"{[round(x, 1) for x in r[name]['load_avg_start_end']]}")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sections", default="search,llm,recsys")
    p.add_argument("--data", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--llm-calib", type=int, default=16)  # 16 vs 64 windows changed SparseGPT ppl by 1.5%
    p.add_argument("--llm-timing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--llm-recover", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--recsys-model", default="sasrec")
    p.add_argument("--recsys-prune", type=float, default=0.375)  # of hidden and FFN dims (64 -> 40)
    p.add_argument("--recsys-criterion", default="activation")
    p.add_argument("--recsys-steps", type=int, default=2000)
    p.add_argument("--recsys-other-steps", default="5000")  # comma list; "" for none
    p.add_argument("--recsys-minutes", type=float, default=15.0)  # steps bind: the control gets the same count
    args = p.parse_args()
    set_threads(args.threads)
    global THREADS
    THREADS = args.threads
    out_json = ROOT / "bench" / "results" / "pruning.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    for name in ("search", "llm", "recsys"):  # sections measured by an earlier run keep the environment they ran in
        if name in results and "environment" not in results[name] and "environment" in results:
            results[name]["environment"] = results["environment"]
    results["environment"] = environment(args.threads)
    for section in args.sections.split(","):
        fn = {"search": bench_search, "llm": bench_llm, "recsys": bench_recsys}[section]
        t0, load0 = time.time(), os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as tmp:
            r = fn(args, Path(tmp))
        r["wall_seconds"], r["load_avg_start_end"] = round(time.time() - t0), [load0, os.getloadavg()[0]]
        r["environment"] = environment(args.threads)
        results[section] = r
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=2, default=float))
        log(f"{section} done in {r['wall_seconds']} s")
    (ROOT / "docs" / "bench-pruning.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
